"""NIfTI volumes as slices: orientation and windowing, the slice rules, split / pretrain /
evaluate / predict on generated volumes, the cache and fingerprint with many slices per
file, and the one-line errors for volumes that are not one chest CT."""

import csv
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import PretrainConfig
from fedct.configure import build_config
from fedct.data.loading import SplitImages, resized
from fedct.data.manifest import SplitOptions, load_split, run_split
from fedct.data.synthetic_volumes import write_synthetic_volumes
from fedct.data.volumes import (
    VolumeOptions,
    choose_slices,
    lung_share,
    parse_slices,
    parse_window,
    read_volume,
    window,
    write_volume,
)
from fedct.errors import FedctError

pytest.importorskip("nibabel")
runner = CliRunner()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    return write_synthetic_volumes(root / "data", n=12, seed=0, size=48, depth=20, sites=2)


@pytest.fixture(scope="module")
def volume_split(volumes, tmp_path_factory):
    out = tmp_path_factory.mktemp("vsplit") / "split"
    run_split(volumes / "dataset.csv", out, SplitOptions(clients=2, seed=0))
    return out


def test_a_volume_reads_back_anterior_up_and_the_patients_right_on_the_left(tmp_path):
    hu = np.full((6, 10, 12), -1000.0)
    hu[2, 1, 2] = 500.0  # slice 2, near the top (anterior), near the left (patient's right)
    write_volume(tmp_path / "v.nii.gz", hu, (0.7, 0.7, 5.0))
    back = read_volume(tmp_path / "v.nii.gz")
    assert back.shape == (6, 10, 12) and back[2, 1, 2] == 500.0
    assert np.count_nonzero(back > 0) == 1
    assert window(np.array([-1350.0, -600.0, 150.0, 900.0]), (-600, 1500)).tolist() == [0, 128,
                                                                                         255, 255]


def test_slice_rules_and_windows():
    assert parse_slices("all") == ("all", 0) and parse_slices("every:3") == ("every", 3)
    assert parse_slices("middle:4") == ("middle", 4) and parse_slices("lung") == ("lung", 0.05)
    assert parse_slices("lung:0.2") == ("lung", 0.2)
    assert parse_window("mediastinum") == (40.0, 400.0) and parse_window("-500,1000") == (-500, 1000)
    for bad in ("some", "every:0", "middle:x", "lung:2"):
        with pytest.raises(FedctError, match="--slices"):
            parse_slices(bad)
    for bad in ("soft", "40", "40,-1"):
        with pytest.raises(FedctError, match="--window"):
            parse_window(bad)
    volume = np.zeros((10, 4, 4))
    assert choose_slices(volume, "every:4", None) == [0, 4, 8]
    assert choose_slices(volume, "middle:3", None) == [3, 4, 5]
    assert choose_slices(volume, "middle:30", None) == list(range(10))


def test_the_lung_rule_keeps_chest_slices_and_drops_abdomen_and_neck(volumes):
    volume = read_volume(volumes / "volumes" / "p0000.nii.gz")
    kept = choose_slices(volume, "lung", volumes)
    shares = [lung_share(hu) for hu in volume]
    assert kept == [z for z, s in enumerate(shares) if s >= 0.05]
    assert 0 not in kept and len(volume) - 1 not in kept  # abdomen and neck
    assert 4 <= len(kept) < len(volume)
    assert max(shares[z] for z in range(len(volume)) if z not in kept) < 0.05


def test_a_split_of_volumes_keeps_each_volume_whole_and_records_its_slices(volumes, volume_split):
    split = load_split(volume_split)
    assert split.meta["volumes"] == {"slices": "lung", "window": "lung", "level": -600.0,
                                     "width": 1500.0}
    assert "warnings" not in split.meta  # a volume is its own patient group
    by_volume = {}
    for e in split.entries:
        assert e.row.slice is not None
        by_volume.setdefault(e.row.path, set()).add((e.split, e.client))
    assert len(by_volume) == 12 and all(len(v) == 1 for v in by_volume.values())
    with (volume_split / "manifest.csv").open() as handle:
        assert next(csv.reader(handle))[-1] == "slice"
    # the cached images are the windowed, resized slices
    images = SplitImages(split, 32)
    entry = split.entries[5]
    hu = read_volume(split.root / entry.row.path)[entry.row.slice]
    expected = resized(window(hu, (-600.0, 1500.0)), 32)
    assert torch.equal(images.images[images.index[entry.row.key]][0],
                       torch.from_numpy(expected.copy()))
    assert len(images.index) == len(split.entries)


def test_an_edited_volume_or_volume_record_is_refused(volumes, volume_split, tmp_path):
    data, split = tmp_path / "data", tmp_path / "split"
    shutil.copytree(volumes, data)
    run_split(data / "dataset.csv", split, SplitOptions(clients=2, seed=0))
    meta = yaml.safe_load((split / "split.yaml").read_text())
    meta["volumes"]["window"] = "mediastinum"  # the level and width no longer match
    (split / "split.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    with pytest.raises(FedctError, match="key 'volumes'"):
        load_split(split)
    run_split(data / "dataset.csv", split, SplitOptions(clients=2, seed=0), force=True)
    hu = read_volume(data / "volumes" / "p0003.nii.gz")
    write_volume(data / "volumes" / "p0003.nii.gz", hu + 5.0, (0.7, 0.7, 5.0))
    with pytest.raises(FedctError, match="changed since it was split"):
        load_split(split)


def test_volumes_that_are_not_one_chest_ct_are_named_in_one_line(tmp_path):
    import nibabel as nib

    cases = {
        "four.nii.gz": (np.zeros((8, 8, 8, 2), np.int16), "4-D NIfTI"),
        "flat.nii": (np.zeros((8, 8), np.int16), "2-D NIfTI"),
        "belly.nii.gz": (np.full((8, 8, 8), 40, np.int16), "no lung slice"),
    }
    (tmp_path / "CT_COVID").mkdir()
    (tmp_path / "CT_NonCOVID").mkdir()
    write_volume(tmp_path / "CT_NonCOVID" / "ok.nii.gz",
                 read_volume_like_chest(), (0.7, 0.7, 5.0))
    for name, (data, message) in cases.items():
        folder = tmp_path / "bad"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tmp_path / "CT_NonCOVID", folder / "CT_NonCOVID")
        (folder / "CT_COVID").mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / "CT_COVID" / name))
        result = runner.invoke(app, ["split", str(folder), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert name in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()
    (folder / "CT_COVID" / "good.nii.gz").write_bytes(
        (tmp_path / "CT_NonCOVID" / "ok.nii.gz").read_bytes())
    result = runner.invoke(app, ["split", str(folder), "--out", str(tmp_path / "out"),
                                 "--skip-bad", "--clients", "1"])
    assert result.exit_code == 0 and "skipped:" in result.output and "no lung slice" in result.output
    result = runner.invoke(app, ["split", str(folder), "--out", str(tmp_path / "o2"),
                                 "--slices", "lung:7"])
    assert result.exit_code == 2 and "--slices lung:7" in result.output


def read_volume_like_chest() -> np.ndarray:
    from fedct.data.synthetic_volumes import synth_volume

    return synth_volume(np.random.default_rng(0), size=32, depth=12, lesion=None, noise=10,
                        offset=0)


def test_a_model_trained_on_volumes_scores_and_predicts_them_with_its_window(
        volumes, volume_split, tmp_path):
    from fedct.evaluation import run_evaluate
    from fedct.predict import run_predict
    from fedct.pretrain import run_pretrain
    from fedct.runs import read_sidecar

    settings = {k: v for k, v in TINY.items() if k not in ("rounds", "local_steps")}
    config = build_config(PretrainConfig, None, {**settings, "epochs": 2, "pretrained": "none"})
    run_pretrain(volume_split, tmp_path / "run", config, quiet=True)
    assert read_sidecar(tmp_path / "run" / "best")["volumes"]["window"] == "lung"
    split = load_split(volume_split)
    report = run_evaluate([tmp_path / "run" / "best"], data=volumes / "dataset.csv", n_boot=0,
                          out=tmp_path / "eval", volumes=VolumeOptions())
    assert report["images"] == len(split.entries)  # the same slices as the split's
    volume = volumes / "volumes" / "p0001.nii.gz"
    result = runner.invoke(app, ["predict", str(tmp_path / "run" / "best"), str(volume),
                                 "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    kept = choose_slices(read_volume(volume), "lung", volume)
    assert [r["path"] for r in rows] == [f"{volume}#{k}" for k in kept]
    assert {r["group"] for r in rows} == {str(volume)}
    with (tmp_path / "p.groups.csv").open() as handle:
        (group,) = list(csv.DictReader(handle))
    assert int(group["images"]) == len(kept)
    assert float(group["probability"]) == pytest.approx(np.mean([float(r["probability"])
                                                                 for r in rows]))
    every = run_predict(tmp_path / "run" / "best", [volume], out=tmp_path / "all.csv",
                        volumes=VolumeOptions(slices="all"))
    assert every["images"] == 20
