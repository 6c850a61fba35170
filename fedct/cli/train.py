"""Commands that train: selfsup (stage 0), pretrain (stage 1), federate (stage 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from fedct.cli.common import command, console, one_line_errors, print_json
from fedct.cli.flags import config_flags
from fedct.config import FederateConfig, PretrainConfig, SelfSupConfig
from fedct.errors import FedctError
from fedct.federated.protocol import ROUND_TIMEOUT_SECONDS
from fedct.tables import print_federate, print_stage1


@command(rich_help_panel="Train")
@one_line_errors
@config_flags(PretrainConfig, "pretrain")
def pretrain(
    split_dir: Annotated[Path | None, typer.Argument(help="Split directory from `fedct split` (with --resume: the run's own).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to write.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with any option below (flags override it).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final metrics as JSON on stdout.")] = False,
    overrides: dict | None = None,
) -> None:
    """Stage 1: adapt a pretrained timm backbone centrally on the split's training rows.

    Writes config.yaml, summary.csv (one row per epoch), best/last.safetensors (+ .json),
    report.json, curves.png, MODEL_CARD.md.

    Example: fedct pretrain splits/covid --out runs/stage1 --pretrained
    ../shared/weights/tf_efficientnet_lite0_in1k.safetensors --epochs 10
    """
    from fedct.configure import resolve_config
    from fedct.pretrain import run_pretrain

    cfg, saved = resolve_config(PretrainConfig, path=config, overrides=overrides, resume_dir=resume)
    if saved is not None and split_dir is None and saved.get("split"):
        split_dir = Path(saved["split"])
    out = resume or out
    if out is None or split_dir is None:
        raise FedctError("SPLIT_DIR and --out RUN_DIR are required (or --resume RUN_DIR)")
    report = run_pretrain(split_dir, out, cfg, resume=resume is not None, force=force,
                          quiet=quiet or json_out, console=console)
    if json_out:
        print_json(report)
    elif not quiet:
        print_stage1(console, report, out)


@command(rich_help_panel="Train")
@one_line_errors
@config_flags(SelfSupConfig, "selfsup")
def selfsup(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Images, folders (searched recursively) or CSV lists with a path column; labels are ignored.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to write.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with any option below (flags override it).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final report as JSON on stdout.")] = False,
    overrides: dict | None = None,
) -> None:
    """Stage 0: self-supervised pretraining (BYOL) of a backbone on unlabelled images.

    Writes config.yaml, summary.csv (loss per epoch), backbone.safetensors (a plain timm
    state dict, rewritten every epoch) and report.json. Start stage 1 from it with
    `fedct pretrain --pretrained RUN/backbone.safetensors`.

    Example: fedct selfsup scans/ --out runs/stage0 --pretrained
    ../shared/weights/tf_efficientnet_lite0_in1k.safetensors --image-size 128
    """
    from fedct.configure import resolve_config
    from fedct.selfsup import run_selfsup

    cfg, saved = resolve_config(SelfSupConfig, path=config, overrides=overrides, resume_dir=resume)
    if saved is not None and not inputs:
        inputs = [Path(p) for p in saved.get("inputs") or []]
    out = resume or out
    if out is None or not inputs:
        raise FedctError("INPUTS and --out RUN_DIR are required (or --resume RUN_DIR)")
    report = run_selfsup(inputs, out, cfg, resume=resume is not None, force=force,
                         quiet=quiet or json_out, console=console)
    if json_out:
        print_json(report)
    elif not quiet:
        console.print(f"{report['epochs']} epochs on {report['images']} images, final BYOL loss "
                      f"{report['final_loss']:.3f}: {report['backbone']}", highlight=False)


@command(rich_help_panel="Train")
@one_line_errors
@config_flags(FederateConfig, "federate")
def federate(
    split_dir: Annotated[Path | None, typer.Argument(help="Split directory from `fedct split` (optional on a Flower coordinator that holds no data).")] = None,
    init: Annotated[str | None, typer.Option(help="Stage 1 checkpoint (RUN/best), or hub / none / a weights file with --model.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to write.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with any option below (flags override it).")] = None,
    engine: Annotated[str, typer.Option(click_type=click.Choice(("embedded", "flower")), help="embedded (one process) or flower (Flower's Deployment Engine).")] = "embedded",
    federation: Annotated[str | None, typer.Option(help="flower: the SuperLink connection name in $FLWR_HOME/config.toml.")] = None,
    dry_run: Annotated[bool, typer.Option(help="flower: print the SuperLink, SuperNode and submit commands, run nothing.")] = False,
    certs: Annotated[Path | None, typer.Option(help="flower --dry-run: folder from `fedct certs` (TLS commands).")] = None,
    clients: Annotated[int | None, typer.Option(help="flower without a split: how many clients (default: the nodes that answer).")] = None,
    round_timeout: Annotated[float, typer.Option(help="flower: seconds to wait for a round's replies.")] = ROUND_TIMEOUT_SECONDS,
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final report as JSON on stdout.")] = False,
    overrides: dict | None = None,
) -> None:
    """Stage 2: fine-tune a model by federated rounds over the split's clients.

    Writes config.yaml, summary.csv (one row per round), privacy.csv (with --dp),
    round/best/last/final checkpoints, report.json, curves.png, MODEL_CARD.md.

    Example: fedct federate splits/covid --init runs/stage1/best --out runs/stage2
    --rounds 10 --strategy fedavg

    With --engine flower the same run goes through `flwr run` to a SuperLink whose
    SuperNodes each read only their own images; --dry-run prints the three roles' commands.
    """
    from fedct.configure import resolve_config
    from fedct.federated import flower_run
    from fedct.federated.simulation import run_federate

    cfg, saved = resolve_config(FederateConfig, path=config, overrides=overrides, resume_dir=resume)
    if saved is not None:  # the run's own inputs: `fedct federate --resume RUN` is enough
        init, out = saved["init"], resume
        split_dir = split_dir or (Path(saved["split"]) if saved.get("split") else None)
    if out is None or init is None:
        raise FedctError("--init CKPT and --out RUN_DIR are required (or --resume RUN_DIR)")
    if engine == "flower" and dry_run:
        for line in flower_run.dry_run_lines(split_dir, out, cfg, init=init, clients=clients,
                                             federation=federation, certs=certs):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        return
    if engine == "flower":
        report = flower_run.run_on_flower(split_dir, out, cfg, init=init, federation=federation,
                                          round_timeout=round_timeout, resume=resume is not None,
                                          force=force, clients=clients)
    elif split_dir is None:
        raise FedctError("SPLIT_DIR is required with the embedded engine (only a Flower "
                         "coordinator runs without one)")
    else:
        report = run_federate(split_dir, out, cfg, init=init, resume=resume is not None,
                              force=force, quiet=quiet or json_out, console=console)
    if json_out:
        print_json(report)
    elif not quiet:
        print_federate(console, report, out)
