"""One way to configure: every setting a flag, `fedct config` prints them all as a valid
--config, a run's own config.yaml starts a new run, files honour the umask."""

import os
import stat

import pytest
import yaml
from conftest import TINY
from typer.testing import CliRunner

from fedct.cli import app
from fedct.config import FederateConfig, PretrainConfig, SelfSupConfig
from fedct.configure import build_config
from fedct.errors import FedctError
from fedct.federated.simulation import run_federate

runner = CliRunner()


def test_commands_in_workflow_order_with_a_short_help_flag():
    result = runner.invoke(app, ["-h"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    order = ["synth", "split", "selfsup", "pretrain", "federate", "evaluate", "predict",
             "export", "config", "certs", "demo"]
    at = [result.output.index(f"│ {name} ") for name in order]
    assert at == sorted(at)
    for panel in ("Data", "Train", "Use a model", "Set up"):
        assert f"─ {panel} ─" in result.output
    assert runner.invoke(app, ["federate", "-h"]).exit_code == 0


@pytest.mark.parametrize("columns", [80, 120])
def test_every_commands_help_keeps_its_option_names_whole(columns):
    import click
    import typer

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        result = runner.invoke(app, [name, "-h"], env={"COLUMNS": str(columns)})
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert max(map(len, lines)) <= columns and "…" not in result.output, name
        words = set(result.output.replace(",", " ").split())
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                for option in param.opts + param.secondary_opts:
                    assert option in words, (name, option)


@pytest.mark.parametrize("command, cls", [("federate", FederateConfig),
                                          ("pretrain", PretrainConfig),
                                          ("selfsup", SelfSupConfig)])
def test_fedct_config_prints_every_setting_as_a_valid_config(command, cls, tmp_path):
    result = runner.invoke(app, ["config", command])
    assert result.exit_code == 0, result.output
    path = tmp_path / "settings.yaml"
    path.write_text(result.output)
    assert set(yaml.safe_load(result.output)) == {f.name for f in cls.__dataclass_fields__.values()}
    assert build_config(cls, path) == cls()
    help_line = {"federate": "# Client learning rate.", "pretrain": "# Peak learning rate",
                 "selfsup": "# BYOL: projection size."}[command]
    assert help_line in result.output


def test_a_runs_config_yaml_starts_a_new_run_of_the_model_it_trained(split_dir, checkpoint,
                                                                     tmp_path):
    settings = {k: v for k, v in TINY.items() if k != "model"}  # the model comes from --init
    config = build_config(FederateConfig, None, {**settings, "rounds": 1, "local_steps": 1,
                                                 "image_size": 64})
    run_federate(split_dir, tmp_path / "run", config, init=str(checkpoint), quiet=True)
    saved = tmp_path / "run" / "config.yaml"
    again = build_config(FederateConfig, saved)
    assert again.model == "test_efficientnet" != FederateConfig().model
    assert again == build_config(FederateConfig, None, {**yaml.safe_load(saved.read_text())[
        "config"]})
    with pytest.raises(FedctError, match="config of a `fedct federate` run, not of `fedct "
                                         "pretrain`"):
        build_config(PretrainConfig, saved)


def test_written_files_and_folders_honour_the_umask(split_dir, tmp_path):
    from fedct.files import atomic_write, staging_dir

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda p: p.write_text("{}"))
        folder = staging_dir(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    from fedct.files import current_umask

    for path in [split_dir, *split_dir.iterdir()]:  # a split made under this process's umask
        full = 0o777 if path.is_dir() else 0o666
        assert stat.S_IMODE(path.stat().st_mode) == full & ~current_umask(), path


def test_the_demo_settings_are_package_data():
    """`fedct demo` reads its settings from the installed package, not a source checkout."""
    import tomllib
    from pathlib import Path

    from fedct.demo import SETTINGS

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["fedct"]
    packaged = {p for pattern in patterns for p in (root / "fedct").glob(pattern)}
    for name in ("demo-pretrain.yaml", "demo-federate.yaml"):
        assert SETTINGS / name in packaged
