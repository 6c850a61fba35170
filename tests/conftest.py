import copy
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
COVID_CSV = SHARED / "data" / "covid-ct" / "splits.csv"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_in1k.safetensors"
# a federated run small enough for a unit test: a tiny timm model, 32 px, 2 rounds of 2 steps
TINY = {"model": "test_efficientnet", "image_size": 32, "batch_size": 16, "lr": 3e-3,
        "rounds": 2, "local_steps": 2}
THRESHOLD = 0.45  # the operating point stored with the `checkpoint` fixture
BIN = Path(sys.executable).parent
LOOPBACK_CLIENTS = 3  # SecAgg+ needs three


def require_shared(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data test needs ../shared beside the repo")


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Every test, and every module-scoped fixture, decodes into a cache of the test session's
    own, never the user's (session scope: set before any other fixture runs)."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDCT_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from fedct.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth") / "data", n=160, seed=0, size=64)


def make_split(synth_dir: Path, out: Path, **options) -> Path:
    """A split of the synthetic data (IID over 2 clients unless `options` say otherwise)."""
    from fedct.data.manifest import SplitOptions, run_split

    run_split(synth_dir / "dataset.csv", out,
              SplitOptions(**{"scheme": "iid", "clients": 2, "seed": 0, **options}))
    return out


@pytest.fixture(scope="session")
def split_dir(synth_dir, tmp_path_factory) -> Path:
    """The synthetic data over 2 IID clients; a module may define its own split_dir instead."""
    return make_split(synth_dir, tmp_path_factory.mktemp("split") / "split")


def write_node_csv(split_dir: Path, client_id: int, path: Path, rows: str = "train") -> Path:
    """A hospital's own CSV holding exactly one client's `rows` (train or local_val) of the
    split. It sits at the root of the images (paths are relative to it), named after `path`;
    returns where it is."""
    from fedct.data.manifest import load_split

    split = load_split(split_dir)
    target = split.root / f"node-{abs(hash(str(path)))}-{path.name}"
    with target.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        for entry in split.select(clients=[client_id], split=rows):
            writer.writerow([entry.row.path, entry.row.label, entry.row.group])
    return target


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model (64 px) with a stored operating point: enough for the
    mechanics of predict, export and the checks on its files."""
    import torch

    from fedct.models import create_model, data_config
    from fedct.runs import checkpoint_meta, save_checkpoint

    torch.manual_seed(0)
    model = create_model("test_efficientnet", 2, pretrained="none")
    stem = tmp_path_factory.mktemp("ckpt") / "best"
    meta = checkpoint_meta(architecture="test_efficientnet", classes=["CT_COVID", "CT_NonCOVID"],
                           positive="CT_COVID", data_cfg=data_config(model, 64), stage="pretrain",
                           operating_point={"threshold": THRESHOLD, "rule": "youden",
                                            "source": "val"})
    save_checkpoint(stem, model.state_dict(), meta)
    return stem


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """SuperLink + SuperNodes on loopback, with a FLWR_HOME naming the connection. Each node
    is `fedct node` (its SuperNode and, in warm `mode`, the one process serving its messages)."""

    def __init__(self, tmp: Path, split_dir: Path, clients: int, certs: Path | None = None,
                 own_data: bool = False, mode: str = "warm"):
        self.tmp, self.split, self.procs = tmp, split_dir, {}
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
                str(BIN / "fedct"), "node", *node_tls, "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--mode", mode, "--node-config",
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

    def submit(self, split_dir: Path | None, out: Path, *extra: str, settings: dict,
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


@pytest.fixture(scope="session")
def loopback(synth_dir, tmp_path_factory):
    """One federation on 127.0.0.1 for every Flower test that leaves it whole: a SuperLink
    over TLS and 3 SuperNodes, each reading its own CSVs (train and local val rows of one
    client, as at a hospital). `loopback.split` is the split they come from."""
    pytest.importorskip("flwr")
    from fedct.federated.certs import make_certificates

    home = tmp_path_factory.mktemp("loopback")
    split = make_split(synth_dir, home / "split", clients=LOOPBACK_CLIENTS, local_val=0.25)
    make_certificates(home / "certs", ["127.0.0.1", "localhost"])
    federation = Federation(home, split, clients=LOOPBACK_CLIENTS, certs=home / "certs",
                            own_data=True)
    yield federation
    federation.stop()


class LocalGrid:
    """A Flower grid in this process: delivers each message to the ClientApp of its node
    and keeps every reply the coordinator receives and the message types of every exchange;
    a node in `dead` never answers."""

    def __init__(self, contexts: dict):
        self.contexts = contexts
        self.received = []
        self.exchanges: list[list[str]] = []
        self.dead: set[int] = set()

    def get_node_ids(self):
        return sorted(set(self.contexts) - self.dead)

    def send_and_receive(self, messages, timeout=None):
        from fedct.federated.flower_app import client_app

        replies = []
        self.exchanges.append([m.metadata.message_type + ("+evaluate" if "evaluate-first" in
                                                          m.content else "") for m in messages])
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.dead:
                continue
            # a copy, as the network would deliver: Flower sends one content to every node
            replies.append(client_app(copy.deepcopy(message), self.contexts[node]))
        self.received += replies
        return replies


def local_federation(split: Path, tmp_path: Path, config, clients: int, *,
                     grid=LocalGrid, run_id: int = 1, **extras):
    """(a `grid` of `clients` nodes reading `split`, the server's Context, {client: node id})
    for Flower run `run_id` of `config`; `extras` are the run config's other keys
    (RunExtras). The nodes keep their state in `tmp_path`, whatever the run."""
    from flwr.app import Context, RecordDict

    from fedct.federated.protocol import RunExtras, run_config_values

    run_config = run_config_values(config, RunExtras(**{"out": str(tmp_path / "out"),
                                                        **extras}))
    contexts = {100 + k: Context(run_id=run_id, node_id=100 + k, state=RecordDict(),
                                 node_config={"client-id": k, "split": str(split),
                                              "state-dir": str(tmp_path / f"state{k}")},
                                 run_config=run_config)
                for k in range(clients)}
    server = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                     run_config=run_config)
    return grid(contexts), server, {k: 100 + k for k in range(clients)}


@pytest.fixture
def task_identity(monkeypatch):
    """The process identity Flower's messages read, as a SuperLink would set it (for
    ClientApps called in this process)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
