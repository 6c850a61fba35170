import csv

import pytest
import yaml
from conftest import COVID_CSV, require_shared
from typer.testing import CliRunner

from fedct import __version__
from fedct.cli import app
from fedct.data.manifest import load_split

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version_and_help():
    assert __version__ in invoke("--version").output
    for command in ["split", "synth"]:
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Example" in result.output


def test_split_writes_three_files_and_prints_table(synth_dir, tmp_path):
    out = tmp_path / "split"
    result = invoke("split", synth_dir / "dataset.csv", "--out", out, "--scheme", "dirichlet",
                    "--alpha", "0.5", "--clients", 4, "--seed", 1)
    assert result.exit_code == 0, result.output
    assert "heterogeneity" in result.output and "client" in result.output
    assert {p.name for p in out.iterdir()} == {"manifest.csv", "split.yaml", "partition.png"}
    meta = yaml.safe_load((out / "split.yaml").read_text())
    assert meta["seed"] == 1 and meta["partition"]["scheme"] == "dirichlet"
    assert len(meta["dataset"]["fingerprint"]) == 64
    split = load_split(out)
    assert len(split.entries) == 160 and split.positive == "CT_COVID"
    again = tmp_path / "again"
    invoke("split", synth_dir / "dataset.csv", "--out", again, "--scheme", "dirichlet",
           "--alpha", "0.5", "--clients", 4, "--seed", 1)
    assert (again / "manifest.csv").read_text() == (out / "manifest.csv").read_text()


def test_natural_split_by_site(synth_dir, tmp_path):
    result = invoke("split", synth_dir / "dataset.csv", "--out", tmp_path / "s", "--scheme",
                    "natural", "--by", "site")
    assert result.exit_code == 0, result.output
    assert load_split(tmp_path / "s").num_clients == 4


def test_errors_are_one_line_exit_2_and_write_nothing(synth_dir, tmp_path):
    cases = [
        (["--scheme", "bogus"], "bogus"),
        (["--scheme", "dirichlet", "--alpha", "0"], "--alpha"),
        (["--clients", "1000"], "groups"),
        (["--keep-split"], "split value"),
    ]
    for extra, needle in cases:
        out = tmp_path / "never"
        result = invoke("split", synth_dir / "dataset.csv", "--out", out, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert needle in result.output and "Traceback" not in result.output
        assert not out.exists()
    missing = invoke("split", tmp_path / "nope.csv", "--out", tmp_path / "x")
    assert missing.exit_code == 2 and "nope.csv" in missing.output


def test_existing_output_is_kept_without_force(synth_dir, tmp_path):
    out = tmp_path / "split"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = invoke("split", synth_dir, "--out", out)
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "precious.txt").read_text() == "keep me"
    assert invoke("split", synth_dir, "--out", out, "--force").exit_code == 0
    assert (out / "manifest.csv").exists() and not (out / "precious.txt").exists()


def test_missing_image_in_csv_is_named(tmp_path, synth_dir):
    import shutil

    shutil.copy(synth_dir / "CT_COVID" / "p0000_s0.png", tmp_path / "present.png")
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("path,label\npresent.png,a\nmissing.png,b\n")
    result = invoke("split", csv_path, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "missing.png" in result.output


def test_changed_dataset_is_detected(tmp_path, monkeypatch):
    from fedct.data.synthetic import write_synthetic
    from fedct.errors import FedctError

    monkeypatch.setenv("FEDCT_CACHE", str(tmp_path / "cache"))
    data = write_synthetic(tmp_path / "d", n=40, size=32)
    assert invoke("split", data, "--out", tmp_path / "s", "--clients", 2).exit_code == 0
    load_split(tmp_path / "s")  # a passed check is remembered, not re-hashed next time
    assert len(list((tmp_path / "cache").glob("verified-*"))) == 1
    (data / "CT_COVID" / "p0000_s0.png").write_bytes(
        (data / "CT_COVID" / "p0000_s1.png").read_bytes())
    try:
        load_split(tmp_path / "s")
    except FedctError as exc:
        assert "changed" in str(exc)
    else:
        raise AssertionError("a changed dataset went unnoticed")


def test_real_covid_ct_keep_split_dirichlet(tmp_path):
    require_shared(COVID_CSV)
    out = tmp_path / "covid"
    result = invoke("split", COVID_CSV, "--keep-split", "--clients", 5, "--scheme", "dirichlet",
                    "--alpha", "0.5", "--seed", 1, "--out", out)
    assert result.exit_code == 0, result.output
    with (out / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 543
    assert sum(r["split"] == "train" for r in rows) == 425
    assert sum(r["split"] == "val" for r in rows) == 118
    assert {r["client"] for r in rows if r["split"] == "train"} == {"0", "1", "2", "3", "4"}
    assert "CT_COVID" in result.output


def test_an_edit_that_restores_size_and_mtime_is_still_detected(tmp_path):
    import os

    from fedct.data.synthetic import write_synthetic
    from fedct.errors import FedctError

    data = write_synthetic(tmp_path / "d", n=40, size=32)
    assert invoke("split", data, "--out", tmp_path / "s", "--clients", 2).exit_code == 0
    load_split(tmp_path / "s")  # remembered as verified
    image = data / "CT_COVID" / "p0000_s0.png"
    before = image.stat()
    payload = bytearray(image.read_bytes())
    payload[-20] ^= 0xFF  # same size, other bytes
    image.write_bytes(bytes(payload))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(FedctError, match="changed since it was split"):
        load_split(tmp_path / "s")
