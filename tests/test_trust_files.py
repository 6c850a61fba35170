"""Sidecars and manifests are checked, not trusted: every field on read, the weights bound to
their sidecar, the manifest's splits and clients bound to split.yaml. The fuzz tests feed
random edits of real files to the commands and accept only a one-line error or the very
result the unedited file gives."""

import csv
import json
import random
import re

import pytest
import yaml
from typer.testing import CliRunner

from fedct.cli import app
from fedct.data.manifest import MANIFEST, SPLIT_YAML, load_split, manifest_digest
from fedct.errors import FedctError
from fedct.models import create_model
from fedct.runs import read_checkpoint, save_checkpoint
from fedct.sidecar import SIDECAR_DIGEST, WEIGHTS_DIGEST

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> bool:
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code == 2 and "Traceback" not in result.output and \
        sum(line.startswith("error:") for line in lines) == 1


def copy_checkpoint(stem, target_dir, name="best"):
    target = target_dir / name
    for suffix in (".safetensors", ".json"):
        target.with_name(name + suffix).write_bytes(stem.with_name(stem.name + suffix).read_bytes())
    return target


def edit_sidecar(stem, change):
    path = stem.with_name(stem.name + ".json")
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("key, value, says", [
    ("operating_point", {"threshold": 7.5, "rule": "youden", "source": "val"}, "in (0, 1)"),
    ("operating_point", {"threshold": -3, "rule": "youden", "source": "val"}, "in (0, 1)"),
    ("operating_point", {"threshold": 1e308, "rule": "youden", "source": "val"}, "in (0, 1)"),
    ("positive", "CT_CAP", "one of the classes"),
    ("input_size", "64", "[3, height, width]"),
    ("input_size", [3, 300000, 300000], "[3, height, width]"),
    ("std", [0, 0, 0], "numbers > 0"),
    ("mean", ["a", 0.4, 0.4], "three finite numbers"),
    ("classes", ["CT_COVID", "CT_COVID"], "distinct class names"),
    ("classes", "CT_COVID", "distinct class names"),
])
def test_a_damaged_sidecar_field_is_named(checkpoint, tmp_path, key, value, says):
    stem = copy_checkpoint(checkpoint, tmp_path)
    edit_sidecar(stem, lambda meta: meta.__setitem__(key, value))
    with pytest.raises(FedctError, match=f"key '{key}'.*{re.escape(says)}"):
        read_checkpoint(stem)


@pytest.mark.parametrize("key", ["input_size", "mean", "std", "classes"])
def test_a_missing_sidecar_key_is_named(checkpoint, tmp_path, key):
    stem = copy_checkpoint(checkpoint, tmp_path)
    edit_sidecar(stem, lambda meta: meta.pop(key))
    with pytest.raises(FedctError, match=f"missing key '{key}'"):
        read_checkpoint(stem)


def test_nan_in_a_sidecar_is_not_json(checkpoint, tmp_path):
    stem = copy_checkpoint(checkpoint, tmp_path)
    path = stem.with_name("best.json")
    path.write_text(path.read_text().replace('"mean": [', '"mean": [NaN, ', 1))
    with pytest.raises(FedctError, match="NaN is not JSON"):
        read_checkpoint(stem)


def test_weights_and_sidecar_are_bound_together(checkpoint, tmp_path):
    swapped = copy_checkpoint(checkpoint, tmp_path, "swapped")
    edit_sidecar(swapped, lambda meta: meta.__setitem__("classes", meta["classes"][::-1]))
    with pytest.raises(FedctError, match="edited or damaged since it was saved"):
        read_checkpoint(swapped)
    small = copy_checkpoint(checkpoint, tmp_path, "small")
    edit_sidecar(small, lambda meta: meta.__setitem__("input_size", [3, 16, 16]))
    with pytest.raises(FedctError, match="edited or damaged"):
        read_checkpoint(small)
    # other weights under this sidecar: another checkpoint's, or this one's re-saved by hand
    other = tmp_path / "other"
    model = create_model("test_efficientnet", 2, pretrained="none")
    meta = json.loads(checkpoint.with_name("best.json").read_text())
    save_checkpoint(other, model.state_dict(), {**meta, "epoch": 2})
    mixed = copy_checkpoint(checkpoint, tmp_path, "mixed")
    mixed.with_name("mixed.safetensors").write_bytes(other.with_name("other.safetensors").read_bytes())
    with pytest.raises(FedctError, match="edited or damaged"):
        read_checkpoint(mixed)
    from safetensors.torch import load_file, save_file
    resaved = copy_checkpoint(checkpoint, tmp_path, "resaved")
    weights = load_file(str(resaved.with_name("resaved.safetensors")))
    weights[next(iter(weights))] += 1
    header = {"format": "pt", SIDECAR_DIGEST: _header(resaved)}  # the header copied too
    save_file(weights, str(resaved.with_name("resaved.safetensors")), metadata=header)
    with pytest.raises(FedctError, match="not the weights resaved.json was saved with"):
        read_checkpoint(resaved)


def _header(stem) -> str:
    from safetensors import safe_open

    with safe_open(str(stem.with_name(stem.name + ".safetensors")), framework="pt") as handle:
        return handle.metadata()[SIDECAR_DIGEST]


def test_a_checkpoint_from_before_the_binding_still_loads_with_its_fields_checked(checkpoint,
                                                                                   tmp_path):
    from safetensors.torch import load_file, save_file

    old = copy_checkpoint(checkpoint, tmp_path, "old")
    weights = load_file(str(old.with_name("old.safetensors")))
    save_file(weights, str(old.with_name("old.safetensors")), metadata={"format": "pt"})
    edit_sidecar(old, lambda meta: meta.pop(WEIGHTS_DIGEST))
    assert read_checkpoint(old)[1]["classes"] == ["CT_COVID", "CT_NonCOVID"]
    edit_sidecar(old, lambda meta: meta.__setitem__("std", [0, 0, 0]))
    with pytest.raises(FedctError, match="key 'std'"):
        read_checkpoint(old)


def random_edit(text: str, rng: random.Random) -> str:
    """One careless or hostile edit of a text file: a character, a number, a deleted or
    duplicated line, a swapped pair of values."""
    kind = rng.choice(["char", "number", "delete", "duplicate", "swap", "truncate"])
    lines = text.splitlines(keepends=True)
    if kind == "char":
        i = rng.randrange(len(text))
        return text[:i] + rng.choice('0123456789abc",:[]{}-. \n') + text[i + 1:]
    if kind == "number":
        numbers = list(re.finditer(r"-?\d+(\.\d+)?(e-?\d+)?", text))
        if numbers:
            m = rng.choice(numbers)
            value = rng.choice(["NaN", "1e308", "-1", "0", "7.5", "16", '"64"', "0.5", "2"])
            return text[:m.start()] + value + text[m.end():]
    if kind in ("delete", "duplicate") and len(lines) > 2:
        i = rng.randrange(1, len(lines))
        return "".join(lines[:i] + ([lines[i]] * 2 if kind == "duplicate" else []) + lines[i + 1:])
    if kind == "swap" and len(lines) > 3:
        i, j = rng.sample(range(1, len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]
        return "".join(lines)
    return text[: rng.randrange(len(text))]


def test_fuzzed_sidecars_give_a_one_line_error_or_the_same_decisions(checkpoint, synth_dir,
                                                                     tmp_path):
    scans = sorted((synth_dir / "CT_COVID").glob("*.png"))[:6]
    baseline = cli("predict", checkpoint, *scans, "--out", tmp_path / "base.csv")
    assert baseline.exit_code == 0, baseline.output
    expected = (tmp_path / "base.csv").read_text()
    rng = random.Random(0)
    outcomes = {"refused": 0, "same": 0}
    for trial in range(40):
        stem = copy_checkpoint(checkpoint, tmp_path, f"fuzz{trial}")
        sidecar = stem.with_name(stem.name + ".json")
        sidecar.write_text(random_edit(sidecar.read_text(), rng))
        result = cli("predict", stem, *scans, "--out", tmp_path / f"p{trial}.csv")
        assert "Traceback" not in result.output and result.exception is None or \
            isinstance(result.exception, SystemExit), (trial, result.output, result.exception)
        if result.exit_code == 0:
            assert (tmp_path / f"p{trial}.csv").read_text() == expected, sidecar.read_text()
            outcomes["same"] += 1
        else:
            assert one_line_error(result), (trial, result.output)
            assert not (tmp_path / f"p{trial}.csv").exists()
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 30  # nearly every edit changes the sidecar's content


def test_fuzzed_manifests_give_a_one_line_error_or_the_same_split(split_dir, tmp_path):
    import shutil

    original = load_split(split_dir)
    rng = random.Random(1)
    refused = 0
    for trial in range(60):
        copy = tmp_path / f"split{trial}"
        shutil.copytree(split_dir, copy)
        manifest = copy / MANIFEST
        manifest.write_text(random_edit(manifest.read_text(), rng))
        try:
            split = load_split(copy)
        except FedctError as exc:
            assert "\n" not in str(exc)
            refused += 1
            continue
        assert [(e.row, e.split, e.client) for e in split.entries] == \
            [(e.row, e.split, e.client) for e in original.entries]
    assert refused >= 40


def rewrite_manifest(split_dir, change, *, update_digest: bool):
    """Edit a split's manifest rows; with `update_digest`, as if `fedct split` had written it."""
    from fedct.data.manifest import write_manifest

    split = load_split(split_dir)
    entries = change(split.entries)
    write_manifest(split_dir / MANIFEST, entries)
    if update_digest:
        meta = yaml.safe_load((split_dir / SPLIT_YAML).read_text())
        meta["manifest_digest"] = manifest_digest(entries)
        (split_dir / SPLIT_YAML).write_text(yaml.safe_dump(meta, sort_keys=False))


def test_moving_test_rows_into_a_client_is_refused(split_dir, tmp_path):
    import dataclasses
    import shutil

    copy = tmp_path / "split"
    shutil.copytree(split_dir, copy)
    rewrite_manifest(copy, lambda entries: [
        dataclasses.replace(e, split="train", client=0) if e.split == "test" else e
        for e in entries], update_digest=False)
    with pytest.raises(FedctError, match="edited since `fedct split` wrote it"):
        load_split(copy)


@pytest.mark.parametrize("cell, value, says", [
    ("client", "1.5", "client '1.5', expected a client number from 0 to 1"),
    ("client", "7", "client '7'"),
    ("split", "training", "split 'training'"),
    ("path", "../elsewhere.png", "outside the dataset folder"),
    ("path", "/etc/passwd", "outside the dataset folder"),
])
def test_a_bad_manifest_cell_is_named_with_its_line(split_dir, tmp_path, cell, value, says):
    import shutil

    copy = tmp_path / "split"
    shutil.copytree(split_dir, copy)
    with (copy / MANIFEST).open() as handle:
        rows = list(csv.DictReader(handle))
    rows[3][cell] = value
    with (copy / MANIFEST).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(FedctError, match=rf"manifest.csv:5: .*{re.escape(says)}"):
        load_split(copy)


def test_a_duplicated_manifest_row_is_named(split_dir, tmp_path):
    import shutil

    copy = tmp_path / "split"
    shutil.copytree(split_dir, copy)
    lines = (copy / MANIFEST).read_text().splitlines(keepends=True)
    (copy / MANIFEST).write_text("".join(lines + [lines[1]]))
    with pytest.raises(FedctError, match=f"manifest.csv:{len(lines) + 1}: path .* listed again"):
        load_split(copy)


def test_fuzzed_files_through_evaluate_and_federate(checkpoint, split_dir, tmp_path):
    """The commands themselves, not only the readers: each edit gives a one-line error
    (exit 2, nothing written) or the result of the unedited file."""
    import shutil

    from conftest import TINY

    rng = random.Random(2)
    base = cli("evaluate", checkpoint, "--split", split_dir, "--bootstrap", 0, "--out",
               tmp_path / "base", "--json")
    assert base.exit_code == 0, base.output
    expected = [r["chosen"]["confusion"] for r in json.loads(base.output)["results"]]
    for trial in range(8):
        stem = copy_checkpoint(checkpoint, tmp_path, f"e{trial}")
        sidecar = stem.with_name(stem.name + ".json")
        sidecar.write_text(random_edit(sidecar.read_text(), rng))
        result = cli("evaluate", stem, "--split", split_dir, "--bootstrap", 0, "--out",
                     tmp_path / f"e{trial}-out", "--json")
        if result.exit_code == 0:
            got = [r["chosen"]["confusion"] for r in json.loads(result.output)["results"]]
            assert got == expected
        else:
            assert one_line_error(result), result.output
            assert not (tmp_path / f"e{trial}-out").exists()
    flags = [f for k, v in {**TINY, "rounds": 1}.items() for f in (f"--{k.replace('_', '-')}", v)]
    for trial in range(8):
        copy = tmp_path / f"split{trial}"
        shutil.copytree(split_dir, copy)
        manifest = copy / (MANIFEST if trial % 2 else SPLIT_YAML)
        manifest.write_text(random_edit(manifest.read_text(), rng))
        result = cli("federate", copy, "--init", "none", "--out", tmp_path / f"f{trial}",
                     "--quiet", *flags)
        assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
        if result.exit_code == 2:
            assert one_line_error(result), result.output
            assert not (tmp_path / f"f{trial}").exists()
