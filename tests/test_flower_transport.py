"""The Flower ServerApp's main, in process: a grid that hands each message to the real
ClientApp stands in for the SuperLink, so the Flower transport's round (discovery, train
and evaluate messages, their encoding, a node that stops answering) is tested in seconds;
`test_flower` runs the same app on real processes."""

import csv
import json

import pytest
import torch
from conftest import TINY, LocalGrid, local_federation

from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.federated.simulation import run_federate
from fedct.runs import read_checkpoint

pytest.importorskip("flwr")
SETTINGS = {**TINY, "seed": 3}


@pytest.fixture(scope="module")
def split_dir(synth_dir, tmp_path_factory):
    from conftest import make_split

    return make_split(synth_dir, tmp_path_factory.mktemp("tsplit") / "split", local_val=0.25)


class LosesNode1AfterRound1(LocalGrid):
    def send_and_receive(self, messages, timeout=None):
        if any(m.metadata.message_type == "train" and m.metadata.group_id == "2"
               for m in messages):
            self.dead.add(101)
        return super().send_and_receive(messages, timeout)


def run_main(split_dir, out, grid=LocalGrid, settings=SETTINGS, clients=2, run_id=1,
             resume=False) -> LocalGrid:
    from fedct.federated.flower_app import main

    config = build_config(FederateConfig, None, settings)
    grid, server, _ = local_federation(split_dir, out.parent, config, clients, grid=grid,
                                       run_id=run_id, out=str(out), split_dir=str(split_dir),
                                       num_clients=clients, node_wait=5.0, round_timeout=5.0,
                                       resume=resume)
    main(grid, server)
    return grid


def rows(path) -> list[dict]:
    with path.open() as handle:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(handle)]


def test_the_flower_app_in_process_equals_the_embedded_engine(split_dir, tmp_path,
                                                              task_identity):
    grid = run_main(split_dir, tmp_path / "flower" / "run")
    # round 1's evaluation rides with round 2's train messages; the last round's goes alone
    assert grid.exchanges == [["query"] * 2, ["train"] * 2, ["train+evaluate"] * 2,
                              ["evaluate"] * 2]
    run_federate(split_dir, tmp_path / "embedded", build_config(FederateConfig, None, SETTINGS),
                 init="none", quiet=True)
    flower, meta = read_checkpoint(tmp_path / "flower" / "run" / "final")
    expected, _ = read_checkpoint(tmp_path / "embedded" / "final")
    assert meta["engine"] == "flower" and flower.keys() == expected.keys()
    assert all(torch.equal(flower[k], expected[k]) for k in expected)
    for name in ("summary.csv", "clients.csv"):
        assert rows(tmp_path / "flower" / "run" / name) == rows(tmp_path / "embedded" / name)


def test_a_node_lost_after_round_1_fails_its_part_and_the_run_goes_on(split_dir, tmp_path,
                                                                     task_identity, capsys):
    run_main(split_dir, tmp_path / "flower" / "run", grid=LosesNode1AfterRound1)
    output = capsys.readouterr().out
    summary = rows(tmp_path / "flower" / "run" / "summary.csv")
    assert [(r["round"], r["clients"]) for r in summary] == [("1", "2"), ("2", "1")], output
    assert "client 1 failed: no reply within 5s" in output
    # node 1 died on the message that carried round 1's evaluation and round 2's training
    assert [int(r["fed_clients"]) for r in summary] == [1, 1]
    assert int(summary[1]["fed_clients"]) == 1  # it is not asked to evaluate either
    assert (tmp_path / "flower" / "run" / "final.safetensors").is_file()


def test_sampled_rounds_evaluate_with_the_next_training_where_they_can(synth_dir, tmp_path,
                                                                       task_identity):
    """Two of three clients train each round, two score each round, FedBN keeps norms
    local: a client asked that trains next scores before it trains, in one message; one that
    does not gets an evaluate message in the same exchange; the run equals the embedded one."""
    from conftest import make_split

    split_dir = make_split(synth_dir, tmp_path / "split", clients=3, local_val=0.25)
    settings = {**TINY, "seed": 0, "rounds": 3, "clients_per_round": 2, "eval_fraction": 0.67,
                "fedbn": True}
    # training [1, 2], [0, 1], [1, 2]; scoring [1, 2], [0, 1], [0, 1] (seed 0)
    grid = run_main(split_dir, tmp_path / "flower" / "run", settings=settings, clients=3)
    assert grid.exchanges == [["query"] * 3, ["train"] * 2,
                              ["train", "train+evaluate", "evaluate"],
                              ["train+evaluate", "train", "evaluate"], ["evaluate"] * 2]
    run_federate(split_dir, tmp_path / "embedded", build_config(FederateConfig, None, settings),
                 init="none", quiet=True)
    flower, _ = read_checkpoint(tmp_path / "flower" / "run" / "final")
    expected, _ = read_checkpoint(tmp_path / "embedded" / "final")
    assert all(torch.equal(flower[k], expected[k]) for k in expected)
    for name in ("summary.csv", "clients.csv"):
        assert rows(tmp_path / "flower" / "run" / name) == rows(tmp_path / "embedded" / name)


class CoordinatorLostInRound3(LocalGrid):
    """The nodes train round 3 (with round 2's evaluation); the coordinator dies before it
    hears back, so it has recorded round 1 only."""

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        if any(m.metadata.message_type == "train" and m.metadata.group_id == "3"
               for m in messages):
            raise ConnectionError("coordinator lost")
        return replies


def test_a_resumed_flower_run_finds_the_nodes_state_and_replays_what_was_not_recorded(
        split_dir, tmp_path, task_identity):
    """A resumed run is a new Flower run (another run id): the nodes find their state under
    the run's key from the coordinator's resume state and train the replayed rounds from
    their state before those rounds (FedBN layers, SCAFFOLD control): the weights equal an
    uninterrupted run's. Under DP every update a node sent still counts: a node whose
    budget the unrecorded rounds spent sits the replayed rounds out."""
    from fedct.runs import load_resume

    for name, extra in (("plain", {}), ("dp", {"dp": True, "dp_train": "full",
                                               "target_epsilon": 50.0})):
        settings = {**SETTINGS, "rounds": 3, "fedbn": True, "strategy": "scaffold", **extra}
        out = tmp_path / name / "flower" / "run"
        with pytest.raises(ConnectionError):
            run_main(split_dir, out, grid=CoordinatorLostInRound3, settings=settings)
        assert load_resume(out)["round"] == 1
        run_main(split_dir, out, settings=settings, run_id=2, resume=True)
        key = load_resume(out)["extra"]["run_key"]
        states = sorted(p.name for p in (tmp_path / name / "flower" / "state0").iterdir())
        assert states == [f"run-{key}-client-0-round-{r}.pt" for r in (1, 2, 3)]
        if not extra:
            run_federate(split_dir, tmp_path / name / "embedded",
                         build_config(FederateConfig, None, settings), init="none", quiet=True)
            flower, _ = read_checkpoint(out / "final")
            expected, _ = read_checkpoint(tmp_path / name / "embedded" / "final")
            assert all(torch.equal(flower[k], expected[k]) for k in expected)
    privacy = rows(out / "privacy.csv")  # the DP run: its three rounds' budget was spent
    assert [(r["round"], r["status"]) for r in privacy] == [
        ("1", "trained"), ("1", "trained"), ("2", "sat out"), ("2", "sat out"),
        ("3", "sat out"), ("3", "sat out")]
    # what the nodes spent, not what the coordinator had recorded (27 after round 1)
    assert all(float(r["epsilon"]) == pytest.approx(50.0, abs=0.01) for r in privacy[2:])
    assert json.loads((out / "report.json").read_text())["max_epsilon"] == pytest.approx(
        50.0, abs=0.01)


class NoNodeAnswers(LocalGrid):
    def get_node_ids(self):
        return []


def test_a_run_that_no_node_answers_stops_before_any_round(split_dir, tmp_path, task_identity):
    """Rounds without a client would be recorded as a run (and, resumed, finish one with
    the global model unchanged): the coordinator stops instead, naming what to start."""
    from fedct.errors import FedctError

    out = tmp_path / "run"
    with pytest.raises(FedctError, match="0 nodes answered within 5s, fewer than min_clients 1"):
        run_main(split_dir, out, grid=NoNodeAnswers)
    assert not (out / "summary.csv").exists() and not (out / "resume.pt").exists()
