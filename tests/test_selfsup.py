"""Stage 0: BYOL on unlabelled images, resumable, and a backbone that stage 1 starts from."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import SelfSupConfig
from fedct.configure import build_config
from fedct.errors import FedctError
from fedct.models import create_model

runner = CliRunner()
TINY = {"model": "test_efficientnet", "pretrained": "none", "image_size": 32, "batch_size": 16,
        "epochs": 2, "hidden_dim": 32, "projection_dim": 16}


def test_byol_loss_is_bounded_and_the_target_moves_by_ema_only():
    from fedct.selfsup import Byol

    backbone = create_model("test_efficientnet", 0, pretrained="none")
    model = Byol(backbone, hidden=8, width=4)
    first = torch.rand(4, 3, 32, 32)
    loss = model.loss(first, first.clone())
    assert 0 <= float(loss.detach()) <= 8
    before = next(model.target["projector"].parameters()).clone()
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(1.0)
    model.update_target(0.75)
    after = next(model.target["projector"].parameters())
    online = next(model.projector.parameters())
    assert torch.allclose(after, 0.75 * before + 0.25 * online)
    assert not any(p.requires_grad for p in model.target.parameters())


def test_selfsup_trains_resumes_exactly_and_stage1_starts_from_it(synth_dir, tmp_path,
                                                                  monkeypatch):
    from fedct import selfsup

    config = build_config(SelfSupConfig, None, TINY)
    images = synth_dir / "dataset.csv"  # labels in it are ignored
    report = selfsup.run_selfsup([images], tmp_path / "a", config, quiet=True)
    assert report["epochs"] == 2 and report["images"] == 160 and 0 <= report["final_loss"] <= 8
    rows = (tmp_path / "a" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 3
    backbone_file = tmp_path / "a" / "backbone.safetensors"
    with safe_open(backbone_file, "pt") as handle:
        assert handle.metadata()["fedct_objective"] == "byol"
    trained = load_file(backbone_file)
    start = create_model("test_efficientnet", 0, pretrained="none").state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k in start)

    real_save = selfsup.save_resume

    def dies_after_first_epoch(out, state):
        real_save(out, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(selfsup, "save_resume", dies_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        selfsup.run_selfsup([images], tmp_path / "b", config, quiet=True)
    monkeypatch.setattr(selfsup, "save_resume", real_save)
    resumed = runner.invoke(app, ["selfsup", "--resume", str(tmp_path / "b"), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["epochs"] == 2
    again = load_file(tmp_path / "b" / "backbone.safetensors")
    assert all(torch.equal(trained[k], again[k]) for k in trained)

    model = create_model("test_efficientnet", 2, pretrained=str(backbone_file))
    assert torch.equal(model.conv_stem.weight, trained["conv_stem.weight"])
    with pytest.raises(FedctError, match="not weights for resnet18"):
        create_model("resnet18", 2, pretrained=str(backbone_file))


def test_selfsup_refusals(synth_dir, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for name in sorted((synth_dir / "CT_COVID").glob("*.png"))[:3]:
        (few / name.name).write_bytes(name.read_bytes())
    result = runner.invoke(app, ["selfsup", str(few), "--out", str(tmp_path / "run"),
                                 "--model", "test_efficientnet", "--pretrained", "none"])
    assert result.exit_code == 2 and "3 images; self-supervised pretraining needs at least 4" \
        in result.output
    missing = runner.invoke(app, ["selfsup", "--out", str(tmp_path / "run")])
    assert missing.exit_code == 2 and "INPUTS and --out" in missing.output
    with pytest.raises(FedctError, match=r"target_decay 1.5: must be in \(0, 1\]"):
        build_config(SelfSupConfig, None, {"target_decay": 1.5})
    with pytest.raises(FedctError, match="unknown key 'threshold'"):
        build_config(SelfSupConfig, None, {"threshold": "0.5"})
