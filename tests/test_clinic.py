"""From checkpoint to clinic: predict, export, Grad-CAM, model card, TensorBoard and curves."""

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import THRESHOLD, TINY
from PIL import Image
from typer.testing import CliRunner

from fedct import export as export_module
from fedct.cli import app
from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.data.decode import decode_image
from fedct.evaluation import load_model
from fedct.federated import simulation
from fedct.tracking import TensorBoardLog

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def by_hand(stem, paths):
    """Probabilities of the positive class computed apart from fedct's pipeline: decode,
    bicubic resize, scale, replicate, normalise, softmax."""
    model, meta = load_model(stem)
    model.eval()
    size = meta["input_size"][-1]
    mean = torch.tensor(meta["mean"]).view(3, 1, 1)
    std = torch.tensor(meta["std"]).view(3, 1, 1)
    batch = []
    for path in paths:
        pixels = Image.fromarray(decode_image(path)).resize((size, size), Image.Resampling.BICUBIC,
                                                            reducing_gap=3.0)
        gray = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)
        batch.append((gray.expand(3, -1, -1) - mean) / std)
    with torch.no_grad():
        return torch.softmax(model(torch.stack(batch)), dim=1)[:, 0].numpy()


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_folders_and_lists_at_the_stored_threshold(checkpoint, synth_dir, tmp_path):
    folder_images = sorted((synth_dir / "CT_NonCOVID").glob("*.png"))[:6]
    folder = tmp_path / "scans"
    folder.mkdir()
    for image in folder_images:
        (folder / image.name).write_bytes(image.read_bytes())
    listed = sorted((synth_dir / "CT_COVID").glob("*.png"))[:8]
    with (tmp_path / "list.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient"])
        writer.writerows([str(p), f"pt{i // 4}"] for i, p in enumerate(listed))
    out = tmp_path / "preds.csv"
    result = cli("predict", checkpoint, folder, tmp_path / "list.csv", "--out", out,
                 "--group-column", "patient")
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert len(rows) == 14
    assert {r["threshold"] for r in rows} == {str(THRESHOLD)}
    probability = np.array([float(r["probability"]) for r in rows])
    assert np.allclose(probability, by_hand(checkpoint, folder_images + listed), atol=1e-5)
    assert all((r["decision"] == "CT_COVID") == (float(r["probability"]) >= THRESHOLD)
               for r in rows)
    groups = {g["group"]: g for g in read_csv(tmp_path / "preds.groups.csv")}
    assert set(groups) == {"pt0", "pt1"}
    assert float(groups["pt1"]["probability"]) == pytest.approx(probability[10:14].mean(), abs=1e-6)
    assert groups["pt1"]["images"] == "4" and groups["pt1"]["rule"] == "mean"

    again = cli("predict", checkpoint, folder, "--out", out)
    assert again.exit_code == 2 and "exists (use --force" in again.output
    as_json = cli("predict", checkpoint, tmp_path / "list.csv", "--out", out, "--force",
                  "--aggregate", "max", "--group-column", "patient", "--json",
                  "--explain", tmp_path / "maps")
    report = json.loads(as_json.stdout)
    assert report["explanations"]["images"] == 8 and report["explanations"]["localisation"] is None
    assert len(list((tmp_path / "maps").glob("0*.png"))) == 8
    assert (tmp_path / "maps" / "contact_sheet.png").is_file()
    wrong_layer = cli("predict", checkpoint, folder, "--out", tmp_path / "x.csv", "--explain",
                      tmp_path / "maps2", "--cam-layer", "no.such")
    assert wrong_layer.exit_code == 2 and "--cam-layer 'no.such'" in wrong_layer.output
    assert report["threshold_source"] == "youden on val" and len(report["predictions"]) == 8
    assert {g["group"]: g["probability"] for g in report["groups"]}["pt0"] == pytest.approx(
        probability[6:10].max(), abs=1e-6)


def test_predict_bad_inputs_stop_or_are_skipped(checkpoint, synth_dir, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for image in sorted((synth_dir / "CT_COVID").glob("*.png"))[:3]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    out = tmp_path / "preds.csv"
    stopped = cli("predict", checkpoint, folder, "--out", out)
    assert stopped.exit_code == 2 and "broken.png" in stopped.output
    assert len(stopped.output.strip().splitlines()) == 1 and not out.exists()
    skipped = cli("predict", checkpoint, folder, "--out", out, "--skip-bad")
    assert skipped.exit_code == 0 and "skipped:" in skipped.output and "broken.png" in skipped.output
    assert len(read_csv(out)) == 3
    missing = cli("predict", checkpoint, tmp_path / "nowhere", "--out", out, "--force")
    assert missing.exit_code == 2 and "nowhere: no such file" in missing.output


def write_dicom(path, frames: np.ndarray, series: str) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SeriesInstanceUID = series
    ds.Rows, ds.Columns = frames.shape[-2:]
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = frames.astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_predict_groups_dicom_by_series_and_reads_a_multiframe_file_middle_frame(checkpoint,
                                                                                 tmp_path):
    pytest.importorskip("pydicom")
    rng = np.random.default_rng(0)
    series = tmp_path / "series"
    series.mkdir()
    for name, uid in (("a1", "1.2.3.1"), ("a2", "1.2.3.1"), ("b1", "1.2.3.2")):
        write_dicom(series / f"{name}.dcm", rng.integers(0, 2000, (48, 48)), uid)
    frames = rng.integers(0, 2000, (3, 48, 48))
    write_dicom(series / "volume", frames, "1.2.3.3")  # multi-frame, no extension
    write_dicom(tmp_path / "middle.dcm", frames[1], "1.2.3.9")
    result = cli("predict", checkpoint, series, tmp_path / "middle.dcm", "--out",
                 tmp_path / "p.csv", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_name = {p["path"].split("/")[-1]: p for p in report["predictions"]}
    assert set(by_name) == {"a1.dcm", "a2.dcm", "b1.dcm", "volume", "middle.dcm"}
    assert by_name["volume"]["probability"] == pytest.approx(by_name["middle.dcm"]["probability"],
                                                             abs=1e-6)
    groups = {g["group"]: g["images"] for g in report["groups"]}
    assert groups == {"1.2.3.1": 2, "1.2.3.2": 1, "1.2.3.3": 1, "1.2.3.9": 1}


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_gives_fedct_probabilities_from_its_json_alone(checkpoint, synth_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    paths = sorted((synth_dir / "CT_COVID").glob("*.png"))[:4]
    expected = by_hand(checkpoint, paths)
    onnx_file = tmp_path / "model.onnx"
    result = cli("export", checkpoint, "--format", "onnx", "--out", onnx_file)
    assert result.exit_code == 0, result.output
    described = json.loads((tmp_path / "model.onnx.json").read_text())
    prep = described["preprocessing"]
    assert described["threshold"] == THRESHOLD and described["positive"] == "CT_COVID"
    assert described["checked"]["max_abs_difference"] <= 1e-4
    size = prep["height_width"]
    mean = np.array(prep["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.array(prep["std"], dtype=np.float32).reshape(3, 1, 1)
    batch = np.stack([
        (np.repeat(np.asarray(Image.fromarray(decode_image(p)).resize(
            size[::-1], Image.Resampling.BICUBIC, reducing_gap=3.0), dtype=np.float32)[None] / 255,
            3, axis=0) - mean) / std for p in paths]).astype(np.float32)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": batch})[0]
    assert np.abs(got[:, described["classes"].index("CT_COVID")] - expected).max() <= 1e-4

    script = tmp_path / "model.pt"
    assert cli("export", checkpoint, "--format", "torchscript", "--out", script).exit_code == 0
    with torch.no_grad():
        traced = torch.jit.load(str(script))(torch.from_numpy(batch)).numpy()
    assert np.abs(traced[:, 0] - expected).max() <= 1e-4
    again = cli("export", checkpoint, "--format", "torchscript", "--out", script)
    assert again.exit_code == 2 and "exists" in again.output


def test_export_that_disagrees_writes_nothing(checkpoint, tmp_path, monkeypatch):
    make, run = export_module.EXPORTERS["torchscript"]
    monkeypatch.setitem(export_module.EXPORTERS, "torchscript",
                        (make, lambda target, images: run(target, images) + 2e-3))
    result = cli("export", checkpoint, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert result.exit_code == 2 and "differs from fedct" in result.output
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_resume_replaces_the_steps_after_the_resume_point(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardLog(tmp_path, enabled=True)
    for step in (1, 2, 3):
        first.log(step, {"epoch": step, "train_loss": float(step), "val_auc": 0.5})
    first.close()
    resumed = TensorBoardLog(tmp_path, enabled=True)
    for step in (3, 4):
        resumed.log(step, {"epoch": step, "train_loss": 10.0 * step, "val_auc": 0.5})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss/train")]
    assert loss == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert "epoch" not in " ".join(events.Tags()["scalars"])


def test_federate_tracks_epsilon_per_client_and_writes_curves_and_card(split_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "fed"
    config = build_config(FederateConfig, None, {**TINY, "dp": True, "tensorboard": True})
    report = simulation.run_federate(split_dir, out, config, init="none", quiet=True)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    with (out / "privacy.csv").open() as handle:
        privacy = list(csv.DictReader(handle))
    for client in (0, 1):
        logged = [round(e.value, 4) for e in events.Scalars(f"privacy/epsilon_client_{client}")]
        assert logged == [float(r["epsilon"]) for r in privacy if r["client"] == str(client)]
    with (out / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert [e.value for e in events.Scalars("val/auc")] == pytest.approx(
        [float(r["val_auc"]) for r in summary], rel=1e-5)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([TINY["lr"]] * 2)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Privacy" in card and f"| 0 | {report['epsilon']['0']:.3f} |" in card
    split = yaml.safe_load((split_dir / "split.yaml").read_text())
    first = split["clients"][0]["train"]
    assert f"| client 0 train | {first['CT_COVID']} | {first['CT_NonCOVID']} |" in card
    assert ".png" not in card and "not a diagnostic device" in card


@pytest.fixture(scope="module")
def trained(split_dir, tmp_path_factory):
    """A small CNN trained on the synthetic slices: its Grad-CAM can be checked against the
    lesions `fedct synth` drew."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = cli("pretrain", split_dir, "--out", out, "--model", "resnet10t", "--pretrained",
                 "none", "--image-size", 64, "--epochs", 12, "--batch-size", 16, "--lr", 0.003,
                 "--quiet", "--tensorboard")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_pretrain_writes_events_curves_and_card(trained, split_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    with (trained / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert [e.step for e in events.Scalars("loss/train")] == list(range(1, 13))
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(  # stored as float32
        [float(r["lr"]) for r in summary], rel=1e-5)
    assert (trained / "curves.png").is_file()
    card = (trained / "MODEL_CARD.md").read_text()
    counts = yaml.safe_load((split_dir / "split.yaml").read_text())["counts"]
    assert f"| val | {counts['val']['CT_COVID']} | {counts['val']['CT_NonCOVID']} |" in card
    assert "resnet10t" in card and "Wilson" in card


@pytest.mark.slow
def test_grad_cam_peak_falls_in_the_drawn_lesion(trained, split_dir, tmp_path):
    result = cli("evaluate", trained / "best", "--split", split_dir, "--on", "all",
                 "--explain", tmp_path / "maps", "--bootstrap", 50, "--json")
    assert result.exit_code == 0, result.output
    explained = json.loads(result.stdout)["explanations"]["run/best"]
    found = explained["localisation"]
    assert found["images"] == 80 and explained["layer"] == "layer2"
    assert found["peak_in_lesion"] >= 0.4 and found["ci95"][0] > 5 * found["chance"]
    folder = tmp_path / "maps" / "run-best"
    assert len(list(folder.glob("0*.png"))) == 160 and (folder / "contact_sheet.png").is_file()
    card = (trained / "MODEL_CARD.md").read_text()
    assert "| run/best |" in card and "--on all (patient bootstrap)" in card


def test_the_contact_sheet_balances_labels_and_decisions_on_one_scale(tmp_path):
    """At most 12 tiles per (label, decision), in the order true positives, missed
    positives, false alarms, true negatives; maps kept at their own magnitude for the
    sheet's shared scale, each image's PNG at its own peak."""
    import numpy as np

    from fedct.explain import SHEET_PER_GROUP, Explanations

    sheet = Explanations(tmp_path / "maps", "CT_COVID", "CT_NonCOVID", threshold=0.4)
    rng = np.random.default_rng(0)
    for i in range(90):  # at least 15 of each (label, decision)
        truth = "CT_COVID" if i % 2 else "CT_NonCOVID"
        probability = 0.9 if i % 3 else 0.1
        heat = rng.random((32, 32)).astype(np.float32) * (i + 1)
        sheet.add(f"scan{i}.png", (rng.random((32, 32)) * 255).astype(np.uint8), heat,
                  probability, truth)
    headings = [heading for heading, _ in sheet.ordered_groups()]
    assert headings == ["CT_COVID called CT_COVID", "CT_COVID called CT_NonCOVID",
                        "CT_NonCOVID called CT_COVID", "CT_NonCOVID called CT_NonCOVID"]
    assert all(len(tiles) == SHEET_PER_GROUP for _, tiles in sheet.ordered_groups())
    assert sheet.groups[("CT_COVID", "CT_COVID")][-1][1].max() > 1  # raw magnitude kept
    summary = sheet.finish(layer="x", title="Grad-CAM")
    assert summary["contact_sheet"] == "contact_sheet.png" and summary["threshold"] == 0.4
    assert (tmp_path / "maps" / "contact_sheet.png").stat().st_size > 10_000
    assert {r["decision"] for r in sheet.records} == {"CT_COVID", "CT_NonCOVID"}
