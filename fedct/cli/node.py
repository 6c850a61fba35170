"""`fedct node`: a hospital's Flower SuperNode, with its ClientApp kept warm."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import click
import typer

from fedct.cli.common import command, console, one_line_errors
from fedct.errors import FedctError


@command(rich_help_panel="Set up")
@one_line_errors
def node(
    superlink: Annotated[str, typer.Option(help="The SuperLink's Fleet API, HOST:PORT.")],
    node_config: Annotated[str, typer.Option(help="The node's data and identity, e.g. 'data=\"/srv/ct/train.csv\" val=\"/srv/ct/val.csv\" client-id=0'.")],
    root_certificates: Annotated[Path | None, typer.Option(help="The federation's ca.crt (from fedct certs): TLS to the SuperLink.")] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS (loopback tests and demos only).")] = False,
    port: Annotated[int, typer.Option(help="Port of the SuperNode's Runtime API on 127.0.0.1.")] = 9094,
    mode: Annotated[str, typer.Option(click_type=click.Choice(["warm", "process"]), help="warm: one ClientApp process serves every message (its imports done once); process: Flower's own, a fresh process per message.")] = "warm",
    dry_run: Annotated[bool, typer.Option(help="Print the commands this node would run, run nothing.")] = False,
    supernode_options: Annotated[list[str] | None, typer.Argument(help="More flower-supernode options, after --, e.g. -- --auth-supernode-private-key node_key.")] = None,
) -> None:
    """Run a Flower SuperNode for fedct runs; its ClientApp stays warm between messages.

    Flower starts a fresh ClientApp process for every message, which imports torch, timm
    and fedct before any work. In warm mode the SuperNode runs with --isolation process
    and this command serves its messages in one process for as long as it runs.

    Example: fedct node --superlink coordinator.example:9092 --root-certificates ca.crt
    --node-config 'data="/srv/ct/train.csv" val="/srv/ct/val.csv" client-id=0'
    """
    from fedct.federated.warm_node import run_node, supernode_command

    if insecure == (root_certificates is not None):
        raise FedctError("give --root-certificates CA_FILE (TLS) or --insecure, one of them")
    if root_certificates is not None and not root_certificates.is_file():
        raise FedctError(f"--root-certificates {root_certificates}: no such file")
    warm = mode == "warm"
    supernode = supernode_command(superlink=superlink, node_config=node_config, port=port,
                                  warm=warm, root_certificates=root_certificates,
                                  insecure=insecure, extra=supernode_options or [])
    said = (f"fedct node: warm mode, one ClientApp process for every message (SuperNode "
            f"--isolation process, Runtime API 127.0.0.1:{port})" if warm else
            "fedct node: process mode, Flower starts a ClientApp process per message")
    console.print(said, highlight=False)
    if dry_run:
        from fedct.federated.flower_run import env_prefix

        console.print(f"{env_prefix()} {shlex.join(supernode)}", highlight=False,
                      soft_wrap=True)
        if warm:
            console.print("# then, in this process: claim each ClientApp task from "
                          f"127.0.0.1:{port} and run fedct's ClientApp in place",
                          highlight=False)
        return
    code = run_node(supernode, port=port, warm=warm)
    raise typer.Exit(code)
