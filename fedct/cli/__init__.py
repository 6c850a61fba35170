"""The `fedct` command line: a thin Typer layer over functions the tests call directly.

One module per kind of command; importing them registers their commands on `app`.
"""

from fedct.cli import data, node, score, setup, train  # noqa: F401  (registers the commands)
from fedct.cli.common import app

__all__ = ["app"]
