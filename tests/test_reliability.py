"""Fault injection: a run killed at any write of a round or epoch resumes to the same result.

Every write a run makes goes through `runs.atomic_write` or a CSV append; the tests number
those writes in an uninterrupted run, then for each write of the second round (epoch) start
a fresh run that dies just before it, resume it, and compare weights, the privacy
accountants and the CSVs with the uninterrupted run.
"""

import csv

import pytest
import torch

from fedct import runs
from fedct.config import FederateConfig, PretrainConfig, build_config
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


def second_step_writes(names: list[str]) -> range:
    """1-based numbers of the writes after the first resume.pt up to the second one."""
    ends = [i + 1 for i, name in enumerate(names) if name == RESUME]
    return range(ends[0] + 1, ends[1] + 1)


def rows(path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(handle)]


FEDERATE = {"model": "test_efficientnet", "image_size": 32, "batch_size": 16, "lr": 3e-3,
            "rounds": 2, "local_steps": 2, "dp": True, "target_epsilon": 4.0}
FEDERATE_APPENDS = {(server_module, "append_summary"): "summary.csv",
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
    with monkeypatch.context() as patch:
        log = WriteLog(patch, FEDERATE_APPENDS)
        run_federate(split_dir, tmp_path / "whole", config, init="none", quiet=True)
    whole = tmp_path / "whole"
    expected, _ = read_checkpoint(whole / "final")
    writes = second_step_writes(log.names)
    assert {"summary.csv", "privacy.csv", "clients.csv", "last.safetensors", RESUME} <= {
        log.names[k - 1] for k in writes}
    for die_at in writes:
        out = tmp_path / f"killed-{die_at}"
        with monkeypatch.context() as patch, pytest.raises(Killed):
            WriteLog(patch, FEDERATE_APPENDS, die_at=die_at)
            run_federate(split_dir, out, config, init="none", quiet=True)
        (out / ".last.safetensors.k1ll3d").write_bytes(b"half a write")  # as SIGKILL leaves it
        run_federate(split_dir, out, config, init="none", quiet=True, resume=True)
        what = f"killed before write {die_at} ({log.names[die_at - 1]})"
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
    import fedct.pretrain as pretrain_module

    appends = {(pretrain_module, "append_summary"): "summary.csv"}
    config = build_config(PretrainConfig, None, {"model": "test_efficientnet", "pretrained": "none",
                                                 "image_size": 32, "batch_size": 16,
                                                 "epochs": 2, "ema_decay": 0.9})
    with monkeypatch.context() as patch:
        log = WriteLog(patch, appends)
        run_pretrain(split_dir, tmp_path / "whole", config, quiet=True)
    expected, _ = read_checkpoint(tmp_path / "whole" / "last")
    for die_at in second_step_writes(log.names):
        out = tmp_path / f"killed-{die_at}"
        with monkeypatch.context() as patch, pytest.raises(Killed):
            WriteLog(patch, appends, die_at=die_at)
            run_pretrain(split_dir, out, config, quiet=True)
        run_pretrain(split_dir, out, config, quiet=True, resume=True)
        what = f"killed before write {die_at} ({log.names[die_at - 1]})"
        last, _ = read_checkpoint(out / "last")
        assert all(torch.equal(last[k], expected[k]) for k in expected), what
        assert rows(out / "summary.csv") == rows(tmp_path / "whole" / "summary.csv"), what
