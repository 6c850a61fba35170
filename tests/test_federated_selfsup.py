"""Stage 0 through the federated rounds (`fedct federate --objective byol`): the clients'
images without their labels, resumable, and a backbone that stage 1 starts from."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.errors import FedctError
from fedct.federated.simulation import run_federate
from fedct.models import create_model
from fedct.runs import load_resume

runner = CliRunner()
BYOL = {"objective": "byol", "model": "test_efficientnet", "image_size": 32, "batch_size": 16,
        "rounds": 3, "local_steps": 2, "hidden_dim": 32, "projection_dim": 16, "seed": 2}


def test_federated_byol_trains_resumes_exactly_and_stage1_starts_from_it(split_dir, tmp_path):
    config = build_config(FederateConfig, None, BYOL)
    report = run_federate(split_dir, tmp_path / "a", config, init="none", quiet=True)
    assert report["objective"] == "byol" and report["monitor"] == "train_loss"
    assert report["final"]["clients"] == 2 and 0 <= report["final"]["train_loss"] <= 8
    assert report["final"]["val_auc"] is None  # no label was read, nothing was scored
    backbone_file = tmp_path / "a" / "backbone.safetensors"
    with safe_open(backbone_file, "pt") as handle:
        header = handle.metadata()
    assert header["fedct_objective"] == "byol" and header["fedct_engine"] == "embedded"
    trained = load_file(backbone_file)
    final = load_resume(tmp_path / "a")["weights"]
    assert all(torch.equal(trained[k], final[f"backbone.{k}"]) for k in trained)
    assert {k.split(".")[0] for k in final} == {"backbone", "projector", "predictor"}
    start = create_model("test_efficientnet", 0, pretrained="none").state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    assert not (tmp_path / "a" / "MODEL_CARD.md").exists()  # a backbone is no classifier

    # stopped after round 1, resumed from the command line: the same backbone to the bit
    run_federate(split_dir, tmp_path / "b", config, init="none", quiet=True, stop_after=1)
    resumed = runner.invoke(app, ["federate", "--resume", str(tmp_path / "b"), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["rounds"] == 3
    again = load_file(tmp_path / "b" / "backbone.safetensors")
    assert all(torch.equal(trained[k], again[k]) for k in trained)

    model = create_model("test_efficientnet", 2, pretrained=str(backbone_file))
    assert torch.equal(model.conv_stem.weight, trained["conv_stem.weight"])
    pretrain = runner.invoke(app, ["pretrain", str(split_dir), "--out", str(tmp_path / "s1"),
                                   "--model", "test_efficientnet", "--image-size", "32",
                                   "--epochs", "1", "--pretrained", str(backbone_file)])
    assert pretrain.exit_code == 0, pretrain.output


def test_federated_byol_reads_no_labels():
    """A client's update from the same images under other labels is the same to the bit,
    and so is the target network it keeps for its next round."""
    from fedct.data.loading import ImageTensorDataset, make_transform
    from fedct.federated.client import ClientData, client_update, new_client_state
    from fedct.federated.run_model import model_spec
    from fedct.models import build_model, data_config

    config = build_config(FederateConfig, None, {**BYOL, "image_size": 32})
    model = build_model(model_spec(config, "test_efficientnet", 2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    transform = make_transform(data_cfg=data_config(model.backbone, 32), train=True,
                               config=config)
    images = torch.randint(0, 255, (24, 1, 40, 40), dtype=torch.uint8)
    updates, states = [], []
    for labels in ([0] * 12 + [1] * 12, [1, 0] * 12):
        data = ClientData(0, ImageTensorDataset(images, labels, transform))
        update, state = client_update(model, start, data, config, new_client_state(config),
                                      round_number=1, device=torch.device("cpu"), num_classes=2)
        updates.append(update)
        states.append(state)
    assert updates[0].metrics == updates[1].metrics
    assert all(torch.equal(updates[0].weights[k], updates[1].weights[k]) for k in start)
    assert any(not torch.equal(updates[0].weights[k], start[k]) for k in start)
    # the client keeps its target (backbone and projector) for its next round
    target = states[0]["byol_target"]
    assert {k.split(".")[0] for k in target} == {"backbone", "projector"}
    assert all(torch.equal(target[k], states[1]["byol_target"][k]) for k in target)
    assert any(not torch.equal(target[k], start[k]) for k in target)


@pytest.mark.parametrize(("flags", "message"), [
    (["--dp"], "dp: objective byol has no DP mode"),
    (["--fedbn"], "fedbn: with objective byol the backbone"),
    (["--balance", "sampler"], "balance 'sampler': objective byol reads no labels"),
    (["--monitor", "val_auc"], "monitor 'val_auc': objective byol reads no labels"),
    (["--freeze", "head"], "freeze 'head': objective byol"),
    (["--target-decay", "1.5"], r"target_decay 1.5: must be in (0, 1]"),
])
def test_federated_byol_refuses_what_it_cannot_honour(split_dir, tmp_path, flags, message):
    result = runner.invoke(app, ["federate", str(split_dir), "--init", "none", "--out",
                                 str(tmp_path / "run"), "--objective", "byol", *flags])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_a_byol_checkpoint_is_not_taken_for_a_classifier(split_dir, tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**BYOL, "rounds": 1}.items()]
    made = runner.invoke(app, ["federate", str(split_dir), "--init", "none", "--out",
                               str(tmp_path / "run"), *flags])
    assert made.exit_code == 0, made.output
    assert "round 1/1: 2 clients, BYOL loss" in made.output
    assert "final (round 1): BYOL loss" in made.output and "val AUC" not in made.output
    final = tmp_path / "run" / "final"
    hint = f"start from {tmp_path / 'run' / 'backbone.safetensors'}"
    evaluated = runner.invoke(app, ["evaluate", str(final), "--split", str(split_dir)])
    assert evaluated.exit_code == 2 and "objective byol" in evaluated.output
    assert hint in evaluated.output.replace("\n", "")
    with pytest.raises(FedctError, match="has no classifier"):
        create_model("test_efficientnet", 2, pretrained=str(final))
    again = runner.invoke(app, ["federate", str(split_dir), "--init", str(final), "--out",
                                str(tmp_path / "stage2")])
    assert again.exit_code == 2 and "has no classifier" in again.output


def test_a_byol_coordinator_needs_no_split_and_its_nodes_no_labels(synth_dir, tmp_path):
    """A hospital's unlabelled scans in any folder layout train; the coordinator, without
    a split, stands one class for all (the rows' labels are never read)."""
    import dataclasses

    from fedct.federated.node import node_data
    from fedct.federated.setup import UNLABELLED, prepare_setup

    config = build_config(FederateConfig, None, {**BYOL, "image_size": 32})
    setup = prepare_setup(config, init="none")
    assert setup.classes == list(UNLABELLED) and setup.split is None
    assert setup.config.monitor == "train_loss"
    scans = tmp_path / "scans"
    for folder in ("ward-a", "ward-b"):  # folder names that are no class of any run
        (scans / folder).mkdir(parents=True)
        for image in sorted((synth_dir / "CT_COVID").glob("*.png"))[:3]:
            (scans / folder / image.name).write_bytes(image.read_bytes())
    spec = dataclasses.replace(setup.round_spec(1, 2), classes=tuple(UNLABELLED))
    data = node_data({"data": str(scans), "client-id": 0}, config, spec)
    assert len(data.train) == 6 and data.train.labels.tolist() == [0] * 6
    assert data.train[0][0].shape == (2, 3, 32, 32)  # two BYOL views of each scan
    supervised = build_config(FederateConfig, None, {"image_size": 32})
    with pytest.raises(FedctError, match="class 'ward-a' is not one the server trains"):
        node_data({"data": str(scans), "client-id": 0}, supervised, spec)
    with pytest.raises(FedctError, match="without a split the classes must come from"):
        prepare_setup(supervised, init="none")
