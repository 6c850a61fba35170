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
    from fedct.export import preprocessing

    decode = preprocessing(read_sidecar(tmp_path / "run" / "best"))["decode"]
    assert "level -600, width 1500" in decode and "by the rule lung" in decode
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


def test_patient_scores_aggregate_slices_and_refuse_a_patient_of_two_labels():
    from fedct.patients import by_patient, parse_aggregate

    groups = ["a", "a", "a", "b", "c", "c"]
    labels = np.array([1, 1, 1, 0, 0, 0])
    probs = np.stack([1 - np.array([.9, .2, .4, .3, .1, .7]), [.9, .2, .4, .3, .1, .7]], axis=1)
    for rule, expected in (("mean", [0.5, 0.3, 0.4]), ("max", [0.9, 0.3, 0.7]),
                           ("top:2", [0.65, 0.3, 0.4])):
        got = by_patient(groups, labels, probs, rule, positive=1)
        assert got["ids"] == ["a", "b", "c"] and got["labels"].tolist() == [1, 0, 0]
        assert got["scores"] == pytest.approx(expected) and got["slices"].tolist() == [3, 1, 2]
    with pytest.raises(FedctError, match="patient 'c': its slices carry 2 labels"):
        by_patient(groups, np.array([1, 1, 1, 0, 0, 1]), probs, "mean", positive=1)
    for bad in ("median", "top:0", "top:x"):
        with pytest.raises(FedctError, match="choose mean, max or top:K"):
            parse_aggregate(bad)


def test_a_run_stores_a_patient_threshold_that_evaluate_and_predict_use(volumes, volume_split,
                                                                         tmp_path):
    from fedct.evaluation import run_evaluate
    from fedct.predict import run_predict
    from fedct.pretrain import run_pretrain
    from fedct.runs import read_sidecar

    settings = {k: v for k, v in TINY.items() if k not in ("rounds", "local_steps")}
    config = build_config(PretrainConfig, None, {**settings, "epochs": 2, "pretrained": "none",
                                                 "threshold": "youden"})
    run_pretrain(volume_split, tmp_path / "run", config, quiet=True)
    meta = read_sidecar(tmp_path / "run" / "best")
    split = load_split(volume_split)
    val_patients = {e.row.group for e in split.entries if e.split == "val"}
    point = meta["patient_operating_point"]
    assert point["aggregate"] == "mean" and point["patients"] == len(val_patients)
    assert point["source"] == "val, per patient" and point["rule"] == "youden"
    report = run_evaluate([tmp_path / "run" / "best"], split_dir=volume_split, on="test",
                          n_boot=20, out=tmp_path / "eval", level="patient")
    (result,) = report["results"]
    test_patients = {e.row.group for e in split.entries if e.split == "test"}
    assert result["n"] == len(test_patients) and report["level"] == "patient"
    assert result["chosen"]["threshold"] == pytest.approx(point["threshold"])
    assert "per patient" in result["chosen"]["source"] and not report["notes"]
    other = run_evaluate([tmp_path / "run" / "best"], split_dir=volume_split, on="test",
                         n_boot=0, out=tmp_path / "eval-max", level="patient", aggregate="max")
    assert other["results"][0]["chosen"]["threshold"] == pytest.approx(meta["operating_point"]
                                                                       ["threshold"])
    assert "no patient-level threshold for aggregate max" in other["notes"][0]
    refused = runner.invoke(app, ["evaluate", str(tmp_path / "run" / "best"), "--engine",
                                  "flower", "--level", "patient"])
    assert refused.exit_code == 2 and "the nodes score slices" in refused.output
    card = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    assert "per patient (mean of its slices)" in card
    predicted = run_predict(tmp_path / "run" / "best", [volumes / "volumes" / "p0002.nii.gz"],
                            out=tmp_path / "p.csv")
    assert predicted["group_threshold"] == pytest.approx(point["threshold"])
    (group,) = predicted["groups"]
    assert group["threshold"] == pytest.approx(point["threshold"])


def test_a_node_with_its_own_volumes_reads_the_slices_its_split_client_does(volume_split,
                                                                            tmp_path):
    from fedct.config import FederateConfig
    from fedct.federated.node import node_data
    from fedct.federated.protocol import RoundSpec

    split = load_split(volume_split)
    mine = {}
    for e in split.select(clients=[1], split="train"):
        mine[e.row.path] = (e.row.label, e.row.group)
    site = split.root / "site-1.csv"
    with site.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        writer.writerows([path, *info] for path, info in mine.items())
    config = build_config(FederateConfig, None, TINY)
    spec = RoundSpec(round=1, planned_rounds=2, architecture="test_efficientnet",
                     classes=tuple(split.classes), mean=(0.5,) * 3, std=(0.25,) * 3,
                     groupnorm=False, positive=split.positive)
    own = node_data({"data": str(site), "client-id": 1}, config, spec)
    by_split = node_data({"split": str(volume_split), "client-id": 1}, config, spec)
    assert len(own.train) == len(by_split.train) > len(mine)  # several slices per volume
    assert own.train.images.sum() == by_split.train.images.sum()
    assert sorted(own.train.labels.tolist()) == sorted(by_split.train.labels.tolist())


def test_val_groups_with_two_labels_give_no_patient_threshold_and_no_failure(tmp_path):
    """Groups that are sites or studies rather than patients (two labels in one) train as
    before: no patient-level threshold is stored, nothing fails."""
    from fedct.data.synthetic import write_synthetic
    from fedct.pretrain import run_pretrain
    from fedct.runs import read_sidecar

    data = write_synthetic(tmp_path / "data", n=96, seed=1, size=48)
    with (data / "dataset.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with (data / "mixed.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows({"path": r["path"], "label": r["label"], "group": f"g{k // 8}"}
                         for k, r in enumerate(rows))  # 8 rows: two patients, two labels
    run_split(data / "mixed.csv", tmp_path / "split", SplitOptions(clients=1, seed=0))
    settings = {k: v for k, v in TINY.items() if k not in ("rounds", "local_steps")}
    config = build_config(PretrainConfig, None, {**settings, "epochs": 1, "pretrained": "none"})
    run_pretrain(tmp_path / "split", tmp_path / "run", config, quiet=True)
    assert "patient_operating_point" not in read_sidecar(tmp_path / "run" / "best")


def test_a_dicom_series_reads_as_the_same_volume_in_order_of_position(tmp_path):
    pytest.importorskip("pydicom")
    from fedct.data.series import write_series

    hu = np.maximum(np.round(read_volume_like_chest()), -1024)  # what uint16 + -1024 holds
    write_series(tmp_path / "series", hu, (0.7, 0.7, 5.0))
    write_volume(tmp_path / "same.nii.gz", hu, (0.7, 0.7, 5.0))
    files = sorted((tmp_path / "series").iterdir())
    files[0].rename(tmp_path / "series" / "zz-first-by-position.dcm")  # names do not order
    series = read_volume(tmp_path / "series")
    assert series.shape == hu.shape
    assert np.array_equal(series, read_volume(tmp_path / "same.nii.gz"))
    assert choose_slices(series, "lung", tmp_path) == choose_slices(hu, "lung", tmp_path)


def test_a_series_that_is_not_one_whole_axial_series_is_named_in_one_line(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from fedct.data.series import write_series

    hu = read_volume_like_chest()[:6]

    def fresh(name):
        folder = tmp_path / name
        write_series(folder, hu, (0.7, 0.7, 5.0))
        return folder, sorted(folder.iterdir())

    cases = []
    folder, files = fresh("mixed")
    write_series(folder / "other", hu[:1], (0.7, 0.7, 5.0))
    (folder / "other" / "slice0000.dcm").rename(folder / "extra.dcm")
    cases.append((folder, "files of 2 series"))
    folder, files = fresh("gap")
    files[3].unlink()
    cases.append((folder, "slice spacing varies from 5.00 to 10.00 mm"))
    folder, files = fresh("twice")
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    ds.save_as(files[2])
    cases.append((folder, "lie at one position"))
    folder, files = fresh("nowhere")
    ds = pydicom.dcmread(files[0])
    del ds.ImagePositionPatient
    ds.save_as(files[0])
    cases.append((folder, "no ImagePositionPatient"))
    folder, files = fresh("sagittal")
    for file in files:
        ds = pydicom.dcmread(file)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.save_as(file)
    cases.append((folder, "not an axial slice"))
    for folder, message in cases:
        with pytest.raises(FedctError, match=message):
            read_volume(folder)


def test_dicom_series_split_and_predict_like_nifti_volumes(tmp_path):
    pytest.importorskip("pydicom")
    data = write_synthetic_volumes(tmp_path / "data", n=6, seed=3, size=32, depth=12,
                                   dicom=True)
    run_split(data / "dataset.csv", tmp_path / "split", SplitOptions(clients=1, seed=0))
    split = load_split(tmp_path / "split")
    assert {e.row.path for e in split.entries} == {f"volumes/p{k:04d}" for k in range(6)}
    images = SplitImages(split, 32)
    entry = split.entries[0]
    expected = resized(window(read_volume(split.root / entry.row.path)[entry.row.slice],
                              (-600.0, 1500.0)), 32)
    assert np.array_equal(images.images[images.index[entry.row.key]][0].numpy(), expected)
    hu = read_volume(data / "volumes" / "p0004")
    from fedct.data.series import write_series

    write_series(data / "volumes" / "p0004", hu + 10.0, (0.7, 0.7, 5.0))  # same names
    with pytest.raises(FedctError, match="changed since it was split"):
        load_split(tmp_path / "split")


def test_predict_reads_series_listed_in_a_csv(checkpoint, tmp_path):
    pytest.importorskip("pydicom")
    from fedct.predict import run_predict

    data = write_synthetic_volumes(tmp_path / "data", n=2, seed=4, size=32, depth=12,
                                   dicom=True)
    listing = data / "scans.csv"
    listing.write_text("path\nvolumes/p0000\nvolumes/p0001\n")
    report = run_predict(checkpoint, [listing], out=tmp_path / "p.csv")
    expected = sum(len(choose_slices(read_volume(data / "volumes" / f"p{k:04d}"), "lung", data))
                   for k in range(2))
    assert report["images"] == expected
    assert [g["group"] for g in report["groups"]] == ["volumes/p0000", "volumes/p0001"]


def test_16_bit_slices_are_windowed_with_a_stated_rescale_or_stretched_as_before(tmp_path):
    from PIL import Image

    from fedct.data.decode import decode_image

    hu = read_volume_like_chest()[6]
    stored = np.clip(np.round(hu) + 1024, 0, 65535).astype(np.uint16)
    for label in ("CT_COVID", "CT_NonCOVID"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(stored).save(tmp_path / "data" / label / f"s{k}.png")
    path = tmp_path / "data" / "CT_COVID" / "s0.png"
    windowed = decode_image(path, rescale=(1.0, -1024.0))
    assert np.array_equal(windowed, window(np.round(hu).clip(-1024), (-600.0, 1500.0)))
    stretched = decode_image(path)
    assert stretched.min() == 0 and stretched.max() == 255  # its own extremes, as before
    result = runner.invoke(app, ["split", str(tmp_path / "data"), "--out", str(tmp_path / "s"),
                                 "--clients", "1", "--hu-rescale", "1,-1024"])
    assert result.exit_code == 0, result.output
    split = load_split(tmp_path / "s")
    assert split.meta["volumes"]["rescale"] == "1,-1024"
    images = SplitImages(split, 32)
    assert np.array_equal(images.images[0][0].numpy(), resized(windowed, 32))
    result = runner.invoke(app, ["split", str(tmp_path / "data"), "--out", str(tmp_path / "t"),
                                 "--hu-rescale", "0,5"])
    assert result.exit_code == 2 and "--hu-rescale 0,5" in result.output
