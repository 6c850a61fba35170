"""Regression tests of the reliability pass: what fedct refuses, and what it no longer gets
silently wrong. Each is a CLI call on generated data; errors are one line with exit code 2."""

import json
import os
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import FederateConfig
from fedct.configure import build_config
from fedct.data.manifest import SplitOptions, run_split
from fedct.errors import FedctError
from fedct.federated.simulation import run_federate

runner = CliRunner()
TINY = ["--model", "test_efficientnet", "--image-size", "32", "--batch-size", "16",
        "--rounds", "1", "--local-steps", "1"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, text


def test_dry_run_prints_every_resolved_option(split_dir, tmp_path):
    result = cli("federate", split_dir, "--init", "none", "--out", tmp_path / "my run",
                 "--engine", "flower", "--federation", "hospitals", "--dry-run", *TINY,
                 "--dp", "--target-epsilon", "3", "--rounds", "4")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("cat > "))
    end = lines.index("FEDCT_EOF")
    written = yaml.safe_load("\n".join(lines[start + 1:end]))
    config = build_config(FederateConfig, None, written)
    assert (config.dp, config.target_epsilon, config.rounds, config.image_size) == (True, 3.0, 4, 32)
    submit = lines[end + 1]
    assert "--config 'my run-federate.yaml'" in submit and f"--out '{tmp_path / 'my run'}'" in submit
    assert not (tmp_path / "my run").exists()


def test_force_never_deletes_an_input(synth_dir, split_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    before = sorted(p.name for p in data.rglob("*.png"))
    one_line_error(cli("split", data, "--out", data, "--force"), "is, holds or lies inside",
                   "dataset")
    one_line_error(cli("split", data / "dataset.csv", "--out", data, "--force"), "dataset")
    one_line_error(cli("split", data, "--out", data / "CT_COVID" / "split"), "dataset")
    assert sorted(p.name for p in data.rglob("*.png")) == before
    one_line_error(cli("pretrain", split_dir, "--out", split_dir.parent, "--force",
                       "--model", "test_efficientnet", "--pretrained", "none"), "split")
    assert (split_dir / "manifest.csv").is_file()


def test_certs_keep_an_existing_ca_and_keys_are_private_from_the_start(tmp_path):
    pytest.importorskip("cryptography")
    assert cli("certs", tmp_path / "c").exit_code == 0
    ca = (tmp_path / "c" / "ca.crt").read_bytes()
    one_line_error(cli("certs", tmp_path / "c"), "ca.crt: exists", "--force")
    assert (tmp_path / "c" / "ca.crt").read_bytes() == ca
    old_umask = os.umask(0)
    try:
        assert cli("certs", tmp_path / "c", "--force").exit_code == 0
    finally:
        os.umask(old_umask)
    assert (tmp_path / "c" / "ca.crt").read_bytes() != ca
    for key in ("ca.key", "server.key"):
        assert (tmp_path / "c" / key).stat().st_mode & 0o777 == 0o600
    one_line_error(cli("certs", tmp_path / "d", "--days", "0"), "--days 0")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flags, message", [
    (["--dp", "--delta", "0"], "delta 0.0: must be in (0, 1)"),
    (["--dp", "--delta", "2"], "delta 2.0: must be in (0, 1)"),
    (["--dp", "--max-grad-norm", "0"], "max_grad_norm 0.0: must be a number > 0"),
    (["--dp", "--max-grad-norm", "-1"], "max_grad_norm -1.0"),
    (["--local-steps", "-1"], "local_steps -1"),
    (["--local-steps", "0", "--local-epochs", "0"], "local_epochs 0"),
    (["--lr", "nan"], "lr nan"),
    (["--val", "federated"], "val federated: no client of"),
    (["--val", "pooled", "--monitor", "fed_auc"], "monitor fed_auc: needs federated val"),
    (["--threshold", "sens:2"], "threshold 'sens:2': the number must lie in (0, 1)"),
    (["--threshold", "median"], "threshold 'median': choose 0.5"),
    (["--eval-fraction", "0"], "eval_fraction 0.0: must be in (0, 1]"),
    (["--eval-release", "counts", "--threshold", "youden"], "with eval_release counts a client"),
])
def test_settings_that_cannot_train_are_refused_before_anything_is_written(
        split_dir, tmp_path, flags, message):
    one_line_error(cli("federate", split_dir, "--init", "none", "--out", tmp_path / "run",
                       *TINY, *flags), message)
    assert not (tmp_path / "run").exists()


def test_a_small_client_gets_a_delta_warning(split_dir, tmp_path):
    result = cli("federate", split_dir, "--init", "none", "--out", tmp_path / "run", *TINY,
                 "--dp", "--delta", "0.05")
    assert result.exit_code == 0, result.output
    assert "warning: client 0: delta 0.05 is not below 1/" in result.output


def test_resume_refuses_another_split(split_dir, synth_dir, tmp_path):
    config = build_config(FederateConfig, None, {"model": "test_efficientnet", "image_size": 32,
                                                 "batch_size": 16, "rounds": 2, "local_steps": 1})
    run_federate(split_dir, tmp_path / "run", config, init="none", quiet=True, stop_after=1)
    other = tmp_path / "other"
    run_split(synth_dir / "dataset.csv", other, SplitOptions(scheme="iid", clients=2, seed=5))
    with pytest.raises(FedctError, match="the run started with split .*, not .*other"):
        run_federate(other, tmp_path / "run", config, init="none", quiet=True, resume=True)
    one_line_error(cli("federate", split_dir, "--resume", tmp_path / "run", "--rounds", "5"),
                   "rounds was 2 when the run started, not 5")


def test_reports_are_strict_json_and_stage2_takes_stage1s_image_size(split_dir, tmp_path):
    first = cli("federate", split_dir, "--init", "none", "--out", tmp_path / "a", *TINY,
                "--image-size", "48")
    assert first.exit_code == 0, first.output

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    report = json.loads((tmp_path / "a" / "report.json").read_text(), parse_constant=refuse)
    assert report["final"]["fed_acc"] is None  # no client val rows: NaN in memory, null on disk
    json.loads((tmp_path / "a" / "final.json").read_text(), parse_constant=refuse)
    second = cli("federate", split_dir, "--init", tmp_path / "a" / "final", "--out",
                 tmp_path / "b", "--rounds", "1", "--local-steps", "1", "--batch-size", "16")
    assert second.exit_code == 0, second.output
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["config"]["image_size"] == 48
    third = cli("federate", split_dir, "--init", tmp_path / "a" / "final", "--out",
                tmp_path / "c", *TINY)
    assert third.exit_code == 0 and "image_size 32 differs from 48" in " ".join(third.output.split())


def test_evaluate_checks_before_inference_and_keeps_earlier_results(split_dir, tmp_path):
    assert cli("federate", split_dir, "--init", "none", "--out", tmp_path / "a", *TINY).exit_code == 0
    one_line_error(cli("evaluate", tmp_path / "a" / "final", "--split", split_dir, "--on", "val",
                       "--per-client"), "--per-client: these rows belong to no client")
    assert not list((tmp_path / "a").glob("eval-*"))
    for _ in range(2):
        result = cli("evaluate", tmp_path / "a" / "final", "--split", split_dir, "--on", "val",
                     "--bootstrap", "20")
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a").glob("eval-*")) == ["eval-val", "eval-val-2"]


@pytest.mark.parametrize("rows, message", [
    (["a.png,CT_COVID,p1", "a.png,CT_NonCOVID,p2"], "data.csv:3: path 'a.png' is listed again"),
    ([f"{i}.png,{c},p{i}" for i, c in enumerate(["CT_COVID", "CT_NonCOVID"] * 4)]
     + ["c.png,CT_COVD,p9"], "data.csv:10: class 'CT_COVD' (1 rows) looks like a typo of 'CT_COVID'"),
    (["../a.png,CT_COVID,p1"], "data.csv:2: path '../a.png' is outside the CSV's folder"),
    (["/tmp/a.png,CT_COVID,p1"], "path '/tmp/a.png' is outside"),
])
def test_csv_rows_that_would_mislead_are_named(tmp_path, rows, message):
    (tmp_path / "data.csv").write_text("path,class,group\n" + "\n".join(rows) + "\n")
    one_line_error(cli("split", tmp_path / "data.csv", "--out", tmp_path / "s"), message)
    assert not (tmp_path / "s").exists()


def test_class_and_label_must_agree_and_fedct_outputs_are_no_class(tmp_path, synth_dir, split_dir):
    (tmp_path / "data.csv").write_text("path,class,label\na.png,CT_COVID,1\nb.png,CT_NonCOVID,1\n")
    one_line_error(cli("split", tmp_path / "data.csv", "--out", tmp_path / "s"),
                   "data.csv:3: label '1' names class 'CT_NonCOVID' here but 'CT_COVID'")
    data = tmp_path / "folder"
    shutil.copytree(synth_dir / "CT_COVID", data / "CT_COVID")
    shutil.copytree(synth_dir / "CT_NonCOVID", data / "CT_NonCOVID")
    shutil.copytree(split_dir, data / "splits")
    one_line_error(cli("split", data, "--out", tmp_path / "s"), "holds", "a fedct output")
    shutil.rmtree(data / "splits")
    result = cli("split", data, "--out", tmp_path / "s", "--clients", "2")
    assert result.exit_code == 0 and "warning:" in result.output and "no patient column" in result.output


def test_a_tampered_resume_state_is_refused_without_running_it(split_dir, tmp_path):
    import pickle

    assert cli("federate", split_dir, "--init", "none", "--out", tmp_path / "a", *TINY,
               "--rounds", "2").exit_code == 0

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    (tmp_path / "a" / "resume.pt").write_bytes(pickle.dumps({"weights": Payload()}))
    result = cli("federate", split_dir, "--resume", tmp_path / "a")
    one_line_error(result, "resume.pt: not a fedct resume state, refused")
    assert "this ran" not in result.output


def test_a_full_disk_is_one_line(split_dir, tmp_path, monkeypatch):
    import errno

    from fedct import runs

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runs, "atomic_write", full)
    one_line_error(cli("federate", split_dir, "--init", "none", "--out", tmp_path / "run", *TINY),
                   "config.yaml: No space left on device")


@pytest.mark.slow
def test_a_vit_runs_at_another_size_and_dp_full_names_what_it_needs(split_dir, tmp_path):
    vit = ["--model", "vit_tiny_patch16_224", "--image-size", "32", "--batch-size", "8",
           "--rounds", "1", "--local-steps", "1"]
    assert cli("federate", split_dir, "--init", "none", "--out", tmp_path / "a", *vit).exit_code == 0
    assert cli("evaluate", tmp_path / "a" / "final", "--split", split_dir, "--bootstrap",
               "10").exit_code == 0
    one_line_error(cli("federate", split_dir, "--init", "none", "--out", tmp_path / "b", *vit,
                       "--dp", "--dp-train", "full"), "set drop_rate: 0")
    (tmp_path / "dp.yaml").write_text("drop_rate: 0.0\n")
    assert cli("federate", split_dir, "--init", "none", "--out", tmp_path / "c", *vit, "--dp",
               "--dp-train", "full", "--config", tmp_path / "dp.yaml").exit_code == 0


def test_help_shows_defaults_choices_and_argument_help():
    import re

    def shown(*args):
        result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "220"})
        assert result.exit_code == 0, result.output
        return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())

    federate = shown("federate")
    assert "[default: 10]" in federate and "[default: the --init checkpoint's, else 224]" in federate
    assert ("One of: fedavg, fedprox, fedavgm, fedadam, fedyogi, scaffold, fedmedian, "
            "fedtrimmedavg. [default: fedavg]") in federate
    assert "One of: ce, balanced-softmax, fedlc, fedrs. [default: ce]" in federate
    assert "One of: head, norms, full. [default: head]" in federate
    assert "--dp Differentially private" in federate and " --no-dp " in federate
    # every config field is a flag of its command, generated with its default
    from dataclasses import fields

    from fedct.config import FederateConfig, PretrainConfig, SelfSupConfig
    for command, cls in (("federate", FederateConfig), ("pretrain", PretrainConfig),
                         ("selfsup", SelfSupConfig)):
        text = federate if command == "federate" else shown(command)
        for field in fields(cls):
            assert f"--{field.name.replace('_', '-')} " in text, (command, field.name)
    assert "--secagg-max-weight INTEGER SecAgg+: the most examples a node may weigh in with. " \
        "[default: 1000]" in federate
    trimmed = cli("federate", "x", "--init", "none", "--out", "y", "--strategy",
                  "fedtrimmedavg", "--trim-beta", "0.7")
    assert trimmed.exit_code == 2 and "trim_beta 0.7: must be in [0, 0.5)" in trimmed.output
    assert "Split directory from fedct split (optional on a Flower coordinator" in federate
    split = shown("split")  # a metavar too long for its column wraps between choices
    assert "[iid | dirichlet | shards |" in split and " quantity | natural]" in split
    assert "[train|val|test|local_val|all]" in shown("evaluate")
    demo = shown("demo")
    assert "demo.yaml" not in demo and "fedct/settings/demo-pretrain.yaml" in demo
    wrong = cli("federate", "x", "--init", "none", "--out", "y", "--strategy", "fedsgd")
    assert wrong.exit_code == 2 and "fedsgd" in wrong.output and "Traceback" not in wrong.output
