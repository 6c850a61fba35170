"""The federation core without a SuperLink: typed messages, a node's data modes, the checkpoint
tracker, the Opacus internals fedct relies on, and the package layout rules."""

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, write_node_csv

from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.federated import protocol
from fedct.federated.protocol import (
    ClientReply,
    Evaluation,
    Hello,
    RoundSpec,
    RunExtras,
    Status,
    Update,
)
from fedct.runs import CheckpointTracker, read_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "fedct"
SPEC = RoundSpec(round=3, planned_rounds=5, architecture="test_efficientnet",
                 classes=("CT_COVID", "CT_NonCOVID"), positive="CT_COVID", mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.1),
                 groupnorm=True)


def weights():
    return {"a.weight": torch.randn(3, 2), "a.bias": torch.zeros(3),
            "bn.num_batches_tracked": torch.tensor(7)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_message_field_survives_flower_records():
    pytest.importorskip("flwr")
    assert protocol.decode_hello(protocol.encode_hello(Hello(4))) == Hello(4)
    sent = weights()
    got, spec, control = protocol.decode_train(protocol.encode_train(sent, SPEC))
    assert spec == SPEC and same(got, sent) and control == {}
    server_control = {"a.weight": torch.randn(3, 2)}  # SCAFFOLD's c travels beside the weights
    got, _, control = protocol.decode_train(protocol.encode_train(sent, SPEC, server_control))
    assert same(got, sent) and same(control, server_control)
    update = Update(weights=sent, examples=12, metrics={"train_loss": 0.25, "steps": 2.0},
                    control={"a.weight": torch.randn(3, 2)})
    trained = ClientReply(2, update, epsilon=1.5, steps=6, noise=0.9)
    back = protocol.decode_reply(protocol.encode_reply(trained))
    assert back.status is Status.TRAINED and same(back.update.weights, sent)
    assert dataclasses.replace(back, update=None) == dataclasses.replace(trained, update=None)
    assert (back.update.examples, back.update.metrics) == (12, update.metrics)
    assert same(back.update.control, update.control)
    sat_out = ClientReply(1, None, status=Status.SAT_OUT, epsilon=2.0, steps=4, detail="budget")
    assert protocol.decode_reply(protocol.encode_reply(sat_out)) == sat_out
    plain = ClientReply(0, None, status=Status.FAILED)  # None fields stay None
    assert protocol.decode_reply(protocol.encode_reply(plain)) == plain
    scored = Evaluation(3, examples=5, loss_sum=2.5, correct=4, positives=(0, 2, 1),
                        negatives=(1, 1, 0))
    assert protocol.decode_evaluation(protocol.encode_evaluation(scored)) == scored
    empty = Evaluation(1)  # a node without validation rows: empty histograms stay empty
    assert protocol.decode_evaluation(protocol.encode_evaluation(empty)) == empty


def test_run_config_round_trip_keeps_every_option():
    config = build_config(FederateConfig, None, {**TINY, "dp": True, "target_epsilon": 3.0})
    extras = RunExtras(init="/ckpt", out="/run", split_dir="", num_clients=4, resume=True)
    values = protocol.run_config_values(config, extras)
    assert all("_" not in key for key in values)
    assert protocol.split_run_config(values) == (config, extras)
    assert RunExtras().node_wait == protocol.NODE_WAIT_SECONDS


def test_a_node_with_its_own_data_trains_as_the_split_node_does(split_dir, tmp_path):
    from fedct.federated.node import node_round
    from fedct.federated.run_model import model_spec
    from fedct.models import build_model

    config = build_config(FederateConfig, None, {**TINY, "dp": True, "dp_train": "full"})
    spec = dataclasses.replace(SPEC, round=1, planned_rounds=2, groupnorm=True,
                               mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(0)
    start = build_model(model_spec(config, spec.architecture, 2, groupnorm=True)).state_dict()
    own = write_node_csv(split_dir, 1, tmp_path / "site.csv")
    by_data = node_round({"data": str(own), "client-id": 1, "state-dir": str(tmp_path / "a")},
                         7, config, start, spec)
    by_split = node_round({"split": str(split_dir), "client-id": 1,
                           "state-dir": str(tmp_path / "b")}, 7, config, start, spec)
    assert by_data.status is Status.TRAINED and by_data.update.examples > 0
    assert by_data.update.examples == by_split.update.examples
    assert same(by_data.update.weights, by_split.update.weights)
    assert 0 < by_data.epsilon == by_split.epsilon
    saved = torch.load(tmp_path / "a" / "run-7-client-1-round-1.pt", weights_only=True)
    assert saved["steps"] == 2 and saved["accountant"]["history"]


def test_a_node_refuses_data_of_other_classes_and_a_missing_client_id(split_dir, tmp_path):
    from fedct.errors import FedctError
    from fedct.federated.node import node_data

    config = build_config(FederateConfig, None, TINY)
    own = write_node_csv(split_dir, 0, tmp_path / "site.csv")
    other = dataclasses.replace(SPEC, classes=("covid", "normal"))
    with pytest.raises(FedctError, match="site.csv: class 'CT_COVID' is not one the server"):
        node_data({"data": str(own), "client-id": 0}, config, other)
    with pytest.raises(FedctError, match="client-id is missing"):
        node_data({"data": str(own)}, config, SPEC)
    with pytest.raises(FedctError, match="data=PATH"):
        node_data({"client-id": 0}, config, SPEC)


def test_checkpoint_tracker_writes_best_when_the_monitor_is_always_nan(tmp_path):
    tracker = CheckpointTracker(tmp_path, "val_auc", keep_last=2)
    state = {"w": torch.zeros(2)}
    base = {"classes": ["a", "b"], "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    assert tracker.save(1, state, {"architecture": "x", **base}, {"auc": math.nan})
    assert not tracker.save(2, state, {"architecture": "x", **base}, {"auc": math.nan})
    assert read_checkpoint(tmp_path / "best")[1]["architecture"] == "x"
    assert tracker.best_step == 1
    assert tracker.save(3, state, {"architecture": "y", **base}, {"auc": 0.7})
    assert tracker.save(4, state, {"architecture": "z", **base}, {"auc": 0.7}) is False
    assert sorted(p.name for p in tmp_path.glob("round-*.json")) == ["round-0003.json",
                                                                      "round-0004.json"]
    again = CheckpointTracker(tmp_path, "val_auc")
    again.load_state_dict(tracker.state_dict())
    assert (again.best, again.best_step) == (0.7, 3)


def test_the_opacus_internals_fedct_uses_are_there():
    from opacus import GradSampleModule
    from torch.utils.data import DataLoader, TensorDataset

    from fedct import privacy
    from fedct.training import train_epoch

    assert hasattr(GradSampleModule, "_close")
    config = build_config(FederateConfig, None, {"dp": True, "batch_size": 8,
                                                 "physical_batch_size": 2, "noise_multiplier": 1.0})
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))),
                        batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    with privacy.private_training(model, optimizer, loader, noise=1.0, accountant_state={},
                                  config=config, loss_fn=loss_fn) as (dp_loader, dp_opt, result):
        assert hasattr(dp_opt, privacy.SKIPPED_STEP_FLAG)
        trained = train_epoch(model, dp_loader, dp_opt, loss_fn, device=torch.device("cpu"),
                              channels_last=False)
    assert trained["steps"] <= 2 < trained["examples"]  # physical batches are not steps
    assert result["accountant"]["history"]
    assert not any(hasattr(p, a) for p in model.parameters() for a in privacy.PER_SAMPLE_ATTRIBUTES)
    assert not privacy.step_was_skipped(torch.optim.SGD(model.parameters(), lr=0.1))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_layout_rules():
    """No module over 400 lines; federated code does not reach into stage 1's module."""
    for path in PACKAGE.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path
    for path in (PACKAGE / "federated").glob("*.py"):
        assert "fedct.pretrain" not in _imports(path), path


def test_running_average_is_the_examples_weighted_mean_and_keeps_no_update():
    from fedct.federated.strategies.base import RunningAverage

    reference = {"w": torch.zeros(3), "steps": torch.tensor(0)}
    updates = [Update({"w": torch.full((3,), float(v)), "steps": torch.tensor(v)}, n)
               for v, n in ((1, 1), (4, 2), (10, 7))]
    running = RunningAverage(reference)
    for update in updates:
        running.add(update)
        update.weights["w"].fill_(float("nan"))  # the sum holds no reference to an update
    average = running.result()
    assert torch.allclose(average["w"], torch.full((3,), (1 + 8 + 70) / 10))
    assert average["steps"].item() == 10 and average["w"].dtype == torch.float32
    assert RunningAverage(reference).result() is None
