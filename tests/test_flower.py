"""fedct on Flower's Deployment Engine: a SuperLink and 2 SuperNodes on 127.0.0.1.

The processes are started and stopped by the tests (by PID, each in its own session so its
flower-superexec children go with it). The final weights must equal the embedded engine's
bit for bit for the same seed and config, with DP and FedBN too, and so must the federated
validation (summary.csv, clients.csv): one code path, two engines.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_node_csv

from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.data.manifest import SplitOptions, run_split
from fedct.federated.simulation import run_federate
from fedct.runs import read_checkpoint

pytest.importorskip("flwr")
pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SETTINGS = {"model": "test_efficientnet", "image-size": 32, "batch-size": 16, "lr": 0.003,
            "rounds": 2, "local-steps": 2, "seed": 3}
DP_FEDBN = {**SETTINGS, "dp": True, "dp-train": "full", "target-epsilon": 5.0, "fedbn": True,
            "strategy": "scaffold", "local-loss": "balanced-softmax"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """SuperLink + SuperNodes on loopback, with a FLWR_HOME naming the connection."""

    def __init__(self, tmp: Path, split_dir: Path, clients: int, certs: Path | None = None,
                 own_data: bool = False):
        self.tmp, self.procs = tmp, {}
        self.port = free_port()
        # the SuperLink and SuperNodes start flower-superexec by name: it must be on PATH
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(tmp / "flwr-home"),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        tls = (["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile",
                str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key")]
               if certs else ["--insecure"])
        self.start("superlink", [str(BIN / "flower-superlink"), *tls, "--port", str(self.port),
                                 "--disable-runtime-dependency-installation"])
        self.wait_for_port(self.port)
        node_tls = ["--root-certificates", str(certs / "ca.crt")] if certs else ["--insecure"]
        for k in range(clients):
            # a hospital's node reads its own CSV; a local test's node reads its rows of the split
            data = (f'data="{write_node_csv(split_dir, k, tmp / f"site{k}.csv")}" '
                    f'val="{write_node_csv(split_dir, k, tmp / f"val{k}.csv", "local_val")}"'
                    if own_data else f'split="{split_dir}"')
            self.start(f"node{k}", [
                str(BIN / "flower-supernode"), *node_tls, "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--node-config",
                f'{data} client-id={k} state-dir="{tmp / f"state{k}"}"'])
        home = tmp / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        trust = f'root-certificates = "{certs / "ca.crt"}"' if certs else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.port}"\n{trust}\n')

    def start(self, name: str, argv: list[str]) -> None:
        log = (self.tmp / f"{name}.log").open("w")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_for_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"nothing listens on {port}: {(self.tmp / 'superlink.log').read_text()}")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def submit(self, split_dir: Path | None, out: Path, *extra: str, settings: dict = SETTINGS,
               init: str = "none") -> subprocess.Popen:
        argv = [str(BIN / "fedct"), "federate", *([str(split_dir)] if split_dir else []),
                "--init", init, "--out", str(out), "--engine", "flower", "--federation",
                "loopback"]
        for key, value in settings.items():
            argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
        return subprocess.Popen([*argv, *extra], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)


def wait_until(proc: subprocess.Popen, ready, never: str, *, seconds: float,
               poll: float = 0.05) -> None:
    """Wait for `ready()` while the submitted run is alive (its output on failure)."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, never
        time.sleep(poll)


@pytest.fixture(scope="module")
def split_dir(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("flower-split") / "split"
    run_split(synth_dir / "dataset.csv", out, SplitOptions(scheme="dirichlet", alpha=1.0,
                                                          clients=2, seed=0, local_val=0.25))
    return out


def run_embedded(split_dir: Path, out: Path, settings: dict, init: str = "none") -> Path:
    config = build_config(FederateConfig, None, {k.replace("-", "_"): v for k, v in settings.items()})
    run_federate(split_dir, out, config, init=init, quiet=True)
    return out


@pytest.fixture(scope="module")
def embedded(split_dir, tmp_path_factory):
    return run_embedded(split_dir, tmp_path_factory.mktemp("embedded") / "run", SETTINGS)


def without_seconds(path: Path) -> list[dict]:
    with path.open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def run_and_compare(tmp_path, split_dir, embedded: Path, certs=None, settings=SETTINGS,
                    own_data=False, coordinator_split=True, init="none", then=None):
    """A Flower run against the embedded run in `embedded`; `then(federation)` runs before
    the federation stops."""
    federation = Federation(tmp_path, split_dir, clients=2, certs=certs, own_data=own_data)
    try:
        proc = federation.submit(split_dir if coordinator_split else None, tmp_path / "run",
                                 settings=settings, init=init)
        output, _ = proc.communicate(timeout=600)
        if then is not None and proc.returncode == 0:
            then(federation)
    finally:
        federation.stop()
    assert proc.returncode == 0, output
    assert "2 nodes answered" in output
    assert "round 1/2: training on clients 0, 1" in output and "client 1: trained" in output
    flower, meta = read_checkpoint(tmp_path / "run" / "final")
    expected, _ = read_checkpoint(embedded / "final")
    assert meta["engine"] == "flower"
    assert flower.keys() == expected.keys()
    for key in expected:
        assert torch.equal(expected[key], flower[key]), key  # a difference of exactly 0.0
    # the same federated validation, pooled and per client, and the same operating point
    summary = without_seconds(tmp_path / "run" / "summary.csv")
    assert summary == without_seconds(embedded / "summary.csv")
    assert len(summary) == 2 and int(summary[0]["fed_examples"]) > 0
    clients = (tmp_path / "run" / "clients.csv").read_text()
    assert clients == (embedded / "clients.csv").read_text() and clients.count("\n") == 5
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["rounds"] == 2
    assert report["operating_point"] == json.loads((embedded / "report.json").read_text())[
        "operating_point"]
    return report


def test_flower_equals_embedded_and_cross_site_evaluation_equals_per_client(
        tmp_path, split_dir, embedded):
    """Then the run's final checkpoint is scored on each node's own val rows over Flower:
    the same per-hospital and pooled figures as `fedct evaluate --per-client` on the split."""
    checkpoint = tmp_path / "run" / "final"

    def cross_site(federation):
        proc = subprocess.run(
            [str(BIN / "fedct"), "evaluate", str(checkpoint), "--engine", "flower",
             "--federation", "loopback", "--on", "val", "--bootstrap", "50", "--out",
             str(tmp_path / "cross-site"), "--json"],
            env=federation.env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        flower = {r["data"]: r for r in json.loads(proc.stdout)["results"]}
        local = subprocess.run(
            [str(BIN / "fedct"), "evaluate", str(checkpoint), "--split", str(split_dir),
             "--on", "local_val", "--per-client", "--bootstrap", "0", "--json"],
            capture_output=True, text=True, timeout=600)
        assert local.returncode == 0, local.stderr
        expected = {r["data"]: r for r in json.loads(local.stdout)["results"]}
        assert flower.keys() == expected.keys() == {"all", "client 0", "client 1"}
        for scope, row in flower.items():
            assert row["n"] == expected[scope]["n"] and row["positives"] == expected[scope][
                "positives"]
            for at in ("chosen", "threshold_0.5"):
                for metric in ("accuracy", "sensitivity", "specificity", "precision"):
                    assert row[at][metric] == pytest.approx(expected[scope][at][metric]), \
                        (scope, at, metric)
        assert abs(flower["all"]["chosen"]["auc"] - expected["all"]["chosen"]["auc"]) <= \
            flower["all"]["auc_bin_error"]
        low, high = flower["all"]["chosen"]["ci95"]["accuracy"]
        assert low <= flower["all"]["chosen"]["accuracy"] <= high
        assert (tmp_path / "cross-site" / "reliability.png").is_file()

    run_and_compare(tmp_path, split_dir, embedded, then=cross_site)


def test_flower_with_dp_fedbn_scaffold_and_hospital_data_equals_embedded(tmp_path, split_dir):
    """Each node reads its own CSV (data=, as at a hospital), keeps its accountant, FedBN
    layers and SCAFFOLD control variate in its state-dir across rounds, trains with a
    prior-corrected loss, and the result is the embedded engine's."""
    expected = run_embedded(split_dir, tmp_path / "embedded", DP_FEDBN)
    report = run_and_compare(tmp_path, split_dir, expected, settings=DP_FEDBN, own_data=True)
    embedded_report = json.loads((tmp_path / "embedded" / "report.json").read_text())
    assert report["epsilon"] == embedded_report["epsilon"] and 0 < report["max_epsilon"] <= 5.0
    assert report["best_round"] == embedded_report["best_round"]
    for k in range(2):
        state = torch.load(next((tmp_path / f"state{k}").glob("run-*.pt")), weights_only=True)
        assert state["rounds"] == 2 and state["norms"] and state["accountant"]["history"]
        assert state["control"] and not state["control"].keys() & state["norms"].keys()


def test_a_coordinator_without_data_over_tls_equals_embedded(tmp_path, split_dir, embedded):
    """No split and no image on the coordinator: the classes come from the starting
    checkpoint, the clients validate, and the best round is chosen on federated val; the
    server keeps the round's updates for a robust strategy (FedMedian) as in process."""
    from fedct.federated.certs import make_certificates

    make_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"])
    settings = {**SETTINGS, "threshold": "youden", "seed": 4, "strategy": "fedmedian"}
    init = str(embedded / "final")
    expected = run_embedded(split_dir, tmp_path / "embedded", {**settings, "val": "federated"},
                            init=init)
    report = run_and_compare(tmp_path, split_dir, expected, certs=tmp_path / "certs",
                             settings=settings, coordinator_split=False, init=init)
    assert report["monitor"] == "fed_auc" and report["operating_point"]["source"] == "federated val"
    assert report["final"]["val_auc"] is None and report["final"]["fed_auc"] > 0
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_a_killed_supernode_does_not_stop_the_run(tmp_path, split_dir):
    federation = Federation(tmp_path, split_dir, clients=2)
    try:
        # generous: a loaded 2-core machine takes ~20 s to start a ClientApp and train
        proc = federation.submit(split_dir, tmp_path / "run", "--round-timeout", "60")
        summary = tmp_path / "run" / "summary.csv"
        wait_until(proc, lambda: summary.is_file() and len(summary.read_text().splitlines()) >= 2,
                   "round 1 never finished", seconds=300)
        federation.kill("node1")
        output, _ = proc.communicate(timeout=600)
    finally:
        federation.stop()
    assert proc.returncode == 0, output
    rows = [line.split(",") for line in summary.read_text().splitlines()[1:]]
    assert [r[:2] for r in rows] == [["1", "2"], ["2", "1"]], output
    assert "client 1 failed" in output
    assert (tmp_path / "run" / "final.safetensors").is_file()
