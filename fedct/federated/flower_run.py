"""`fedct federate --engine flower`: write the Flower app for a run and submit it with `flwr run`.

The app directory holds only a pyproject.toml: its components point to the installed
`fedct.federated.flower_app`, and its run config is the resolved FederateConfig, so the
SuperLink, the SuperNodes and the embedded engine all run the same code with the same
settings.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fedct import __version__
from fedct.errors import FedctError
from fedct.federated.protocol import ROUND_TIMEOUT_SECONDS, RunExtras, run_config_values
from fedct.locks import exclusive
from fedct.runs import REPORT, check_resume_inputs, prepare_run_dir

FLWR_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_config(config, *, init: str, out: Path, split_dir: Path | None, num_clients: int,
               round_timeout: float = ROUND_TIMEOUT_SECONDS, resume: bool = False) -> dict:
    """The Flower run config of a run: the resolved FederateConfig plus `RunExtras`."""
    return run_config_values(config, RunExtras(
        init=str(Path(init).resolve()) if Path(init).exists() else str(init),
        out=str(Path(out).resolve()), split_dir=str(Path(split_dir).resolve()) if split_dir else "",
        num_clients=num_clients, round_timeout=round_timeout, resume=resume))


def write_app(app_dir: Path, values: dict,
              serverapp: str = "fedct.federated.flower_app:server_app") -> Path:
    """A Flower app directory (pyproject.toml) whose run config is `values`; the ClientApp is
    always fedct's (the one `fedct node` serves), the ServerApp fedct's unless named."""
    app_dir.mkdir(parents=True, exist_ok=True)
    config_lines = "\n".join(f"{key} = {_toml_value(value)}" for key, value in values.items())
    (app_dir / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedct-run"
version = "{__version__}"
description = "A fedct federated run on Flower's Deployment Engine"
dependencies = ["fedct[flower]=={__version__}"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedct"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "fedct.federated.flower_app:client_app"

[tool.flwr.app.config]
{config_lines}
""")
    return app_dir


def _federation(split_dir: Path | None, federation: str | None, clients: int | None):
    """(the coordinator's split or None, the number of clients: 0 for the nodes that answer)."""
    from fedct.data.manifest import load_split

    if federation is None:
        raise FedctError("--engine flower needs --federation NAME (a connection in "
                         "$FLWR_HOME/config.toml)")
    if clients is not None and clients < 1:
        raise FedctError(f"--clients {clients}: must be >= 1")
    split = load_split(split_dir) if split_dir is not None else None
    if split is not None and clients not in (None, split.num_clients):
        raise FedctError(f"--clients {clients}: the split {split_dir} has {split.num_clients}")
    return split, (split.num_clients if split is not None else clients or 0)


def run_on_flower(split_dir: Path | None, out: Path, config, *, init: str,
                  federation: str | None, round_timeout: float = ROUND_TIMEOUT_SECONDS,
                  resume: bool = False, force: bool = False, clients: int | None = None) -> dict:
    """Submit a run to the federation's SuperLink and wait; returns the run's report.

    The coordinator's ServerApp writes the run directory `out` (this machine's, in a local
    federation) exactly as the embedded engine does. Without a split the coordinator holds
    no images: the classes come from the `init` checkpoint and validation is federated.
    """
    from fedct.federated.setup import resolve_input_size, run_inputs

    if resume:  # before submitting: the nodes hold no state of an embedded run
        check_resume_inputs(out, engine="flower")
    split, num_clients = _federation(split_dir, federation, clients)
    config, note = resolve_input_size(config, init)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if not resume:  # the coordinator's ServerApp holds the lock while it runs the rounds
        with exclusive(out):
            prepare_run_dir(out, resume=False, force=force, **run_inputs(split, init))
    values = run_config(config, init=init, out=out, split_dir=split_dir,
                        num_clients=num_clients, round_timeout=round_timeout, resume=resume)
    with tempfile.TemporaryDirectory(prefix="fedct-flower-app-") as app_dir:
        write_app(Path(app_dir), values)
        code = submit(Path(app_dir), federation)
    if code != 0:
        raise FedctError(f"flwr run exited with code {code} (see its output above)")
    if not (Path(out) / REPORT).is_file():
        raise FedctError(f"{out}: the run ended without {REPORT} (see the SuperLink's log)")
    return json.loads((Path(out) / REPORT).read_text())


def evaluate_on_flower(checkpoints: list, *, federation: str | None, on: str,
                       out: Path | None, n_boot: int, seed: int, threshold: str | None,
                       tta: bool, clients: int | None = None,
                       round_timeout: float = ROUND_TIMEOUT_SECONDS) -> dict:
    """Score checkpoints on every node's own rows through the federation's SuperLink; the
    coordinator's ServerApp writes the `fedct evaluate` report into `out`."""
    from fedct.config import FederateConfig
    from fedct.configure import build_config
    from fedct.evaluation import check_bootstrap, check_threshold, fresh_folder
    from fedct.federated.cross_site import ON
    from fedct.operating_point import parse_rule
    from fedct.runs import checkpoint_paths, read_sidecar

    _federation(None, federation, clients)
    check_bootstrap(n_boot)
    check_threshold(threshold)
    if threshold is not None and parse_rule(threshold)[0] != "fixed":
        raise FedctError(f"--threshold {threshold} with --engine flower: give a number; each "
                         "node scores at a fixed threshold")
    for checkpoint in checkpoints:
        classes = read_sidecar(checkpoint)["classes"]
        if len(classes) > 2:
            raise FedctError(f"{checkpoint}: --engine flower scores two-class models so far; "
                             f"this one has {len(classes)} classes (score it with the embedded "
                             "engine on a split)")
    sizes = {tuple(read_sidecar(c)["input_size"]) for c in checkpoints}
    if len(sizes) != 1:
        raise FedctError(f"--engine flower: the checkpoints have different input sizes "
                         f"({sorted(s[-1] for s in sizes)}); score them one size at a time")
    weights = [str(checkpoint_paths(c)[0].resolve()) for c in checkpoints]
    out = Path(out) if out else fresh_folder(Path(weights[0]).parent / f"eval-flower-{on}")
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(FederateConfig, None, {"image_size": sizes.pop()[-1], "tta": tta})
    values = run_config_values(config, RunExtras(
        out=str(out.resolve()), num_clients=clients or 0, round_timeout=round_timeout,
        evaluate=json.dumps(weights), eval_rows=ON[on], eval_bootstrap=n_boot, eval_seed=seed,
        eval_threshold=float(threshold) if threshold else 0.0))
    with tempfile.TemporaryDirectory(prefix="fedct-flower-app-") as app_dir:
        write_app(Path(app_dir), values)
        code = submit(Path(app_dir), federation)
    report_path = out / "metrics.json"
    if code != 0 or not report_path.is_file():
        raise FedctError(f"flwr run exited with code {code} and no {report_path} (see the "
                         "output above and the SuperLink's log)")
    return {**json.loads(report_path.read_text()), "out": str(out)}


def dry_run_lines(split_dir: Path | None, out: Path, config, *, init: str,
                  federation: str | None, certs: Path | None,
                  clients: int | None = None) -> list[str]:
    """What `--dry-run` prints: the three roles' commands, then the run's every resolved option
    as a config file and the submit command that reads it (shell-quoted, ready to paste)."""
    import yaml

    from fedct.config import to_dict
    from fedct.federated.setup import resolve_input_size, sample_schedule

    _, num_clients = _federation(split_dir, federation, clients)
    config, _ = resolve_input_size(config, init)
    if config.secure_aggregation and num_clients:
        sample_schedule(num_clients, config)  # refuses fewer than 3 clients a round
    example_clients = 3 if config.secure_aggregation else 2
    lines = role_commands(split_dir=split_dir, clients=num_clients or example_clients,
                          federation=federation, certs=certs)
    if config.secure_aggregation:
        lines += ["# secure aggregation (SecAgg+): every node masks its update; the coordinator "
                  "only ever holds the round's sum. Nothing to add on the nodes: the ClientApp "
                  "carries Flower's SecAgg+ mod"]
    config_file = f"{Path(out).name or 'run'}-federate.yaml"
    options = yaml.safe_dump(to_dict(config), sort_keys=False).rstrip().splitlines()
    return lines + [
        "# coordinator: the run's resolved options (all of them, DP included), then the submit",
        f"cat > {shlex.quote(config_file)} <<'FEDCT_EOF'", *options, "FEDCT_EOF",
        " ".join(["fedct", "federate", *([shlex.quote(str(split_dir))] if split_dir else []),
                  "--init", shlex.quote(init), "--out", shlex.quote(str(out)),
                  "--config", shlex.quote(config_file), "--engine", "flower",
                  "--federation", shlex.quote(federation),
                  *(["--clients", str(num_clients)] if num_clients and not split_dir else [])])]


def flower_env() -> dict:
    """The environment for Flower's commands: FLWR_ENV, and fedct's own environment first
    on PATH (activated or not), since flwr starts flower-superexec and others by name."""
    here = Path(sys.executable).parent
    return {**os.environ, **FLWR_ENV, "PATH": f"{here}{os.pathsep}{os.environ.get('PATH', '')}"}


def flower_tool(name: str) -> str:
    """The path of one of Flower's commands (flwr, flower-supernode), fedct's own first."""
    found = shutil.which(name, path=flower_env()["PATH"])
    if found is None:
        raise FedctError(f"the {name} command is missing: pip install 'fedct[flower]'")
    return found


def env_prefix() -> str:
    """FLWR_ENV as a shell prefix, for the commands --dry-run prints."""
    return " ".join(f"{key}={value}" for key, value in FLWR_ENV.items())


def submit(app_dir: Path, federation: str, *, flwr_home: str | None = None) -> int:
    """Run `flwr run APP FEDERATION --stream` (its log on stderr); returns its exit code."""
    flwr = flower_tool("flwr")
    env = flower_env()
    if flwr_home:
        env["FLWR_HOME"] = flwr_home
    try:  # flwr's streamed log goes to stderr: stdout is for fedct's results (--json)
        log = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        log = None
    return subprocess.run([flwr, "run", str(app_dir), federation, "--stream"], env=env,
                          stdout=log, check=False).returncode


def role_commands(*, split_dir: Path | None, clients: int, federation: str,
                  superlink: str = "127.0.0.1:8000", certs: Path | None = None,
                  insecure: bool = False) -> list[str]:
    """The three roles' commands for this flwr version (1.42), as `--dry-run` prints them.

    TLS unless `insecure` (loopback tests and the local demo only).
    """
    certs = Path(certs) if certs else Path("certs")
    if insecure:
        link_tls = node_tls = "--insecure"
        conn = "insecure = true"
    else:
        link_tls = (f"--ssl-ca-certfile {certs}/ca.crt --ssl-certfile {certs}/server.pem "
                    f"--ssl-keyfile {certs}/server.key")
        node_tls = f"--root-certificates {certs}/ca.crt"
        conn = f'root-certificates = "{certs.resolve()}/ca.crt"'
    env = env_prefix()
    host = superlink.rsplit(":", 1)[0]
    lines = []
    if not insecure:
        lines += ["# coordinator, once: a private CA and the SuperLink's certificate "
                  "(copy ca.crt, never ca.key, to every hospital)",
                  f"fedct certs {certs} --host {host}"]
    lines += ["# coordinator: the SuperLink",
              f"{env} flower-superlink {link_tls} --disable-runtime-dependency-installation"
              + ("" if host in ("127.0.0.1", "localhost") else " --host 0.0.0.0")]
    for k in range(clients):
        data = (f'split="{split_dir.resolve()}"' if split_dir
                else 'data="/path/to/own-train.csv" val="/path/to/own-val.csv"')
        lines += [f"# hospital {k}: a SuperNode reading only its own images, its ClientApp kept "
                  "warm by fedct node (at a real site: "
                  'data="/path/to/own-train.csv" val="/path/to/own-val.csv")',
                  f"{env} fedct node {node_tls} --superlink {superlink} "
                  f"--port {9094 + k} --node-config '{data} client-id={k}'"]
    lines += ["# coordinator: name the connection once in $FLWR_HOME/config.toml "
              "(default ~/.flwr/config.toml)",
              "mkdir -p ${FLWR_HOME:-$HOME/.flwr} && "
              f"printf '\\n[superlink.{federation}]\\naddress = \"{superlink}\"\\n{conn}\\n' "
              ">> ${FLWR_HOME:-$HOME/.flwr}/config.toml"]
    return lines
