"""Secure aggregation: Flower's SecAgg+ around fedct's client and server steps.

In process, a grid that hands each message to the real ClientApp (its SecAgg+ mod included)
shows what reaches the coordinator: no update in the clear, only the mean, and that mean
equal to the plain mean within the quantisation bound; a node that drops out during a
round does not block it. On loopback (the shared federation of three SuperNodes), a whole
secure run against the embedded engine.
"""

import numpy as np
import pytest
import torch
from conftest import TINY, local_federation

from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.data.manifest import SplitOptions, run_split
from fedct.errors import FedctError
from fedct.federated import secure
from fedct.federated.node import node_round
from fedct.federated.setup import planned_rounds, prepare_setup, sample_schedule
from fedct.federated.strategies.base import RunningAverage

pytest.importorskip("flwr")
CLIENTS = 3


@pytest.fixture(scope="module")
def split_dir(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssplit") / "split"
    run_split(synth_dir / "dataset.csv", out, SplitOptions(scheme="iid", clients=CLIENTS, seed=0))
    return out


@pytest.fixture(autouse=True)
def in_process(task_identity):
    """Every test here calls ClientApps in this process."""


def secure_round(grid, server, node_of, setup, weights, control):
    schedule = sample_schedule(CLIENTS, setup.config)
    result = secure.train_on_nodes(grid, server, node_of, setup, schedule,
                                   planned_rounds(schedule, CLIENTS), 60.0, 1, weights, control)
    return result.replies, result.secure_sum


def bound(config, examples: list[int], largest: float) -> float:
    """How far SecAgg+'s mean may lie from the exact one: each node's stochastic rounding
    (at most one step of 2 clip / Q) over the sum of the quantised weights, plus the
    rounding of each weight n / max_weight to a multiple of 1 / Q."""
    q = 2 ** 22
    ratios = [round(n / config.secagg_max_weight * q) / q for n in examples]
    step = 2 * config.secagg_clip / q
    return len(examples) * step / sum(ratios) + 2 * largest * max(0.5 / (r * q) for r in ratios)


PRIVATE = {"dp": True, "dp_train": "full", "target_epsilon": 5.0, "fedbn": True,
           "strategy": "scaffold"}


@pytest.mark.parametrize("extra", [{}, PRIVATE], ids=["fedavg", "dp-fedbn-scaffold"])
def test_coordinator_gets_only_the_mean_and_it_equals_the_plain_mean(split_dir, tmp_path, extra):
    from fedct.federated import strategies
    from fedct.models import norm_keys

    config = build_config(FederateConfig, None, {**TINY, **extra, "secure_aggregation": True,
                                                 "secagg_clip": 1.0})
    setup = prepare_setup(config, init="none", split_dir=split_dir)
    weights = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    strategy = strategies.get(config.strategy)
    local = norm_keys(setup.model) if config.fedbn else set()
    control = strategy.message(strategy.ready_state({}, setup.model, local_keys=local))
    grid, server, node_of = local_federation(split_dir, tmp_path / "secure", setup.config, CLIENTS)
    replies, summed = secure_round(grid, server, node_of, setup, weights, control)

    assert [r.client_id for r in replies] == [0, 1, 2]
    assert all(r.summed_securely and r.update.weights == {} for r in replies)
    for message in grid.received:  # setup, key shares, masked vectors, unmasking
        assert all(len(record) == 0 for record in message.content.array_records.values())

    plain = RunningAverage(weights)
    examples, largest = [], 0.0
    for k in range(CLIENTS):
        spec = setup.round_spec(1, config.rounds)
        reply = node_round({"client-id": k, "split": str(split_dir),
                            "state-dir": str(tmp_path / f"plain{k}")}, 1, setup.config, weights,
                           spec, control=control)
        assert reply.epsilon == replies[k].epsilon  # the same training, DP noise included
        plain.add(reply.update)
        examples.append(reply.update.examples)
        largest = max(largest, *(float((reply.update.weights[n].double() - w.double()).abs().max())
                                 for n, w in weights.items()),
                      *(float(c.abs().max()) for c in reply.update.control.values()))
    assert summed.examples == sum(examples) and summed.count == CLIENTS
    exact = plain.result()
    gap = max(float((summed.weights[n].double() - exact[n].double()).abs().max())
              for n in weights if weights[n].is_floating_point())
    for key, value in plain.control_sum.items():  # SCAFFOLD's control changes, summed securely
        gap = max(gap, float((summed.control[key] - value / plain.examples).abs().max()))
    limit = bound(setup.config, examples, largest)
    print(f"secure mean vs plain mean, {extra or 'fedavg'}: {gap:.2e} (bound {limit:.2e}, "
          f"examples {examples}, largest change {largest:.3g})")
    assert gap <= limit, (gap, limit)
    assert limit < 1e-4


def test_a_node_that_drops_out_after_masking_does_not_block_the_round(split_dir, tmp_path):
    config = build_config(FederateConfig, None, {**TINY, "secure_aggregation": True})
    setup = prepare_setup(config, init="none", split_dir=split_dir)
    weights = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    grid, server, node_of = local_federation(split_dir, tmp_path, setup.config, CLIENTS)
    send = grid.send_and_receive

    def dies_after_masking(messages, timeout=None):
        replies = send(messages, timeout)
        if any("fitins.parameters" in m.content.array_records for m in messages):
            grid.dead.add(node_of[2])  # its masked vector is in; it never unmasks
        return replies

    grid.send_and_receive = dies_after_masking
    replies, summed = secure_round(grid, server, node_of, setup, weights, {})
    assert summed is not None and summed.count == CLIENTS  # its update is in the sum
    assert all(torch.isfinite(v).all() for v in summed.weights.values() if v.is_floating_point())


def test_secure_aggregation_refuses_the_embedded_engine_and_two_clients(split_dir, tmp_path):
    from fedct.federated.simulation import run_federate

    config = build_config(FederateConfig, None, {**TINY, "secure_aggregation": True})
    with pytest.raises(FedctError, match="needs --engine flower"):
        run_federate(split_dir, tmp_path / "x", config, init="none", quiet=True)
    with pytest.raises(FedctError, match="at least 3"):
        sample_schedule(3, build_config(FederateConfig, None, {**TINY, "secure_aggregation": True,
                                                                "clients_per_round": 2}))
    with pytest.raises(FedctError, match="secagg_threshold"):
        build_config(FederateConfig, None, {"secagg_threshold": 1.5})
    assert np.isfinite(bound(config, [50, 60], 0.1))


# pooled val only: the clients' evaluation in a secure run is tested in process
SECURE = {"model": "test_efficientnet", "image-size": 32, "batch-size": 16, "lr": 0.003,
          "rounds": 1, "local-steps": 2, "seed": 3, "secure-aggregation": True, "secagg-clip": 1.0,
          "val": "pooled"}


@pytest.mark.slow
def test_secure_flower_run_equals_the_embedded_run_within_the_bound(loopback, tmp_path):
    import yaml
    from test_flower import run_embedded

    from fedct.runs import read_checkpoint

    plain = {k: v for k, v in SECURE.items() if not k.startswith("secure")
             and not k.startswith("secagg")}
    embedded = run_embedded(loopback.split, tmp_path / "embedded", plain)
    proc = loopback.submit(loopback.split, tmp_path / "run", settings=SECURE)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    assert "3 nodes answered" in output
    secured, _ = read_checkpoint(tmp_path / "run" / "final")
    expected, _ = read_checkpoint(embedded / "final")
    clients = yaml.safe_load((loopback.split / "split.yaml").read_text())["clients"]
    examples = [sum(c["train"].values()) for c in clients]
    config = build_config(FederateConfig, None, {"secagg_clip": 1.0})
    largest = max(float((secured[k].double() - expected[k].double()).abs().max())
                  for k in expected if expected[k].is_floating_point())
    limit = bound(config, examples, 1.0)
    print(f"secure Flower run vs embedded run: {largest:.2e} (bound {limit:.2e})")
    assert largest <= limit, (largest, limit)
    for key in expected:
        if not expected[key].is_floating_point():
            assert torch.equal(secured[key], expected[key]) or key.endswith("num_batches_tracked")


def test_a_node_that_dies_as_it_masks_does_not_block_a_secure_run(split_dir, tmp_path):
    """The whole run driver over the secure transport, in process: node 2 dies when the
    masked-update stage reaches it; the round completes on the others' key shares and the
    run finishes with their sum."""
    import io

    from rich.console import Console

    from fedct.federated.engine import run_rounds
    from fedct.federated.flower_app import SecureFlowerTransport
    from fedct.federated.setup import eval_schedule
    from fedct.federated.view import RoundView

    config = build_config(FederateConfig, None, {**TINY, "rounds": 1, "secure_aggregation": True})
    setup = prepare_setup(config, init="none", split_dir=split_dir)
    grid, server, node_of = local_federation(split_dir, tmp_path, setup.config, CLIENTS)
    send = grid.send_and_receive

    def dies_as_it_masks(messages, timeout=None):
        if any("fitins.parameters" in m.content.array_records for m in messages):
            grid.dead.add(node_of[2])
        return send(messages, timeout)

    grid.send_and_receive = dies_as_it_masks
    schedule = sample_schedule(CLIENTS, setup.config)
    transport = SecureFlowerTransport(grid, server, node_of, setup, schedule,
                                      planned_rounds(schedule, CLIENTS), 60.0)
    text = io.StringIO()
    view = RoundView(Console(file=text, width=120), rounds=1, dp=False, live=False,
                     client_lines=True, federated=False)
    run_rounds(setup, tmp_path / "run", transport, num_clients=CLIENTS, schedule=schedule,
               eval_plan=eval_schedule(CLIENTS, setup.config), device=torch.device("cpu"),
               view=view)
    rows = (tmp_path / "run" / "summary.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["1", "2"]], text.getvalue()
    assert "client 2 failed: dropped out of the secure round" in text.getvalue()
    assert (tmp_path / "run" / "final.safetensors").is_file()


def test_a_secure_rounds_evaluation_is_the_next_rounds_roll_call(split_dir, tmp_path):
    """SecAgg+ rounds evaluate on their own (its stages carry nothing else), and the nodes
    that answer the evaluation are the next round's roll call: one query exchange in a run
    of two rounds, not one a round."""
    from rich.console import Console

    from fedct.federated.engine import run_rounds
    from fedct.federated.flower_app import SecureFlowerTransport
    from fedct.federated.setup import eval_schedule
    from fedct.federated.view import RoundView

    config = build_config(FederateConfig, None, {**TINY, "secure_aggregation": True})
    setup = prepare_setup(config, init="none", split_dir=split_dir)
    grid, server, node_of = local_federation(split_dir, tmp_path, setup.config, CLIENTS)
    schedule = sample_schedule(CLIENTS, setup.config)
    transport = SecureFlowerTransport(grid, server, node_of, setup, schedule,
                                      planned_rounds(schedule, CLIENTS), 60.0)
    run_rounds(setup, tmp_path / "run", transport, num_clients=CLIENTS, schedule=schedule,
               eval_plan=eval_schedule(CLIENTS, setup.config), device=torch.device("cpu"),
               view=RoundView(Console(quiet=True), rounds=2, dp=False, live=False,
                              client_lines=True, federated=False))
    kinds = [set(exchange) for exchange in grid.exchanges]
    assert kinds.count({"query"}) == 1 and kinds[0] == {"query"}
    assert kinds.count({"evaluate"}) == 2 and kinds[-1] == {"evaluate"}
    rows = (tmp_path / "run" / "summary.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["1", "3"], ["2", "3"]]


def test_dry_run_prints_the_secure_run(split_dir, tmp_path):
    from typer.testing import CliRunner

    from fedct.cli import app

    result = CliRunner().invoke(app, ["federate", str(split_dir), "--init", "none", "--model",
                                      "test_efficientnet", "--out", str(tmp_path / "run"),
                                      "--engine", "flower", "--federation", "hospitals",
                                      "--dry-run", "--secure-aggregation", "--secagg-clip", "0.5"])
    assert result.exit_code == 0, result.output
    assert "# secure aggregation (SecAgg+)" in result.output
    assert "secure_aggregation: true" in result.output and "secagg_clip: 0.5" in result.output
    assert result.output.count("fedct node --root-certificates") == CLIENTS
