"""What every command shares: the Typer app, the consoles, one-line errors, JSON output."""

from __future__ import annotations

import functools
import json
import math
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedct import __version__
from fedct.cli.help import FedctCommand
from fedct.errors import FedctError

WORKFLOW = ("synth", "split", "selfsup", "pretrain", "federate", "evaluate", "predict", "export",
            "config", "certs", "node", "demo")


class WorkflowOrder(typer.core.TyperGroup):
    """Commands listed in the order a user runs them, not alphabetically."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(self.commands, key=lambda name: (
            WORKFLOW.index(name) if name in WORKFLOW else len(WORKFLOW), name))


app = typer.Typer(
    name="fedct",
    cls=WorkflowOrder,
    help="Two-stage federated transfer learning for medical image classification.\n\n"
    "split -> pretrain (stage 1, central) -> federate (stage 2, federated, optional DP) -> evaluate",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # paragraphs reflow to the width; `code` is shown as code
)
command = functools.partial(app.command, cls=FedctCommand)  # every command's help in fedct's panels
# Tables are wide; when output is not a terminal (logs, CI), do not squeeze them into 80 columns.
console = Console()  # the terminal's width, else $COLUMNS, else 80: every table fits 80
err_console = Console(stderr=True)


def one_line_errors(func):
    """Turn a FedctError into `error: ...` on stderr and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            refuse_non_finite(kwargs)
            return func(*args, **kwargs)
        except FedctError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a read-only folder, a full disk: what fedct could not write
            where = f"{exc.filename}: " if exc.filename else ""
            err_console.print(f"[bold red]error:[/] {escape(where + str(exc.strerror or exc))}",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def refuse_non_finite(options: dict) -> None:
    """No command takes NaN or infinity for a number: click parses `nan` as a float, and a NaN
    compares false with every bound a command checks."""
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise FedctError(f"--{name.replace('_', '-')} {value}: must be a finite number")


def _version(value: bool) -> None:
    if value:
        console.print(f"fedct {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """fedct: split, pretrain, federate, evaluate."""


def floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise FedctError(f"{option} {text!r}: expected comma-separated numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise FedctError(f"{option} {text!r}: expected finite numbers")
    return values


def print_json(payload: dict) -> None:
    from fedct.files import json_safe

    sys.stdout.write(json.dumps(json_safe(payload), indent=2) + "\n")


# How NIfTI volumes become slices: split, evaluate --data and predict take the same two options.
SlicesOption = Annotated[str | None, typer.Option(help="Volumes (.nii, .nii.gz, DICOM series): which slices become images: all, every:K, middle:N (the N central ones) or lung[:F] (at least a share F, 0.05 unless given, of the slice is aerated lung, -950 to -500 HU). \\[default: lung; evaluate, predict: the checkpoint's training rule]")]
WindowOption = Annotated[str | None, typer.Option(help="Volumes: the Hounsfield window that maps a slice to 8 bits: lung (level -600, width 1500), mediastinum (40, 400) or LEVEL,WIDTH. \\[default: lung; evaluate, predict: the checkpoint's training window]")]


RescaleOption = Annotated[str | None, typer.Option("--hu-rescale", help="16-bit PNG/TIFF slices: SLOPE,INTERCEPT that take their values to Hounsfield units (e.g. 1,-1024), so they are windowed by --window like DICOM and volumes. \\[default: none, each image stretched between its own extremes; evaluate, predict: the checkpoint's]")]


def volume_options(slices: str | None, window: str | None, rescale: str | None = None,
                   checkpoint=None):
    """VolumeOptions from the flags, else from what the checkpoint's training split used,
    else the defaults (each value checked, one-line errors)."""
    from fedct.data.volumes import VolumeOptions
    from fedct.runs import read_sidecar

    trained = (read_sidecar(checkpoint).get("volumes") or {}) if checkpoint else {}
    return VolumeOptions(slices=slices or trained.get("slices", "lung"),
                         window=window or trained.get("window", "lung"),
                         rescale=rescale or trained.get("rescale", ""))
