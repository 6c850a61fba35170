"""Server strategies, one module per family (`base.Strategy` subclasses); the registry
finds every strategy in this package, so a new strategy is one new module and its test.

The registry feeds the config's choices and checks and the CLI's help. It reads each
strategy's `name` and `summary` from the modules' source, so the CLI lists them without
importing torch; `get` imports the modules.
"""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path

from fedct.errors import FedctError

FIRST = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "scaffold")  # then by name


@functools.cache
def declared() -> dict[str, dict]:
    """{name: its class's constants (summary, keeps_updates) and module} for the strategy
    classes defined in this package."""
    found = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            values = {target.id: statement.value.value for statement in node.body
                      if isinstance(statement, ast.Assign)
                      and isinstance(statement.value, ast.Constant)
                      for target in statement.targets if isinstance(target, ast.Name)}
            if values.get("name"):
                found[values["name"]] = {**values, "module": path.stem}
    return {name: found[name] for name in sorted(found, key=lambda n: (
        FIRST.index(n) if n in FIRST else len(FIRST), n))}


def names() -> tuple[str, ...]:
    return tuple(declared())


def help_text() -> str:
    """One line for the CLI: which strategies need every update (not under SecAgg+)."""
    kept = [name for name, values in declared().items() if values.get("keeps_updates")]
    return (f"{' and '.join(kept)} are robust to outlying clients and refuse "
            "--secure-aggregation." if kept else "")


@functools.cache
def get(name: str):
    """The strategy object of this name."""
    if name not in declared():
        raise FedctError(f"strategy {name!r}: choose from {', '.join(declared())}")
    module = importlib.import_module(f"{__name__}.{declared()[name]['module']}")
    for value in vars(module).values():
        if isinstance(value, type) and value.__dict__.get("name") == name:
            return value()
    raise FedctError(f"strategy {name!r}: declared in {module.__name__} but not defined there")


def check(config) -> None:
    """The strategy's own refusals, and secure aggregation only where a sum is enough."""
    strategy = get(config.strategy)
    strategy.check(config)
    if strategy.keeps_updates and config.secure_aggregation:
        summed = ", ".join(n for n, values in declared().items()
                           if not values.get("keeps_updates"))
        raise FedctError(f"strategy {strategy.name}: needs each client's update, and secure "
                         f"aggregation reveals only their sum; choose {summed}, or drop "
                         "secure_aggregation")


def aggregate(global_weights, updates, *, config, server_state: dict | None = None,
              trainable: set[str] | None = None, num_clients: int | None = None):
    """New global weights and server state from a list of updates (pure): what a round
    does, for tests and benchmarks that hold their updates in a list."""
    strategy = get(config.strategy)
    collected = strategy.collector(global_weights, config)
    for update in updates:
        collected.add(update)
    if not collected.count:
        return dict(global_weights), dict(server_state or {})
    return strategy.step(global_weights, collected, dict(server_state or {}), config=config,
                         trainable=trainable, num_clients=num_clients or collected.count)
