"""Run directories: resolved config, summary.csv, safetensors checkpoints with JSON sidecars.

A checkpoint is `NAME.safetensors` (weights only: loading an untrusted file executes nothing)
beside `NAME.json` (architecture, classes, input size, mean/std, stage, epoch or round,
metrics). Resume state (optimiser, RNG) goes to `resume.pt`, read with weights_only=True.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import pickle
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from fedct import __version__
from fedct.errors import FedctError
from fedct.files import atomic_write, save_tensors, to_json
from fedct.metrics import monitor_value

CONFIG = "config.yaml"
SUMMARY = "summary.csv"
REPORT = "report.json"
RESUME = "resume.pt"


def checkpoint_paths(name: str | Path) -> tuple[Path, Path]:
    """`RUN/best`, `RUN/best.safetensors` or `RUN/best.json` -> (weights, sidecar)."""
    path = Path(name)
    if path.is_dir():
        for candidate in ("final", "best", "last"):
            if (path / f"{candidate}.safetensors").is_file():
                path = path / candidate
                break
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], header: dict, *,
                      what: str = "the checkpoint") -> None:
    try:
        save_file(tensors, str(path), metadata=header)
    except SafetensorError as exc:  # a full disk surfaces here, not as an OSError
        raise OSError(f"cannot write {what} ({exc})") from None


def save_checkpoint(stem: Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Weights, then the sidecar; each carries a digest of the other (`fedct.sidecar`)."""
    from fedct.sidecar import SIDECAR_DIGEST, WEIGHTS_DIGEST, file_digest, meta_digest

    weights, sidecar = checkpoint_paths(stem)
    meta = {k: v for k, v in meta.items() if k != WEIGHTS_DIGEST}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    header = {"format": "pt", SIDECAR_DIGEST: meta_digest(meta)}
    digest = {}

    def write_weights(path: Path) -> None:
        write_safetensors(path, tensors, header)
        digest[WEIGHTS_DIGEST] = file_digest(path)

    atomic_write(weights, write_weights)
    atomic_write(sidecar, lambda p: p.write_text(to_json({**meta, **digest})))
    return weights


def read_sidecar(name: str | Path, *, whole_file: bool = False) -> dict:
    """A checkpoint's sidecar alone, every field checked and its binding to the weights'
    header verified (`whole_file`: the weights' own digest too; `read_checkpoint` checks
    that on the bytes it loads)."""
    from fedct.sidecar import check_binding, check_fields

    weights, sidecar = checkpoint_paths(name)
    if not weights.is_file():
        raise FedctError(f"{weights}: checkpoint not found")
    if not sidecar.is_file():
        raise FedctError(f"{sidecar}: checkpoint sidecar not found (a fedct checkpoint has both)")
    try:
        meta = json.loads(sidecar.read_text(), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FedctError(f"{sidecar}: unreadable checkpoint sidecar ({exc.__class__.__name__}: "
                         f"{str(exc)[:120]})") from None
    check_fields(meta, sidecar)
    check_binding(meta, weights, sidecar, whole_file=whole_file)
    return meta


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_checkpoint(name: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and sidecar, the weights file read once: its bytes are hashed against the
    sidecar's digest and then decoded."""
    from fedct.sidecar import WEIGHTS_DIGEST

    meta = read_sidecar(name)
    weights, sidecar = checkpoint_paths(name)
    try:
        data = weights.read_bytes()
        state = load_bytes(data)
    except (SafetensorError, OSError) as exc:
        raise FedctError(f"{weights}: unreadable checkpoint ({exc.__class__.__name__})") from None
    if WEIGHTS_DIGEST in meta and hashlib.sha256(data).hexdigest() != meta[WEIGHTS_DIGEST]:
        raise FedctError(f"{weights}: not the weights {sidecar.name} was saved with (their "
                         "digest differs)")
    refuse_selfsup(meta, weights)  # every reader here wants a classifier
    return state, meta


def refuse_selfsup(meta: dict, weights: Path) -> None:
    """A federated BYOL run's checkpoints hold its online network, not a classifier."""
    if meta.get("objective") == "byol":
        raise FedctError(f"{weights}: a self-supervised (objective byol) run's checkpoint has "
                         f"no classifier; start from {weights.parent / 'backbone.safetensors'}")


def checkpoint_meta(*, architecture: str, classes: list[str], positive: str | None,
                    data_cfg: dict, stage: str, tta: bool = False, **extra) -> dict:
    """A checkpoint's sidecar: what `fedct evaluate` and a later stage need to rebuild it;
    `tta` records that its threshold was chosen on mirrored val scores."""
    return {"architecture": architecture, "classes": list(classes), "positive": positive,
            "input_size": data_cfg["input_size"], "mean": data_cfg["mean"], "std": data_cfg["std"],
            "interpolation": data_cfg.get("interpolation", "bicubic"), "stage": stage,
            **({"tta": True} if tta else {}), **extra}


@dataclass
class CheckpointTracker:
    """A run's checkpoints: numbered ones (the last `keep_last`), `last`, and `best` by `monitor`.

    A NaN monitored value never beats a real one, but the first step is `best` until one
    does, so `best` exists after every step (a one-class val set gives NaN AUC throughout).
    Its state goes into the run's resume state.
    """

    out: Path
    monitor: str
    keep_last: int = 0  # numbered checkpoints kept; 0 writes none
    prefix: str = "round"
    best: float = float("-inf")
    best_step: int = 0

    def save(self, step: int, weights: dict[str, torch.Tensor], meta: dict, metrics: dict) -> bool:
        """Write this step's checkpoints; True when it is the new best."""
        if self.keep_last > 0:
            save_checkpoint(self.out / f"{self.prefix}-{step:04d}", weights, meta)
            self._drop_old(step)
        save_checkpoint(self.out / "last", weights, meta)
        score = monitor_value(metrics, self.monitor)
        improved = score > self.best or self.best_step == 0
        if improved:
            self.best, self.best_step = score, step
            save_checkpoint(self.out / "best", weights, meta)
        return improved

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = float(state["best"]), int(state["best_step"])

    def _drop_old(self, current: int) -> None:
        for path in self.out.glob(f"{self.prefix}-*.safetensors"):
            number = int(path.stem.split("-")[1])
            if number <= current - self.keep_last:
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)


def versions() -> dict:
    import opacus
    import timm

    info = {"fedct": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "timm": timm.__version__, "opacus": opacus.__version__}
    try:
        import flwr

        info["flwr"] = flwr.__version__
    except ImportError:
        pass
    return info


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def refuse_overlap(out: Path, inputs: dict[str, str | Path | None],
                   roots: dict[str, str | Path | None] | None = None, *,
                   option: str = "--out") -> None:
    """Refuse an output folder that is, holds or lies inside one of the `inputs` (--force
    would delete the input, or the output would become part of it), or is or holds one of
    the `roots` (a CSV dataset's folder: runs may sit inside it, never replace it)."""
    target = Path(out).resolve()
    checks = [(what, given, True) for what, given in inputs.items()]
    checks += [(what, given, False) for what, given in (roots or {}).items()]
    for what, given, inside_too in checks:
        if not given or not Path(given).exists():
            continue
        source = Path(given).resolve()
        inside = inside_too and source.is_dir() and source in target.parents
        if target == source or target in source.parents or inside:
            raise FedctError(f"{option} {out}: is, holds or lies inside the {what} {given}; "
                             "choose a folder apart from the inputs")


def refuse_overwriting_inputs(outputs: dict[str, str | Path], inputs) -> None:
    """The one rule for every file a command writes: it is never one of the command's inputs
    (the same file by path, link or hard link), with or without --force."""
    seen = {}
    for given in inputs:
        try:
            stat = Path(given).stat()
        except (OSError, TypeError):
            continue
        seen[(stat.st_dev, stat.st_ino)] = given
    for what, out in outputs.items():
        try:
            stat = Path(out).stat()
        except OSError:
            continue
        source = seen.get((stat.st_dev, stat.st_ino))
        if source is not None:
            raise FedctError(f"{what} {out}: is the input {source}; fedct never overwrites an "
                             "input, even with --force (choose another path)")


def prepare_run_dir(out: Path, *, resume: bool, force: bool,
                    inputs: dict[str, str | Path | None] | None = None,
                    roots: dict[str, str | Path | None] | None = None) -> Path:
    """A fresh run directory, or the existing one when resuming. Never clobbers without --force,
    and never an input (see `refuse_overlap`)."""
    out = Path(out)
    refuse_overlap(out, inputs or {}, roots)
    if resume:
        if not (out / RESUME).is_file():
            raise FedctError(f"{out}: nothing to resume ({RESUME} not found)")
        for stale in out.glob(".*.*"):  # temporary files of writes a kill cut short
            if stale.is_file():
                stale.unlink()
        return out
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FedctError(f"{out}: exists and is not empty (use --force to replace it, "
                             "or --resume to continue it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_config(out: Path, config: dict, *, command: str, extra: dict | None = None) -> None:
    doc = {"command": command, "config": config, "seed": config.get("seed"),
           "versions": versions(), "git_commit": git_commit(),
           "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **(extra or {})}
    atomic_write(out / CONFIG, lambda p: p.write_text(yaml.safe_dump(doc, sort_keys=False)))


def read_config(out: Path) -> dict:
    path = Path(out) / CONFIG
    if not path.is_file():
        raise FedctError(f"{path}: not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FedctError(f"{path}: unreadable ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise FedctError(f"{path}: not a fedct run's config")
    return doc


def check_resume_inputs(out: Path, **current: str | None) -> None:
    """Refuse to resume with other inputs (split, split digest, init) than the run started with."""
    saved = read_config(out)
    for key, value in current.items():
        if value is not None and saved.get(key) not in (None, value):
            raise FedctError(f"--resume {out}: the run started with {key} {saved[key]}, not "
                             f"{value}; resume it with the same inputs")


def append_summary(out: Path, row: dict) -> None:
    path = Path(out) / SUMMARY
    exists = path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if not exists:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def truncate_csv(path: Path, column: str, keep_through: int) -> None:
    """On resume, drop the rows (of summary.csv, privacy.csv) written after the resumed state."""
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
        fields = rows[0].keys() if rows else []
    for line_no, row in enumerate(rows, start=2):
        if not str(row.get(column) or "").isdigit():
            raise FedctError(f"{path}:{line_no}: {column} {row.get(column)!r} is not a "
                             "number (a damaged file; restore it or start the run anew)")
    kept = [r for r in rows if int(r[column]) <= keep_through]

    def write(p: Path) -> None:
        with p.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(fields))
            writer.writeheader()
            writer.writerows(kept)

    if fields:
        atomic_write(path, write)


def write_report(out: Path, report: dict) -> None:
    atomic_write(Path(out) / REPORT,
                 lambda p: p.write_text(to_json(report)))


def save_resume(out: Path, state: dict) -> None:
    atomic_write(Path(out) / RESUME, lambda p: save_tensors(state, p))


def load_resume(out: Path, required: tuple[str, ...] = ()) -> dict:
    """The resume state, read with weights_only: a file that would run code is refused, and
    one without the `required` keys is named as not a fedct resume state."""
    path = Path(out) / RESUME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise FedctError(f"{path}: not a fedct resume state, refused ({first})") from None
    if not isinstance(state, dict):
        raise FedctError(f"{path}: not a fedct resume state, refused")
    missing = [key for key in required if key not in state]
    if missing:
        raise FedctError(f"{path}: a resume state without '{missing[0]}' (from an older fedct, "
                         "or damaged); start the run anew")
    return state
