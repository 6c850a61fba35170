"""Commands that set things up: config (a command's settings as YAML), certs (TLS for
Flower), demo (the whole pipeline on synthetic data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from fedct.cli.common import command, console, one_line_errors

COMMANDS = ("pretrain", "federate", "selfsup")


@command(rich_help_panel="Set up")
@one_line_errors
def config(
    command: Annotated[str, typer.Argument(click_type=click.Choice(COMMANDS), help="The command whose settings to print.")],
) -> None:
    """Print a command's settings and defaults as YAML, to edit and pass as --config.

    Flags still override what the file sets. Every setting is also a flag of its command.

    Example: fedct config federate > federate.yaml
    """
    import sys

    from fedct.cli.flags import defaults_yaml
    from fedct.config import FederateConfig, PretrainConfig, SelfSupConfig

    cls = {"pretrain": PretrainConfig, "federate": FederateConfig, "selfsup": SelfSupConfig}
    sys.stdout.write(defaults_yaml(cls[command], command))


@command(rich_help_panel="Set up")
@one_line_errors
def certs(
    out: Annotated[Path, typer.Argument(help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    host: Annotated[list[str] | None, typer.Option(help="Host name or IP the SuperLink is reached at (repeat). \\[default: 127.0.0.1, localhost]")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    force: Annotated[bool, typer.Option(help="Replace an existing CA (every node must then get the new ca.crt).")] = False,
) -> None:
    """Make a private CA and a SuperLink certificate for TLS on Flower.

    Example: fedct certs certs/ --host superlink.hospital-net.example --host 10.0.0.5
    """
    from fedct.federated.certs import make_certificates

    paths = make_certificates(out, host or ["127.0.0.1", "localhost"], days=days, force=force)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    console.print("SuperLink: --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile "
                  "server.key; SuperNodes and flwr: trust ca.crt (keep ca.key offline)")


@command(rich_help_panel="Set up")
@one_line_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, split and runs.")] = Path("demo-out"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing demo folder.")] = False,
) -> None:
    """The whole two-stage pipeline on synthetic CT, offline, in a few minutes on 2 CPU cores.

    synth -> split over 4 non-IID clients -> stage 1 on client 0's share (standing in for
    data that may be pooled) -> stage 2 federated over all 4 -> evaluate on test.
    Settings: fedct/settings/demo-pretrain.yaml and demo-federate.yaml.

    Example: fedct demo --out demo-out
    """
    from fedct.demo import run_demo

    run_demo(out, seed=seed, force=force, console=console)
