"""Stage 1 and scoring on synthetic data with timm's tiny test model."""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import COVID_CSV, LITE0_WEIGHTS, require_shared
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import PretrainConfig
from fedct.configure import build_config
from fedct.data.manifest import load_split
from fedct.errors import FedctError
from fedct.models import apply_freeze, create_model, make_dp_safe
from fedct.runs import read_checkpoint, save_checkpoint

runner = CliRunner()
TINY = {"model": "test_efficientnet", "pretrained": "none", "image_size": 64, "batch_size": 16,
        "epochs": 3, "lr": 3e-3}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny_flags(**extra):
    flags = []
    for key, value in {**TINY, **extra}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def test_pretrain_and_evaluate_end_to_end(split_dir, tmp_path):
    run = tmp_path / "run"
    result = cli("pretrain", split_dir, "--out", run, *tiny_flags(), "--threshold", "youden",
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["best_epoch"] in (1, 2, 3)
    chosen = report["operating_point"]
    assert chosen["rule"] == "youden" and chosen["source"] == "val" and 0 < chosen["threshold"] < 1
    files = {p.name for p in run.iterdir()}
    assert {"config.yaml", "summary.csv", "best.safetensors", "best.json", "last.safetensors",
            "last.json", "report.json"} <= files
    rows = (run / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,val_loss,val_acc,val_auc") and len(rows) == 4
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["seed"] == 0 and "torch" in config["versions"]
    _, meta = read_checkpoint(run / "best")
    assert meta["classes"] == ["CT_COVID", "CT_NonCOVID"] and meta["stage"] == "pretrain"
    assert meta["input_size"] == [3, 64, 64]
    scored = cli("evaluate", run / "best", run / "last", "--split", split_dir, "--on", "val",
                 "--bootstrap", 50, "--out", tmp_path / "eval")
    assert scored.exit_code == 0, scored.output
    assert "positive class CT_COVID" in scored.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert len(metrics["results"]) == 2 and metrics["grouped_bootstrap"]
    assert {"roc.png", "confusion.png", "reliability.png"} <= {
        p.name for p in (tmp_path / "eval").iterdir()}
    best = metrics["results"][0]
    # scored at the threshold stage 1 chose on val, the same figures as its own summary
    assert best["chosen"]["threshold"] == chosen["threshold"]
    assert best["chosen"]["sensitivity"] == pytest.approx(chosen["sensitivity"])
    assert best["chosen"]["source"] == "youden on val" and 0 <= best["calibration"]["ece"] <= 1
    assert "threshold_0.5" in best and best["chosen"]["ci95"]["accuracy"][0] <= best["chosen"][
        "accuracy"]
    forced = cli("evaluate", run / "best", "--split", split_dir, "--on", "val", "--bootstrap", 0,
                 "--threshold", 0.3, "--json")
    assert json.loads(forced.stdout)["results"][0]["chosen"]["threshold"] == 0.3
    ruled = cli("evaluate", run / "best", "--split", split_dir, "--on", "val", "--bootstrap", 0,
                "--threshold", "youden", "--json")  # the rules pretrain and federate take
    chosen_here = json.loads(ruled.stdout)["results"][0]["chosen"]
    assert chosen_here["source"] == "youden on the scored data (optimistic)"
    assert 0 < chosen_here["threshold"] < 1
    flower = cli("evaluate", run / "best", "--engine", "flower", "--federation", "x",
                 "--threshold", "youden")
    assert flower.exit_code == 2 and "give a number; each node scores" in flower.output
    bad = cli("evaluate", run / "best", "--threshold", "median")
    assert bad.exit_code == 2 and "threshold 'median': choose 0.5" in bad.output
    on_train = cli("evaluate", run / "best", "--split", split_dir, "--on", "train",
                   "--per-client", "--bootstrap", 0, "--json")
    assert [r["data"] for r in json.loads(on_train.stdout)["results"]] == ["all", "client 0",
                                                                           "client 1"]
    everything = cli("evaluate", run / "best", "--split", split_dir, "--on", "all",
                     "--bootstrap", 0, "--json")
    assert json.loads(everything.stdout)["images"] == len(load_split(split_dir).entries)


MIXED = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "mix_prob": 0.8, "erase_prob": 0.5,
         "average_last": 2}


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.9, "layer_decay": 0.8}, MIXED],
                         ids=["plain", "ema+layer-decay", "mix+erase+average"])
def test_same_seed_same_numbers_and_resume_equals_uninterrupted(split_dir, tmp_path, monkeypatch,
                                                                extra):
    from fedct import pretrain as stage1

    config = build_config(PretrainConfig, None, {**TINY, **extra})
    stage1.run_pretrain(split_dir, tmp_path / "a", config, quiet=True)
    stage1.run_pretrain(split_dir, tmp_path / "b", config, quiet=True)
    first, _ = read_checkpoint(tmp_path / "a" / "last")
    second, _ = read_checkpoint(tmp_path / "b" / "last")
    assert all(torch.equal(first[k], second[k]) for k in first)

    real_epoch = stage1.train_epoch
    calls = {"n": 0}

    def dies_in_third_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(stage1, "train_epoch", dies_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        stage1.run_pretrain(split_dir, tmp_path / "c", config, quiet=True)
    monkeypatch.setattr(stage1, "train_epoch", real_epoch)
    assert len((tmp_path / "c" / "summary.csv").read_text().splitlines()) == 3
    result = cli("pretrain", split_dir, "--resume", tmp_path / "c", "--quiet")
    assert result.exit_code == 0, result.output
    resumed, _ = read_checkpoint(tmp_path / "c" / "last")
    assert all(torch.equal(first[k], resumed[k]) for k in first)
    resumed_rows = (tmp_path / "c" / "summary.csv").read_text().splitlines()
    full_rows = (tmp_path / "a" / "summary.csv").read_text().splitlines()
    assert len(resumed_rows) == 4
    strip_seconds = [r.rsplit(",", 1)[0] for r in resumed_rows], [r.rsplit(",", 1)[0] for r in full_rows]
    assert strip_seconds[0] == strip_seconds[1]
    if config.average_last:
        averaged, meta = read_checkpoint(tmp_path / "c" / "averaged")
        epochs = [read_checkpoint(tmp_path / "c" / f"epoch-{e:04d}")[0] for e in (2, 3)]
        key = next(k for k in averaged if averaged[k].is_floating_point() and averaged[k].ndim > 1)
        assert torch.allclose(averaged[key], (epochs[0][key] + epochs[1][key]) / 2)
        assert meta["averaged_epochs"] == [2, 3]
        report = json.loads((tmp_path / "c" / "report.json").read_text())
        assert report["averaged"]["epochs"] == [2, 3] and 0 <= report["averaged"]["val_auc"] <= 1
        assert not (tmp_path / "c" / "epoch-0001.safetensors").exists()


def test_a_threshold_chosen_with_tta_is_scored_with_tta_or_noted(split_dir, tmp_path):
    from fedct import pretrain as stage1
    from fedct.evaluation import run_evaluate
    from fedct.predict import run_predict

    config = build_config(PretrainConfig, None, {**TINY, "epochs": 1, "tta": True})
    stage1.run_pretrain(split_dir, tmp_path / "run", config, quiet=True)
    _, meta = read_checkpoint(tmp_path / "run" / "best")
    assert meta["tta"] is True
    plain = run_evaluate([tmp_path / "run" / "best"], split_dir=split_dir, on="val", n_boot=0,
                         out=tmp_path / "e1")
    assert any("chosen on val scored with test-time mirroring; add --tta" in n
               for n in plain["notes"])
    mirrored = run_evaluate([tmp_path / "run" / "best"], split_dir=split_dir, on="val",
                            n_boot=0, tta=True, out=tmp_path / "e2")
    assert not any("tta" in n for n in mirrored["notes"])
    scans = sorted(load_split(split_dir).root.rglob("*.png"))[:2]
    predicted = run_predict(tmp_path / "run" / "best", scans, out=tmp_path / "p.csv")
    assert predicted["notes"] and "add --tta" in predicted["notes"][0]
    assert not run_predict(tmp_path / "run" / "best", scans, out=tmp_path / "q.csv",
                           tta=True)["notes"]


def test_batch_mix_keeps_an_odd_example_and_soft_targets_sum_to_one():
    from fedct.recipes import BatchMix

    torch.manual_seed(0)
    np.random.seed(0)  # timm draws the mixing weight from numpy's global generator
    mix = BatchMix(mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.0,
                   num_classes=2)
    images = torch.rand(5, 3, 8, 8)
    labels = torch.tensor([0, 1, 0, 1, 1])  # the even four mix 0 with 3 and 1 with 2
    mixed, targets = mix(images.clone(), labels)
    assert mixed.shape == images.shape and targets.shape == (5, 2)
    assert torch.allclose(targets.sum(1), torch.ones(5))
    assert torch.equal(mixed[4], images[4]) and targets[4].tolist() == [0.0, 1.0]
    lam = targets[0, 0]
    assert 0 < lam < 1 and torch.allclose(targets[1], torch.stack([1 - lam, lam]))
    assert torch.allclose(mixed[1], lam * images[1] + (1 - lam) * images[2], atol=1e-6)
    single, target = mix(images[:1].clone(), labels[:1])
    assert torch.equal(single, images[:1]) and target.tolist() == [[1.0, 0.0]]


def test_average_states_by_hand():
    from fedct.recipes import average_states

    first = {"w": torch.tensor([1.0, 3.0]), "steps": torch.tensor(4)}
    second = {"w": torch.tensor([3.0, 5.0]), "steps": torch.tensor(8)}
    averaged = average_states([first, second])
    assert averaged["w"].tolist() == [2.0, 4.0] and averaged["steps"].item() == 8


@pytest.mark.parametrize("extra, message", [
    ({"mixup_alpha": -1}, "mixup_alpha -1.0: must be in [0, inf)"),
    ({"mix_prob": 0}, "mix_prob 0.0: must be in (0, 1]"),
    ({"erase_prob": 1.5}, "erase_prob 1.5: must be in [0, 1]"),
    ({"average_last": 20}, "average_last 20: must be in 0..epochs (3)"),
    ({"mixup_alpha": 0.2, "balance": "loss"}, "balance loss: class-weighted loss and mixup"),
])
def test_recipe_options_are_checked(extra, message):
    with pytest.raises(FedctError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        build_config(PretrainConfig, None, {**TINY, **extra})


def test_layer_decay_gives_earlier_blocks_smaller_lr():
    from fedct.training import make_optimizer

    model = create_model("test_efficientnet", 2, pretrained="none")
    config = build_config(PretrainConfig, None, {"lr": 1e-3, "layer_decay": 0.5})
    lr_of = {id(p): g["lr"] for g in make_optimizer(model, config).param_groups for p in g["params"]}
    stem = lr_of[id(model.conv_stem.weight)]
    head = lr_of[id(model.classifier.weight)]
    assert head == pytest.approx(1e-3) and stem < head / 4
    plain = make_optimizer(model, build_config(PretrainConfig, None, {"lr": 1e-3}))
    assert {g["lr"] for g in plain.param_groups} == {1e-3}
    with pytest.raises(FedctError, match="layer_decay"):
        build_config(PretrainConfig, None, {"layer_decay": 1.5})


def test_freezing_policies():
    model = create_model("test_efficientnet", 2, pretrained="none")
    total = sum(p.numel() for p in model.parameters())
    head = apply_freeze(model, "head")
    assert head == sum(p.numel() for p in model.get_classifier().parameters())
    last = apply_freeze(model, "last-2")
    assert head < last < total
    assert apply_freeze(model, "full") == total
    apply_freeze(model, "head")
    from fedct.models import train_mode

    train_mode(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)


def test_checkpoint_round_trip_and_head_replacement(tmp_path):
    model = create_model("test_efficientnet", 3, pretrained="none")
    meta = {"architecture": "test_efficientnet", "classes": ["a", "b", "c"], "stage": "pretrain",
            "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    save_checkpoint(tmp_path / "ck", model.state_dict(), meta)
    state, back = read_checkpoint(tmp_path / "ck.safetensors")
    assert back["classes"] == ["a", "b", "c"]
    same = create_model("test_efficientnet", 3, pretrained=str(tmp_path / "ck"))
    assert all(torch.equal(same.state_dict()[k], v) for k, v in state.items())
    two = create_model("test_efficientnet", 2, pretrained=str(tmp_path / "ck"))
    assert two.get_classifier().out_features == 2
    with pytest.raises(FedctError, match="not resnet18"):
        create_model("resnet18", 2, pretrained=str(tmp_path / "ck"))


def test_dp_safe_model_has_no_batchnorm_and_runs():
    model = make_dp_safe(create_model("test_efficientnet", 2, pretrained="none"))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_errors_are_one_line(split_dir, tmp_path):
    bad_model = cli("pretrain", split_dir, "--out", tmp_path / "x", *tiny_flags(model="resnet1"))
    assert bad_model.exit_code == 2 and "did you mean" in bad_model.output
    no_hub = cli("pretrain", split_dir, "--out", tmp_path / "y",
                 *tiny_flags(pretrained="/nonexistent.safetensors"))
    assert no_hub.exit_code == 2 and "nonexistent" in no_hub.output
    (tmp_path / "c.yaml").write_text("epochz: 2\n")
    unknown = cli("pretrain", split_dir, "--out", tmp_path / "z", "--config", tmp_path / "c.yaml")
    assert unknown.exit_code == 2 and "epochz" in unknown.output
    model = create_model("test_efficientnet", 3, pretrained="none")
    save_checkpoint(tmp_path / "three", model.state_dict(),
                    {"architecture": "test_efficientnet", "classes": ["a", "b", "c"],
                     "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3})
    wrong = cli("evaluate", tmp_path / "three", "--split", split_dir, "--bootstrap", 0)
    assert wrong.exit_code == 2 and "trained for classes" in wrong.output
    missing = cli("evaluate", tmp_path / "nothing", "--split", split_dir)
    assert missing.exit_code == 2 and "not found" in missing.output
    for result in (bad_model, no_hub, unknown, wrong, missing):
        assert "Traceback" not in result.output


def test_hub_failure_points_to_local_file(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("network unreachable")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(FedctError, match="--pretrained FILE"):
        create_model("test_efficientnet", 2, pretrained="hub")


@pytest.mark.slow
def test_real_covid_slice_with_imagenet_weights(tmp_path):
    """A short real run: the ImageNet head-only fit of tf_efficientnet_lite0 on COVID-CT val rows.

    It trains on the rows it is scored on: this checks the real-data wiring (decoding, weights,
    head replacement, scoring), not generalisation; the benchmark measures that.
    """
    require_shared(COVID_CSV)
    require_shared(LITE0_WEIGHTS)
    split = tmp_path / "covid"
    assert cli("split", COVID_CSV, "--keep-split", "--clients", 2, "--out", split).exit_code == 0
    result = cli("pretrain", split, "--out", tmp_path / "run", "--pretrained", LITE0_WEIGHTS,
                 "--epochs", 8, "--image-size", 128, "--freeze", "head", "--rows", "val",
                 "--lr", 0.003, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["best"]["val_auc"] > 0.7
    scored = cli("evaluate", tmp_path / "run" / "best", "--split", split, "--on", "val",
                 "--bootstrap", 100, "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["results"][0]["positive"] == "CT_COVID"


def test_pretrained_plain_state_dict_file_and_a_broken_file(tmp_path):
    import timm

    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "weights.pth")
    assert create_model("test_efficientnet", 2, pretrained=str(tmp_path / "weights.pth"))
    (tmp_path / "broken.safetensors").write_bytes(b"no header here" * 8)
    with pytest.raises(FedctError, match="broken.safetensors: not weights for test_efficientnet"):
        create_model("test_efficientnet", 2, pretrained=str(tmp_path / "broken.safetensors"))


def test_offline_hub_answers_at_once_from_the_cache_or_with_one_line(monkeypatch, tmp_path):
    import timm
    from safetensors.torch import save_file

    from fedct import models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_hub_cached_file", lambda name: None)
    with pytest.raises(FedctError, match="out of reach and they are not in its local cache"):
        create_model("test_efficientnet", 2, pretrained="hub")
    cached = tmp_path / "model.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(cached))
    monkeypatch.setattr(models, "_hub_cached_file", lambda name: str(cached))
    assert create_model("test_efficientnet", 2, pretrained="hub")


def test_pretrain_shows_a_line_per_epoch_and_warns_about_a_lopsided_best(split_dir, tmp_path):
    from fedct.pretrain import lopsided_warning

    result = cli("pretrain", split_dir, "--out", tmp_path / "run", *tiny_flags(epochs=2))
    assert result.exit_code == 0, result.output
    assert "epoch 1/2: train loss" in result.output and "epoch 2/2: train loss" in result.output
    text = " ".join(result.output.split())  # lines wrap at 80 columns
    assert "at its threshold 0.500: it misses most positives" in text  # the chosen one
    epoch = text[text.index("epoch 2/2: train loss"):]
    assert " at 0.5; at threshold " in epoch and "acc" in epoch.split("at threshold")[1]
    assert "sensitivity 0.17 at its threshold 0.400" in lopsided_warning(
        {"thr_sensitivity": 0.17, "thr_specificity": 0.9, "threshold": 0.4,
         "val_sensitivity": 0.9})
    assert lopsided_warning({"thr_sensitivity": 0.7, "thr_specificity": float("nan"),
                             "threshold": 0.5, "val_sensitivity": 0.1}) is None


def test_noise_calibration_prints_no_opacus_warning():
    import warnings

    from fedct.config import FederateConfig
    from fedct.privacy import calibrate_noise

    config = build_config(FederateConfig, None, {"dp": True, "target_epsilon": 50.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calibrate_noise(n_examples=40, total_steps=4, config=config) > 0
