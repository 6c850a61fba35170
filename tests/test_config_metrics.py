import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedct.config import FederateConfig, PretrainConfig
from fedct.configure import build_config
from fedct.errors import FedctError
from fedct.metrics import binary_metrics, bootstrap, roc_auc, summary_metrics, youden_threshold


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 0.01\nmodel: resnet18\nclients: [0, 2]\n")
    config = build_config(PretrainConfig, path, {"lr": 0.5, "batch_size": None})
    assert (config.epochs, config.lr, config.model, config.clients) == (3, 0.5, "resnet18", [0, 2])
    assert build_config(PretrainConfig, None, {"clients": "1,3"}).clients == [1, 3]


@pytest.mark.parametrize("text, message", [
    ("epoch: 3\n", "unknown key 'epoch' (did you mean 'epochs'?)"),
    ("epochs: three\n", "key 'epochs'"),
    ("optimizer: lamb\n", "optimizer 'lamb'"),
    ("freeze: some\n", "freeze 'some'"),
    ("- a\n", "expected a mapping"),
])
def test_bad_config_is_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(FedctError, match=re.escape(message)):
        build_config(PretrainConfig, path)


def test_federate_config_accepts_kebab_case_keys():
    config = build_config(FederateConfig, None, {"local-epochs": 2, "dp": "true"})
    assert config.local_epochs == 2 and config.dp is True


def test_binary_metrics_by_hand():
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    score = np.array([0.9, 0.8, 0.3, 0.1, 0.6, 0.2, 0.4, 0.7])
    m = binary_metrics(truth, score, 0.5)
    # called positive: 0.9 0.8 0.6 0.7 -> tp 3 (0.9 0.8 0.7), fp 1 (0.6); fn 1 (0.3); tn 3
    assert m["confusion"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75)
    # AUC: positives 0.9 0.8 0.3 0.7 vs negatives 0.1 0.6 0.2 0.4: pairs won = 4+4+2+4 = 14 of 16
    assert m["auc"] == pytest.approx(14 / 16)
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5


def test_youden_threshold_separates_perfectly():
    truth = np.array([0, 0, 1, 1])
    score = np.array([0.1, 0.3, 0.35, 0.9])
    t = youden_threshold(truth, score)
    m = binary_metrics(truth, score, t)
    assert m["sensitivity"] == 1 and m["specificity"] == 1


def test_bootstrap_is_repeatable_and_resamples_patients():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 60)
    score = np.clip(truth * 0.3 + rng.uniform(0, 0.7, 60), 0, 1)
    groups = np.repeat(np.arange(20), 3)
    a = bootstrap(truth, score, threshold=0.5, groups=groups, n=200, seed=1)
    b = bootstrap(truth, score, threshold=0.5, groups=groups, n=200, seed=1)
    c = bootstrap(truth, score, threshold=0.5, groups=None, n=200, seed=1)
    assert a == b
    assert a != c
    low, high = a["auc"]
    assert low < roc_auc(truth, score) < high


def test_summary_metrics_of_three_classes_have_no_positive_class():
    """Three classes: argmax accuracy, balanced accuracy (mean recall), macro AUC; a
    sensitivity would need a positive class, so it is NaN whatever index is passed."""
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2, 1])
    m = summary_metrics(probs, labels, positive_index=None)
    assert m["acc"] == pytest.approx(0.75)
    assert m["balanced_acc"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert np.isnan(m["sensitivity"]) and np.isnan(m["specificity"])


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    """Each example builds, and every key it sets is the value the built config holds."""
    cls = PretrainConfig if "pretrain" in path.name else FederateConfig
    written = yaml.safe_load(path.read_text())
    config = build_config(cls, path, {})
    assert written, f"{path.name} sets nothing"
    for key, value in written.items():
        assert getattr(config, key.replace("-", "_")) == value, key


def test_resume_keeps_the_saved_config_and_refuses_other_settings(tmp_path):
    from fedct.configure import resolve_config

    run = tmp_path / "run"
    run.mkdir()
    saved = build_config(FederateConfig, None, {"rounds": 7, "lr": 0.01, "dp": True})
    (run / "config.yaml").write_text(yaml.safe_dump({"command": "federate", "init": "ckpt",
                                                      "config": dataclasses.asdict(saved)}))
    config, doc = resolve_config(FederateConfig, path=None,
                                 overrides={"lr": 0.01, "device": "cpu", "mu": None},
                                 resume_dir=run)
    assert (config.rounds, config.lr, config.device, doc["init"]) == (7, 0.01, "cpu", "ckpt")
    with pytest.raises(FedctError, match="dp was True when the run started, not False"):
        resolve_config(FederateConfig, path=None, overrides={"dp": False}, resume_dir=run)
    with pytest.raises(FedctError, match="--config and --resume"):
        resolve_config(FederateConfig, path=tmp_path / "x.yaml", overrides={}, resume_dir=run)
    with pytest.raises(FedctError, match="a `fedct federate` run, not a `fedct pretrain` one"):
        resolve_config(PretrainConfig, path=None, overrides={}, resume_dir=run)
    # a run begun before a setting existed resumes as that setting's default, and only so
    plain = build_config(FederateConfig, None, {"rounds": 7})
    older = {k: v for k, v in dataclasses.asdict(plain).items() if k != "objective"}
    (run / "config.yaml").write_text(yaml.safe_dump({"command": "federate", "config": older}))
    config, _ = resolve_config(FederateConfig, path=None, overrides={}, resume_dir=run)
    assert config.objective == "supervised"
    with pytest.raises(FedctError, match="objective was 'supervised' when the run started"):
        resolve_config(FederateConfig, path=None, overrides={"objective": "byol"},
                       resume_dir=run)


def test_positive_class_and_monitor_rules():
    from fedct.metrics import monitor_value, positive_index

    assert positive_index(["CT_COVID", "CT_NonCOVID"], "CT_COVID") == 0
    assert positive_index(["a", "b", "c"], None) is None  # more classes: argmax, no positive
    assert monitor_value({"loss": 0.3}, "val_loss") == -0.3
    assert monitor_value({"auc": float("nan")}, "val_auc") == float("-inf")


def test_auc_and_youden_agree_with_scikit_learn():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(3)
    truth = rng.random(200) > 0.6
    score = np.round(rng.random(200) * 0.5 + truth * 0.3, 2)  # ties included
    assert roc_auc(truth, score) == pytest.approx(roc_auc_score(truth, score), abs=1e-12)
    fpr, tpr, thresholds = roc_curve(truth, score)
    best = youden_threshold(truth, score)
    called = score >= best
    assert np.mean(called[truth]) - np.mean(called[~truth]) == pytest.approx(max(tpr - fpr))


def test_full_batches_are_for_stage_2_only():
    assert build_config(FederateConfig, None, {"batch_size": "all"}).batch_size == "all"
    assert build_config(FederateConfig, None, {"batch_size": "12"}).batch_size == 12
    with pytest.raises(FedctError, match="key 'batch_size' has value 'all', expected int"):
        build_config(PretrainConfig, None, {"batch_size": "all"})
