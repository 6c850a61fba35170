"""What fedct writes and reads around a run: one-class evaluations, outputs that never
overwrite inputs, one writer per run directory, and inputs that used to give tracebacks or
silent acceptances (each case gets a one-line error, exit code 2, or the right result)."""

import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
import yaml
from conftest import TINY
from PIL import Image
from rich.console import Console
from safetensors import SafetensorError
from typer.testing import CliRunner

from fedct import runs
from fedct.cli import app
from fedct.config import FederateConfig, PretrainConfig
from fedct.configure import build_config
from fedct.data.manifest import MANIFEST, SPLIT_YAML, load_split, manifest_digest, write_manifest
from fedct.federated import simulation
from fedct.locks import exclusive, lock_path
from fedct.pretrain import run_pretrain

runner = CliRunner()
STAGE1 = {"model": "test_efficientnet", "pretrained": "none", "image_size": 32,
          "batch_size": 16, "epochs": 1, "lr": 3e-3}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, says: str) -> bool:
    """Exit code 2 and one line of error (predict's progress lines on stderr aside)."""
    lines = [line for line in result.output.splitlines()
             if line.strip() and not line.startswith("predict: ")]
    return (result.exit_code == 2 and "Traceback" not in result.output
            and len(lines) == 1 and lines[0].startswith("error:") and says in result.output)


@pytest.fixture(scope="module")
def run(split_dir, tmp_path_factory):
    """A real stage-1 run (tiny model, one epoch): config.yaml, report.json, card, checkpoints."""
    out = tmp_path_factory.mktemp("stage1") / "run"
    run_pretrain(split_dir, out, build_config(PretrainConfig, None, STAGE1), quiet=True)
    return out


def image_folder(synth_dir, target, classes=("CT_NonCOVID",), count=8):
    for name in classes:
        (target / name).mkdir(parents=True)
        for path in sorted((synth_dir / name).glob("*.png"))[:count]:
            shutil.copy(path, target / name / path.name)
    return target


def test_a_one_class_evaluation_reports_what_is_defined_and_poisons_nothing(run, split_dir,
                                                                           synth_dir, tmp_path):
    from fedct.model_card import record_evaluation

    healthy = image_folder(synth_dir, tmp_path / "healthy")
    result = cli("evaluate", run / "best", "--data", healthy, "--bootstrap", 50,
                 "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "note: no image is CT_COVID: specificity is defined" in result.output
    chosen = json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"][0]["chosen"]
    assert chosen["sensitivity"] is None and chosen["auc"] is None
    assert chosen["ci95"]["sensitivity"] == [None, None] and chosen["specificity"] is not None
    # external data never goes on the run's card; a one-class record on it reads n/a
    assert "healthy" not in (run / "MODEL_CARD.md").read_text()
    record_evaluation(run, {"checkpoint": "run/best", "data": "one-class val", "n": 8,
                            "patient_bootstrap": False, "chosen": chosen})
    assert "n/a" in (run / "MODEL_CARD.md").read_text()
    sick = image_folder(synth_dir, tmp_path / "sick", classes=("CT_COVID",))
    positive_only = cli("evaluate", run / "best", "--data", sick, "--bootstrap", 0)
    assert positive_only.exit_code == 0 and "every image is CT_COVID" in positive_only.output
    negative = cli("evaluate", run / "best", "--split", split_dir, "--bootstrap", -5)
    assert one_line_error(negative, "--bootstrap -5: must be >= 0")


def test_a_damaged_evaluations_file_does_not_stop_the_next_evaluation(run, split_dir):
    (run / "evaluations.json").write_text('[{"checkpoint": "run/best"}, 3, {"chosen": null')
    result = cli("evaluate", run / "best", "--split", split_dir, "--bootstrap", 0)
    assert result.exit_code == 0, result.output
    assert len(json.loads((run / "evaluations.json").read_text())) == 1


def test_evaluate_finds_the_runs_split_and_cards_only_its_own_split(run, split_dir, checkpoint,
                                                                   synth_dir, tmp_path):
    """Without --split, a run's checkpoint is scored on the split its config.yaml names;
    only that split's scores go on the run's card."""
    (run / "evaluations.json").unlink(missing_ok=True)
    own = cli("evaluate", run / "best", "--on", "val", "--bootstrap", 0, "--json")
    assert own.exit_code == 0, own.output
    report = json.loads(own.output)
    assert report["split"] == str(split_dir.resolve()) and report["model_cards"]
    assert len(json.loads((run / "evaluations.json").read_text())) == 1
    from conftest import make_split

    other = make_split(synth_dir, tmp_path / "other", seed=5)
    elsewhere = cli("evaluate", run / "best", "--split", other, "--bootstrap", 0, "--json")
    assert elsewhere.exit_code == 0 and json.loads(elsewhere.output)["model_cards"] == []
    assert len(json.loads((run / "evaluations.json").read_text())) == 1
    outside = cli("evaluate", checkpoint)  # a checkpoint outside any run directory
    assert one_line_error(outside, "--split SPLIT_DIR (with --on) or --data PATH (the "
                                   "checkpoint's run names no split)")


def test_no_command_overwrites_an_input_even_with_force(run, synth_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in run.glob("best.*")}
    for out, says in ((run / "best.safetensors", "is the input"),
                      (run / "best", "is the input")):  # OUT.json would be the sidecar
        result = cli("export", run / "best", "--format", "torchscript", "--out", out, "--force")
        assert one_line_error(result, says), result.output
    assert {p.name: p.read_bytes() for p in run.glob("best.*")} == before
    scans = tmp_path / "scans"
    shutil.copytree(synth_dir / "CT_COVID", scans)
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "".join(f"scans/{p.name}\n" for p in sorted(scans.iterdir())[:3]))
    kept = listing.read_text()
    as_list = cli("predict", run / "best", listing, "--out", listing, "--force")
    assert one_line_error(as_list, "is the input"), as_list.output
    assert listing.read_text() == kept
    scan = sorted(scans.iterdir())[0]
    pixels = scan.read_bytes()
    as_scan = cli("predict", run / "best", scans, "--out", scan, "--force")
    assert one_line_error(as_scan, "is the input") and scan.read_bytes() == pixels
    folder = tmp_path / "a-folder"
    folder.mkdir()
    as_folder = cli("predict", run / "best", scans, "--out", folder, "--force")
    assert one_line_error(as_folder, "is a folder") and not any(folder.iterdir())


def test_heat_maps_stay_apart_from_the_scans_and_a_failed_run_leaves_none(run, synth_dir,
                                                                          tmp_path, monkeypatch):
    scans = tmp_path / "scans"
    shutil.copytree(synth_dir / "CT_COVID", scans)
    inside = cli("predict", run / "best", scans, "--out", tmp_path / "p.csv",
                 "--explain", scans / "maps")
    assert one_line_error(inside, "--explain"), inside.output
    assert not (scans / "maps").exists()
    from fedct import predict as predict_module

    real, calls = predict_module.decode_resized, []

    def fail_late(path, size, *options):
        calls.append(path)
        if len(calls) == 40:  # in the second batch, after 32 heat maps were drawn
            raise RuntimeError("the machine went away")
        return real(path, size, *options)

    monkeypatch.setattr(predict_module, "decode_resized", fail_late)
    with pytest.raises(RuntimeError):
        predict_module.run_predict(run / "best", [scans], out=tmp_path / "p.csv",
                                   explain=tmp_path / "maps")
    assert not (tmp_path / "maps").exists() and not (tmp_path / "p.csv").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_checkpoints_of_two_runs_with_one_name_keep_their_own_curves(run, split_dir, tmp_path):
    from fedct.errors import FedctError
    from fedct.evaluation import checkpoint_names

    twin = tmp_path / "elsewhere" / run.name
    shutil.copytree(run, twin)
    assert checkpoint_names([run / "best", twin / "best"]) == [
        f"{run.parent.name}/run/best", "elsewhere/run/best"]
    with pytest.raises(FedctError, match="given twice"):
        checkpoint_names([run / "best", run / "best.safetensors"])
    result = cli("evaluate", run / "best", twin / "best", "--split", split_dir, "--bootstrap", 0,
                 "--json")
    assert result.exit_code == 0, result.output
    names = [r["checkpoint"] for r in json.loads(result.output)["results"]]
    assert len(set(names)) == 2


def test_a_second_writer_is_refused_with_the_holders_pid(split_dir, synth_dir, tmp_path):
    target = tmp_path / "busy"
    with exclusive(target):
        result = cli("pretrain", split_dir, "--out", target, *flags(STAGE1))
        assert one_line_error(result, f"another fedct process (pid {os.getpid()})"), result.output
        resumed = cli("federate", split_dir, "--init", "none", "--out", target, *flags(TINY))
        assert one_line_error(resumed, f"pid {os.getpid()}"), resumed.output
    assert not lock_path(target).exists()  # removed by its holder
    with exclusive(tmp_path / "split"):
        split = cli("split", synth_dir / "dataset.csv", "--out", tmp_path / "split")
        assert one_line_error(split, "is writing this split"), split.output
    lock_path(target).write_text("999999\n")  # a holder that died without cleaning up
    with exclusive(target):
        assert lock_path(target).read_text() == f"{os.getpid()}\n"


def flags(settings: dict) -> list[str]:
    return [f for key, value in settings.items() for f in (f"--{key.replace('_', '-')}", value)]


def test_a_client_without_rows_fails_its_part_and_the_round_goes_on(split_dir, tmp_path):
    copy = tmp_path / "split"
    shutil.copytree(split_dir, copy)
    entries = [dataclasses.replace(e, client=0) if e.client == 1 else e
               for e in load_split(copy).entries]
    write_manifest(copy / MANIFEST, entries)  # as a split tool that left client 1 empty would
    meta = yaml.safe_load((copy / SPLIT_YAML).read_text())
    meta["manifest_digest"] = manifest_digest(entries)
    (copy / SPLIT_YAML).write_text(yaml.safe_dump(meta, sort_keys=False))
    log = io.StringIO()
    report = simulation.run_federate(copy, tmp_path / "run", build_config(
        FederateConfig, None, {**TINY, "rounds": 1}), init="none",
        console=Console(file=log, force_terminal=False, width=120))
    assert report["rounds"] == 1 and report["final"]["clients"] == 1
    assert "no training rows" in log.getvalue(), log.getvalue()


def test_federate_resumes_from_the_run_alone(split_dir, tmp_path):
    cut = tmp_path / "cut"
    simulation.run_federate(split_dir, cut, build_config(FederateConfig, None, TINY),
                            init="none", quiet=True, stop_after=1)
    result = cli("federate", "--resume", cut, "--quiet")
    assert result.exit_code == 0, result.output
    assert (cut / "final.safetensors").is_file()
    other = cli("pretrain", "--resume", cut)
    assert one_line_error(other, "a `fedct federate` run, not a `fedct pretrain` one")


def test_a_full_disk_is_a_one_line_error_and_the_run_resumes(split_dir, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(runs, "save_file", full)
    result = cli("pretrain", split_dir, "--out", tmp_path / "run", *flags(STAGE1), "--quiet")
    assert one_line_error(result, "run/last.safetensors: cannot write the checkpoint"), result.output
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("args, says", [
    (["split", "{data}", "--out", "{tmp}/s", "--fractions", "nan,0.5,0.5"], "expected finite"),
    (["split", "{data}", "--out", "{tmp}/s", "--alpha", "nan"], "--alpha nan: must be a finite"),
    (["federate", "{split}", "--init", "none", "--out", "{tmp}/r", "--noise-multiplier", "nan"],
     "--noise-multiplier nan: must be a finite number"),
    (["federate", "{split}", "--init", "none", "--out", "{tmp}/r", "--config", "{tmp}/nan.yaml"],
     "key 'noise_multiplier' has value nan, expected a finite number"),
    (["federate", "{split}", "--init", "none", "--out", "{tmp}/r", "--lr", "inf"], "finite"),
])
def test_non_finite_numbers_are_refused(split_dir, synth_dir, tmp_path, args, says):
    (tmp_path / "nan.yaml").write_text("dp: true\nnoise_multiplier: .nan\n")
    filled = [a.format(data=synth_dir / "dataset.csv", tmp=tmp_path, split=split_dir) for a in args]
    result = cli(*filled)
    assert one_line_error(result, says), result.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_text_that_is_not_utf8_is_named(run, synth_dir, tmp_path):
    data = tmp_path / "latin1.csv"
    data.write_bytes("path,label\nCT_COVID/\xe9t\xe9.png,CT_COVID\n".encode("latin-1"))
    split = cli("split", data, "--out", tmp_path / "s")
    assert one_line_error(split, "latin1.csv: not UTF-8 text"), split.output
    predict = cli("predict", run / "best", data, "--out", tmp_path / "p.csv")
    assert one_line_error(predict, "latin1.csv: not UTF-8 text"), predict.output


def test_a_one_class_dataset_is_not_split_for_training(synth_dir, tmp_path):
    healthy = image_folder(synth_dir, tmp_path / "healthy", count=20)
    result = cli("split", healthy, "--out", tmp_path / "s")
    assert one_line_error(result, "one class only (CT_NonCOVID)"), result.output


def test_an_image_too_large_to_be_a_slice_is_refused_or_skipped(run, synth_dir, tmp_path,
                                                                monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64 px slice stands in for 16000 px
    scans = sorted((synth_dir / "CT_COVID").glob("*.png"))[:2]
    stopped = cli("predict", run / "best", *scans, "--out", tmp_path / "p.csv")
    assert one_line_error(stopped, "image too large to be a CT slice"), stopped.output
    skipped = cli("predict", run / "best", *scans, "--out", tmp_path / "p.csv", "--skip-bad")
    assert one_line_error(skipped, "every one of the 2 inputs was bad"), skipped.output
    assert not (tmp_path / "p.csv").exists()
    split = cli("split", synth_dir / "dataset.csv", "--out", tmp_path / "s")
    assert one_line_error(split, "image too large"), split.output


def test_a_misspelt_group_column_is_named(run, synth_dir, tmp_path):
    listing = tmp_path / "list.csv"
    first = sorted((synth_dir / "CT_COVID").glob("*.png"))[0]
    listing.write_text(f"path,patient\n{first}\n")
    result = cli("predict", run / "best", listing, "--out", tmp_path / "p.csv",
                 "--group-column", "patinet")
    assert one_line_error(result, "missing column 'patinet'"), result.output


def write_rgb_dicom(path, frames: int | None):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    shape = (32, 32, 3) if frames is None else (frames, 32, 32, 3)
    pixels = np.zeros(shape, dtype=np.uint8)
    pixels[..., 0] = 200  # pure red: luminance 0.299 * 200 = 60
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 32, 32, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_colour_dicom_slices_decode_to_luminance(tmp_path):
    from fedct.data.decode import decode_image

    for frames in (None, 3):
        path = tmp_path / f"rgb-{frames}.dcm"
        write_rgb_dicom(path, frames)
        gray = decode_image(path)
        assert gray.shape == (32, 32) and int(gray[0, 0]) == 60


def test_the_cache_folder_is_checked(run, synth_dir, tmp_path, monkeypatch):
    from fedct.data.loading import cache_dir

    monkeypatch.setenv("FEDCT_CACHE", "")
    assert cache_dir() == cache_dir().home() / ".cache" / "fedct"
    a_file = tmp_path / "cache-file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("FEDCT_CACHE", str(a_file))
    result = cli("evaluate", run / "best", "--data", synth_dir / "dataset.csv", "--bootstrap", 0)
    assert one_line_error(result, f"FEDCT_CACHE={a_file}: is a file"), result.output
