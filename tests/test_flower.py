"""fedct on Flower's Deployment Engine, on 127.0.0.1.

One federation (`loopback`: a SuperLink over TLS and 3 SuperNodes, each reading its own
CSVs) serves every run that leaves it whole; the final weights must equal the embedded
engine's bit for bit for the same seed and config, with DP, FedBN and SCAFFOLD too, and so
must the federated validation (summary.csv, clients.csv): one code path, two engines. A
node killed mid-run is tested once on real processes (its own federation) and otherwise
in process, on a grid that drops the node (`test_secure`, `test_flower_transport`); a
coordinator stopped mid-run (`flwr stop`) resumes on the shared federation's nodes.
"""

import csv
import json
import subprocess

import pytest
import torch
from conftest import BIN, LOOPBACK_CLIENTS, Federation, make_split, wait_until
from safetensors.torch import load_file

from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.federated.simulation import run_federate
from fedct.runs import load_resume, read_checkpoint

pytest.importorskip("flwr")
pytestmark = pytest.mark.slow
SETTINGS = {"model": "test_efficientnet", "image-size": 32, "batch-size": 16, "lr": 0.003,
            "rounds": 2, "local-steps": 2, "seed": 3}
DP_FEDBN = {**SETTINGS, "dp": True, "dp-train": "full", "target-epsilon": 5.0, "fedbn": True,
            "strategy": "scaffold", "local-loss": "balanced-softmax"}
CLIENT_SCOPES = {"all", *(f"client {k}" for k in range(LOOPBACK_CLIENTS))}


def run_embedded(split_dir, out, settings: dict, init: str = "none"):
    config = build_config(FederateConfig, None, {k.replace("-", "_"): v for k, v in settings.items()})
    run_federate(split_dir, out, config, init=init, quiet=True)
    return out


@pytest.fixture(scope="module")
def starting_checkpoint(loopback, tmp_path_factory):
    """A one-round embedded run's final checkpoint: where a coordinator without data
    learns the classes."""
    out = tmp_path_factory.mktemp("start") / "run"
    return run_embedded(loopback.split, out, {**SETTINGS, "rounds": 1}) / "final"


def without_seconds(path) -> list[dict]:
    with path.open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def run_and_compare(tmp_path, federation: Federation, embedded, settings: dict,
                    coordinator_split: bool = True, init: str = "none") -> tuple[dict, str]:
    """A Flower run on `federation` against the embedded run in `embedded`; returns the
    Flower run's report and output."""
    proc = federation.submit(federation.split if coordinator_split else None, tmp_path / "run",
                             settings=settings, init=init)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    rounds, everyone = settings["rounds"], ", ".join(str(k) for k in range(LOOPBACK_CLIENTS))
    assert f"{LOOPBACK_CLIENTS} nodes answered" in output
    assert f"round 1/{rounds}: training on clients {everyone}" in output
    assert f"client {LOOPBACK_CLIENTS - 1}: trained" in output
    flower, meta = read_checkpoint(tmp_path / "run" / "final")
    expected, _ = read_checkpoint(embedded / "final")
    assert meta["engine"] == "flower"
    assert flower.keys() == expected.keys()
    for key in expected:
        assert torch.equal(expected[key], flower[key]), key  # a difference of exactly 0.0
    # the same federated validation, pooled and per client, and the same operating point
    summary = without_seconds(tmp_path / "run" / "summary.csv")
    assert summary == without_seconds(embedded / "summary.csv")
    assert len(summary) == rounds and int(summary[0]["fed_examples"]) > 0
    clients = (tmp_path / "run" / "clients.csv").read_text()
    assert clients == (embedded / "clients.csv").read_text()
    assert clients.count("\n") == 1 + rounds * LOOPBACK_CLIENTS
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["rounds"] == rounds
    embedded_report = json.loads((embedded / "report.json").read_text())
    for point in ("operating_point", "patient_operating_point"):
        assert report[point] == embedded_report[point]
    return report, output


def test_dp_fedbn_scaffold_on_hospital_data_equals_embedded_and_scores_cross_site(
        loopback, tmp_path):
    """Each node reads its own CSV (data=, as at a hospital), keeps its accountant, FedBN
    layers and SCAFFOLD control variate in its state-dir across rounds, trains with a
    prior-corrected loss, and the result is the embedded engine's. Then the run's final
    checkpoint is scored on each node's own val rows over Flower: the same per-hospital
    and pooled figures as `fedct evaluate --per-client` on the split."""
    expected = run_embedded(loopback.split, tmp_path / "embedded", DP_FEDBN)
    report, output = run_and_compare(tmp_path, loopback, expected, DP_FEDBN)
    embedded_report = json.loads((tmp_path / "embedded" / "report.json").read_text())
    assert report["epsilon"] == embedded_report["epsilon"] and 0 < report["max_epsilon"] <= 5.0
    assert report["best_round"] == embedded_report["best_round"]
    run_key = load_resume(tmp_path / "run")["extra"]["run_key"]  # the nodes' state key
    for k in range(LOOPBACK_CLIENTS):
        state = torch.load(loopback.tmp / f"state{k}" / f"run-{run_key}-client-{k}-round-2.pt",
                           weights_only=True)
        assert state["rounds"] == 2 and state["norms"] and state["accountant"]["history"]
        assert state["control"] and not state["control"].keys() & state["norms"].keys()

    checkpoint = tmp_path / "run" / "final"
    proc = subprocess.run(
        [str(BIN / "fedct"), "evaluate", str(checkpoint), "--engine", "flower",
         "--federation", "loopback", "--on", "val", "--bootstrap", "50", "--out",
         str(tmp_path / "cross-site"), "--json"],
        env=loopback.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flower = {r["data"]: r for r in json.loads(proc.stdout)["results"]}
    local = subprocess.run(
        [str(BIN / "fedct"), "evaluate", str(checkpoint), "--split", str(loopback.split),
         "--on", "local_val", "--per-client", "--bootstrap", "0", "--json"],
        capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr
    expected_rows = {r["data"]: r for r in json.loads(local.stdout)["results"]}
    assert flower.keys() == expected_rows.keys() == CLIENT_SCOPES
    for scope, row in flower.items():
        assert row["n"] == expected_rows[scope]["n"]
        assert row["positives"] == expected_rows[scope]["positives"]
        for at in ("chosen", "threshold_0.5"):
            for metric in ("accuracy", "sensitivity", "specificity", "precision"):
                assert row[at][metric] == pytest.approx(expected_rows[scope][at][metric]), \
                    (scope, at, metric)
    assert abs(flower["all"]["chosen"]["auc"] - expected_rows["all"]["chosen"]["auc"]) <= \
        flower["all"]["auc_bin_error"]
    low, high = flower["all"]["chosen"]["ci95"]["accuracy"]
    assert low <= flower["all"]["chosen"]["accuracy"] <= high
    assert (tmp_path / "cross-site" / "reliability.png").is_file()


def test_a_coordinator_without_data_with_a_robust_strategy_equals_embedded(
        loopback, tmp_path, starting_checkpoint):
    """No split and no image on the coordinator: the classes come from the starting
    checkpoint, the clients validate, and the best round is chosen on federated val; the
    server keeps the round's updates for a robust strategy (FedMedian) as in process."""
    settings = {**SETTINGS, "threshold": "youden", "seed": 4, "strategy": "fedmedian",
                "rounds": 1}
    init = str(starting_checkpoint)
    expected = run_embedded(loopback.split, tmp_path / "embedded",
                            {**settings, "val": "federated"}, init=init)
    report, _ = run_and_compare(tmp_path, loopback, expected, settings,
                                coordinator_split=False, init=init)
    assert report["monitor"] == "fed_auc" and report["operating_point"]["source"] == "federated val"
    assert report["patient_operating_point"]["source"] == "federated val, per patient"
    assert report["final"]["val_auc"] is None and report["final"]["fed_auc"] > 0
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_byol_stage0_on_the_nodes_rows_equals_embedded(loopback, tmp_path):
    """Stage 0 through the rounds (objective byol) on each node's own rows, labels unread:
    the embedded engine's backbone to the bit, and its loss per round."""
    settings = {**SETTINGS, "objective": "byol", "hidden-dim": 32, "projection-dim": 16,
                "seed": 6}
    expected = run_embedded(loopback.split, tmp_path / "embedded", settings)
    proc = loopback.submit(loopback.split, tmp_path / "run", settings=settings)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    assert f"round 2/2: {LOOPBACK_CLIENTS} clients, BYOL loss" in output
    flower = load_file(tmp_path / "run" / "backbone.safetensors")
    reference = load_file(expected / "backbone.safetensors")
    assert flower.keys() == reference.keys()
    for key in reference:
        assert torch.equal(reference[key], flower[key]), key
    assert without_seconds(tmp_path / "run" / "summary.csv") == \
        without_seconds(expected / "summary.csv")


def running_flower_runs(federation: Federation) -> list[int]:
    listing = subprocess.run([str(BIN / "flwr"), "ls", "loopback", "--format", "json"],
                             env=federation.env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    runs = json.loads(listing.stdout)["runs"]
    return [int(r["run-id"]) for r in runs if r["status"].startswith("running")]


def test_a_stopped_coordinator_resumes_on_the_nodes_state(loopback, tmp_path):
    """Real processes: the run's ServerApp is stopped (`flwr stop`) once round 1 is committed,
    while the nodes train round 2 (sent with round 1's evaluation). `--resume` is another
    Flower run: the nodes, still up, find their FedBN layers and SCAFFOLD control under the
    run's key, replay what was not recorded from their state before it, and the run ends
    with the uninterrupted embedded run's weights and CSVs."""
    settings = {**SETTINGS, "rounds": 3, "fedbn": True, "strategy": "scaffold", "seed": 5}
    expected = run_embedded(loopback.split, tmp_path / "embedded", settings)
    out = tmp_path / "run"
    proc = loopback.submit(loopback.split, out, settings=settings)
    wait_until(proc, (out / "resume.pt").is_file, "round 1 was never committed", seconds=600)
    running = running_flower_runs(loopback)
    assert len(running) == 1, running
    stop = subprocess.run([str(BIN / "flwr"), "stop", str(running[0]), "loopback"],
                          env=loopback.env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    first, _ = proc.communicate(timeout=300)
    committed = load_resume(out)["round"]
    assert 1 <= committed < 3 and not (out / "final.safetensors").exists(), first
    resumed = subprocess.run(
        [str(BIN / "fedct"), "federate", "--resume", str(out), "--engine", "flower",
         "--federation", "loopback"], env=loopback.env, capture_output=True, text=True,
        timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"after round {committed}" in resumed.stdout + resumed.stderr
    flower, _ = read_checkpoint(out / "final")
    reference, _ = read_checkpoint(expected / "final")
    for key in reference:
        assert torch.equal(reference[key], flower[key]), key
    assert without_seconds(out / "summary.csv") == without_seconds(expected / "summary.csv")
    assert (out / "clients.csv").read_text() == (expected / "clients.csv").read_text()


def test_a_killed_supernode_does_not_stop_the_run(tmp_path, synth_dir):
    """Real processes: node 1 is killed once round 1 is recorded (its round-2 update, sent
    with round 1's evaluation, is in); the message that carries round 2's evaluation and
    round 3's training gets no answer from it, and round 3 goes on without it once
    --round-timeout has passed."""
    split = make_split(synth_dir, tmp_path / "split")
    federation = Federation(tmp_path, split, clients=2)
    try:
        # a loaded 2-core machine takes ~20 s to start a ClientApp and train
        proc = federation.submit(split, tmp_path / "run", "--round-timeout", "40",
                                 settings={**SETTINGS, "rounds": 3})
        summary = tmp_path / "run" / "summary.csv"
        wait_until(proc, lambda: summary.is_file() and len(summary.read_text().splitlines()) >= 2,
                   "round 1 never finished", seconds=300)
        federation.kill("node1")
        output, _ = proc.communicate(timeout=600)
    finally:
        federation.stop()
    assert proc.returncode == 0, output
    rows = [line.split(",") for line in summary.read_text().splitlines()[1:]]
    assert [r[:2] for r in rows] == [["1", "2"], ["2", "2"], ["3", "1"]], output
    assert "client 1 failed" in output
    assert (tmp_path / "run" / "final.safetensors").is_file()
