"""More than two classes: COVID / CAP / Normal through split, pretrain, both engines,
evaluate, predict, export and the model card; metrics as scikit-learn computes them; the
binary-only settings refused in one line."""

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, LocalGrid, local_federation, make_split
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import FederateConfig, PretrainConfig
from fedct.configure import build_config
from fedct.data.synthetic import THREE_CLASSES, write_synthetic
from fedct.evaluation import run_evaluate
from fedct.federated.protocol import Evaluation, decode_evaluation, encode_evaluation
from fedct.federated.simulation import run_federate
from fedct.federated.validation import client_rows, pool
from fedct.multiclass import ClassHistograms, class_metrics
from fedct.predict import run_predict
from fedct.pretrain import run_pretrain
from fedct.runs import read_checkpoint, read_sidecar

CLASSES = list(THREE_CLASSES)
SETTINGS = {**TINY, "image_size": 64, "seed": 1}


def random_scores(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(k, size=n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


@pytest.mark.parametrize("k", [3, 5])
def test_class_metrics_equal_scikit_learns(k):
    labels, probs = random_scores(300, k, seed=k)
    predicted = probs.argmax(axis=1)
    got = class_metrics(labels, probs, [f"c{i}" for i in range(k)])
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert got["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert got["weighted_f1"] == pytest.approx(f1_score(labels, predicted, average="weighted"))
    assert got["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    matrix = confusion_matrix(labels, predicted)
    assert got["confusion"] == matrix.tolist()
    for c in range(k):
        others = labels != c
        spec = np.mean(predicted[others] != c)
        assert got["per_class"][f"c{c}"]["specificity"] == pytest.approx(spec)
        assert got["per_class"][f"c{c}"]["n"] == int(np.sum(labels == c))


def test_a_class_absent_from_the_rows_leaves_its_auc_undefined_not_the_macro():
    labels, probs = random_scores(200, 3, seed=0)
    keep = labels != 2
    got = class_metrics(labels[keep], probs[keep], CLASSES)
    assert np.isnan(got["per_class"][CLASSES[2]]["auc"])
    assert got["auc"] == pytest.approx(np.mean([got["per_class"][c]["auc"] for c in CLASSES[:2]]))
    assert got["per_class"][CLASSES[2]]["n"] == 0


def test_pooled_class_histograms_give_the_pooled_rows_metrics():
    """Three clients' aggregates, summed on the server, give the metrics of their rows put
    together: accuracy and balanced accuracy exactly, macro AUC within the bins' bound."""
    parts = [random_scores(n, 3, seed=s) for s, n in enumerate((40, 70, 25))]
    evaluations = [Evaluation(i, examples=len(y), correct=int((p.argmax(1) == y).sum()),
                              **ClassHistograms.of(y, p).flat())
                   for i, (y, p) in enumerate(parts)]
    evaluations = [decode_evaluation(encode_evaluation(e)) for e in evaluations]  # the wire
    pooled, checked = pool(evaluations, classes=3)
    labels = np.concatenate([y for y, _ in parts])
    probs = np.concatenate([p for _, p in parts])
    truth = class_metrics(labels, probs, CLASSES)
    got = pooled.metrics()
    assert got["acc"] == pytest.approx(truth["accuracy"])
    assert got["balanced_acc"] == pytest.approx(truth["balanced_accuracy"])
    assert abs(got["auc"] - truth["auc"]) <= pooled.histogram.tie_bound() + 1e-12
    assert np.isnan(got["sensitivity"])
    rows = client_rows(1, checked, classes=3)
    assert [r["positives"] for r in rows] == ["", "", ""]
    malformed = Evaluation(9, examples=5, positives=(1,) * 6, negatives=(1,) * 6,
                           confusion=(1,) * 9)
    _, checked = pool([malformed], classes=3)
    assert checked[0].status.value == "rejected"


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A 3-class synthetic dataset, its split (3 clients, local val), a stage-1 run."""
    root = tmp_path_factory.mktemp("three")
    data = write_synthetic(root / "data", n=240, seed=2, size=64, classes=3)
    split = make_split(data, root / "split", clients=3, local_val=0.25)
    config = build_config(PretrainConfig, None, {
        **{k: v for k, v in SETTINGS.items() if k not in ("rounds", "local_steps")},
        "epochs": 30, "pretrained": "none"})
    run_pretrain(split, root / "stage1", config, quiet=True)
    return {"root": root, "data": data, "split": split, "stage1": root / "stage1"}


def test_three_classes_train_and_evaluate_per_class(three):
    meta = yaml.safe_load((three["split"] / "split.yaml").read_text())
    assert meta["classes"] == CLASSES and meta["positive"] is None
    sidecar = read_sidecar(three["stage1"] / "best")
    assert sidecar["positive"] is None and sidecar["operating_point"]["rule"] == "argmax"
    assert sidecar["operating_point"].get("threshold") is None
    assert sidecar["metrics"]["val_auc"] > 0.6  # it learns: chance is 0.5
    report = run_evaluate([three["stage1"] / "best"], split_dir=three["split"], on="test",
                          n_boot=50, out=three["root"] / "eval")
    (result,) = report["results"]
    with (three["split"] / "manifest.csv").open() as handle:
        test_counts = {c: 0 for c in CLASSES}
        for row in csv.DictReader(handle):
            if row["split"] == "test":
                test_counts[row["label"]] += 1
    # every class is counted under its own name: COVID is not folded into another class
    assert {c: result["metrics"]["per_class"][c]["n"] for c in CLASSES} == test_counts
    matrix = np.array(result["metrics"]["confusion"])
    assert matrix.shape == (3, 3) and matrix.sum(axis=1).tolist() == list(test_counts.values())
    assert set(result["chosen"]["ci95"]) == {"accuracy", "balanced_accuracy", "macro_f1",
                                             "weighted_f1", "auc"}
    for name in ("roc.png", "confusion.png", "reliability.png", "metrics.json"):
        assert (three["root"] / "eval" / name).is_file()
    card = (three["stage1"] / "MODEL_CARD.md").read_text()
    assert "the class of highest probability" in card and "macro AUC" in card


def test_both_engines_federate_three_classes_alike_with_dp_fedbn_and_scaffold(three, tmp_path,
                                                                            task_identity):
    from fedct.federated.flower_app import main

    settings = {**SETTINGS, "val": "both", "dp": True, "target_epsilon": 8.0, "fedbn": True,
                "strategy": "scaffold", "local_loss": "balanced-softmax"}
    config = build_config(FederateConfig, None, settings)
    init = str(three["stage1"] / "best")
    run_federate(three["split"], tmp_path / "embedded", config, init=init, quiet=True)
    grid, server, _ = local_federation(three["split"], tmp_path, config, 3, grid=LocalGrid,
                                       out=str(tmp_path / "flower"), init=init,
                                       split_dir=str(three["split"]), num_clients=3,
                                       node_wait=5.0, round_timeout=30.0)
    main(grid, server)
    flower, meta = read_checkpoint(tmp_path / "flower" / "final")
    expected, _ = read_checkpoint(tmp_path / "embedded" / "final")
    assert all(torch.equal(flower[k], expected[k]) for k in expected)
    for name in ("summary.csv", "clients.csv"):
        with (tmp_path / "flower" / name).open() as a, (tmp_path / "embedded" / name).open() as b:
            strip = [{k: v for k, v in r.items() if k != "seconds"}
                     for r in csv.DictReader(a)], [{k: v for k, v in r.items() if k != "seconds"}
                                                   for r in csv.DictReader(b)]
        assert strip[0] == strip[1], name
    with (tmp_path / "embedded" / "summary.csv").open() as handle:
        last = list(csv.DictReader(handle))[-1]
    assert last["threshold"] == "nan" and 0 <= float(last["fed_auc"]) <= 1
    assert 0 <= float(last["fed_balanced_acc"]) <= 1
    assert meta["operating_point"]["rule"] == "argmax" and meta["engine"] == "flower"


def test_predict_and_export_give_the_class_of_highest_probability(three, tmp_path):
    pytest.importorskip("onnxruntime")
    from fedct.export import run_export

    report = run_predict(three["stage1"] / "best", [three["data"] / "dataset.csv"],
                         out=tmp_path / "p.csv")
    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:4] == ["path", "group", "probability", "decision"]
    for row in rows[:20]:
        probs = [float(row[f"P({c})"]) for c in CLASSES]
        assert row["decision"] == CLASSES[int(np.argmax(probs))]
        assert float(row["probability"]) == pytest.approx(max(probs))
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    group = report["groups"][0]
    members = [r for r in rows if r["group"] == group["group"]]
    mean = np.mean([[float(r[f"P({c})"]) for c in CLASSES] for r in members], axis=0)
    assert group["decision"] == CLASSES[int(np.argmax(mean))] and group["images"] == len(members)
    exported = run_export(three["stage1"] / "best", fmt="onnx", out=tmp_path / "m.onnx")
    assert exported["positive"] is None and exported["threshold"] is None
    assert json.loads((tmp_path / "m.onnx.json").read_text())["classes"] == CLASSES


def test_binary_only_settings_are_refused_in_one_line(three, tmp_path):
    runner = CliRunner()
    best = str(three["stage1"] / "best")
    cases = [
        (["split", str(three["data"] / "dataset.csv"), "--out", str(tmp_path / "s"),
          "--positive", "CT_COVID"], "--positive CT_COVID: needs two classes"),
        (["pretrain", str(three["split"]), "--out", str(tmp_path / "r"), "--model",
          "test_efficientnet", "--pretrained", "none", "--threshold", "youden"],
         "threshold youden: needs two classes"),
        (["federate", str(three["split"]), "--init", best, "--out", str(tmp_path / "f"),
          "--eval-release", "counts"], "eval_release counts: needs two classes"),
        (["evaluate", best, "--threshold", "0.3"], "--threshold 0.3: needs two classes"),
        (["evaluate", best, "--explain", str(tmp_path / "x")], "--explain: Grad-CAM explains"),
        (["predict", best, str(three["data"] / "CT_CAP"), "--out", str(tmp_path / "p.csv"),
          "--threshold", "0.4"], "--threshold 0.4: needs two classes"),
        (["predict", best, str(three["data"] / "dataset.csv"), "--out",
          str(tmp_path / "p.csv"), "--aggregate", "max"], "--aggregate max"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "r").exists()


def test_a_sidecar_or_split_that_gives_three_classes_a_threshold_is_refused(three, tmp_path):
    import shutil

    from fedct.data.manifest import load_split
    from fedct.errors import FedctError
    from fedct.sidecar import check_fields

    meta = read_sidecar(three["stage1"] / "best")
    for edit, expected in (({"positive": "CT_COVID"}, "positive"),
                           ({"operating_point": {"threshold": 0.4, "rule": "youden",
                                                 "source": "val"}}, "argmax rule")):
        with pytest.raises(FedctError, match=expected):
            check_fields({**meta, **edit}, "edited.json")
    copy = tmp_path / "split"
    shutil.copytree(three["split"], copy)
    meta_path = copy / "split.yaml"
    text = meta_path.read_text().replace("positive: null", "positive: CT_COVID")
    meta_path.write_text(text)
    with pytest.raises(FedctError, match="key 'positive'"):
        load_split(copy)
