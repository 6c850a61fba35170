"""The Flower ServerApp's main, in process: a grid that hands each message to the real
ClientApp stands in for the SuperLink, so the Flower transport's round (discovery, train
and evaluate messages, their encoding, a node that stops answering) is tested in seconds;
`test_flower` runs the same app on real processes."""

import csv

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


def run_main(split_dir, out, grid=LocalGrid) -> None:
    from fedct.federated.flower_app import main

    config = build_config(FederateConfig, None, SETTINGS)
    grid, server, _ = local_federation(split_dir, out.parent, config, 2, grid=grid,
                                       out=str(out), split_dir=str(split_dir), num_clients=2,
                                       node_wait=5.0, round_timeout=5.0)
    main(grid, server)


def rows(path) -> list[dict]:
    with path.open() as handle:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(handle)]


def test_the_flower_app_in_process_equals_the_embedded_engine(split_dir, tmp_path,
                                                              task_identity):
    run_main(split_dir, tmp_path / "flower" / "run")
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
    assert int(summary[1]["fed_clients"]) == 1  # it is not asked to evaluate either
    assert (tmp_path / "flower" / "run" / "final.safetensors").is_file()
