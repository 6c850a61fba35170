"""Fault injection: a run killed at any write of a round or epoch resumes to the same result.

Every write a run makes goes through `runs.atomic_write` or a CSV append. A run is killed
just after it commits its first round (epoch): that directory is the snapshot. A resume of
a copy of the snapshot numbers the writes of the second step (its CSV truncations
included); then for each of those writes a fresh copy is resumed, dies just before it, is
resumed again, and its weights, privacy accountants and CSVs are compared with an
uninterrupted run's.
"""

import csv
import shutil

import pytest
import torch

from fedct import records, runs
from fedct.config import FederateConfig, PretrainConfig
from fedct.configure import build_config
from fedct.federated import server as server_module
from fedct.federated.simulation import run_federate
from fedct.pretrain import run_pretrain
from fedct.runs import RESUME, load_resume, read_checkpoint

pytestmark = pytest.mark.slow


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


class WriteLog:
    """Wraps the write functions; names each write and dies before the `die_at`-th."""

    def __init__(self, monkeypatch, appenders: dict, die_at: int | None = None):
        self.names: list[str] = []
        self.die_at = die_at
        real_atomic = runs.atomic_write

        def atomic(path, write):
            self._count(path.name)
            return real_atomic(path, write)

        monkeypatch.setattr(runs, "atomic_write", atomic)
        for (owner, attribute), name in appenders.items():
            real = getattr(owner, attribute)

            def append(*args, _real=real, _name=name, **kwargs):
                self._count(_name or args[0].name)  # None: the file is the first argument
                return _real(*args, **kwargs)

            monkeypatch.setattr(owner, attribute, append)

    def _count(self, name: str) -> None:
        self.names.append(name)
        if self.die_at is not None and len(self.names) == self.die_at:
            raise Killed(name)


def snapshot_and_kill_points(monkeypatch, appends: dict, run, tmp_path) -> tuple[list, range]:
    """(the whole run's write names, the kill points of a resumed second step), leaving
    the snapshot (first step committed) in tmp_path / "snapshot"."""
    with monkeypatch.context() as patch:
        log = WriteLog(patch, appends)
        run(tmp_path / "whole", resume=False)
    first_commit = log.names.index(RESUME) + 1
    with monkeypatch.context() as patch, pytest.raises(Killed):
        WriteLog(patch, appends, die_at=first_commit + 1)
        run(tmp_path / "snapshot", resume=False)
    shutil.copytree(tmp_path / "snapshot", tmp_path / "resumed")
    with monkeypatch.context() as patch:
        resumed = WriteLog(patch, appends)
        run(tmp_path / "resumed", resume=True)
    return resumed.names, range(1, resumed.names.index(RESUME) + 2)


def killed_and_resumed(monkeypatch, appends: dict, run, tmp_path, die_at: int):
    """A copy of the snapshot, resumed, killed before write `die_at`, resumed again."""
    out = tmp_path / f"killed-{die_at}"
    shutil.copytree(tmp_path / "snapshot", out)
    with monkeypatch.context() as patch, pytest.raises(Killed):
        WriteLog(patch, appends, die_at=die_at)
        run(out, resume=True)
    (out / ".last.safetensors.k1ll3d").write_bytes(b"half a write")  # as SIGKILL leaves it
    run(out, resume=True)
    return out


def rows(path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(handle)]


FEDERATE = {"model": "test_efficientnet", "image_size": 32, "batch_size": 16, "lr": 3e-3,
            "rounds": 2, "local_steps": 2, "dp": True, "target_epsilon": 4.0}
FEDERATE_APPENDS = {(records, "append_summary"): "summary.csv",
                    (server_module, "append_rows"): None}  # privacy.csv, clients.csv


@pytest.fixture(scope="module")
def split_dir(synth_dir, tmp_path_factory):
    """Two IID clients, each with local validation rows (for clients.csv)."""
    from fedct.data.manifest import SplitOptions, run_split

    out = tmp_path_factory.mktemp("rsplit") / "split"
    run_split(synth_dir / "dataset.csv", out, SplitOptions(scheme="iid", clients=2, seed=0,
                                                          local_val=0.2))
    return out


def test_federated_run_killed_at_every_write_of_a_round_resumes_exactly(split_dir, tmp_path,
                                                                         monkeypatch):
    config = build_config(FederateConfig, None, FEDERATE)

    def run(out, resume):
        run_federate(split_dir, out, config, init="none", quiet=True, resume=resume)

    names, points = snapshot_and_kill_points(monkeypatch, FEDERATE_APPENDS, run, tmp_path)
    whole = tmp_path / "whole"
    expected, _ = read_checkpoint(whole / "final")
    assert {"summary.csv", "privacy.csv", "clients.csv", "last.safetensors", RESUME} <= {
        names[k - 1] for k in points}
    for die_at in [None, *points]:
        out = (tmp_path / "resumed" if die_at is None
               else killed_and_resumed(monkeypatch, FEDERATE_APPENDS, run, tmp_path, die_at))
        what = f"killed before write {die_at} ({names[die_at - 1] if die_at else 'none'})"
        final, _ = read_checkpoint(out / "final")
        assert all(torch.equal(final[k], expected[k]) for k in expected), what
        assert rows(out / "summary.csv") == rows(whole / "summary.csv"), what
        assert rows(out / "privacy.csv") == rows(whole / "privacy.csv"), what
        assert rows(out / "clients.csv") == rows(whole / "clients.csv"), what
        states = load_resume(out)["extra"]["client_states"]
        reference = load_resume(whole)["extra"]["client_states"]
        assert [states[k]["accountant"] for k in (0, 1)] == \
            [reference[k]["accountant"] for k in (0, 1)], what
        assert not list(out.glob(".*")), what  # no temporary files left behind


def test_stage1_killed_at_every_write_of_an_epoch_resumes_exactly(split_dir, tmp_path,
                                                                 monkeypatch):
    appends = {(records, "append_summary"): "summary.csv"}
    config = build_config(PretrainConfig, None, {"model": "test_efficientnet", "pretrained": "none",
                                                 "image_size": 32, "batch_size": 16,
                                                 "epochs": 2, "ema_decay": 0.9})

    def run(out, resume):
        run_pretrain(split_dir, out, config, quiet=True, resume=resume)

    names, points = snapshot_and_kill_points(monkeypatch, appends, run, tmp_path)
    expected, _ = read_checkpoint(tmp_path / "whole" / "last")
    assert {"summary.csv", "last.safetensors", RESUME} <= {names[k - 1] for k in points}
    for die_at in [None, *points]:
        out = (tmp_path / "resumed" if die_at is None
               else killed_and_resumed(monkeypatch, appends, run, tmp_path, die_at))
        what = f"killed before write {die_at} ({names[die_at - 1] if die_at else 'none'})"
        last, _ = read_checkpoint(out / "last")
        assert all(torch.equal(last[k], expected[k]) for k in expected), what
        assert rows(out / "summary.csv") == rows(tmp_path / "whole" / "summary.csv"), what
