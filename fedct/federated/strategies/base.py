"""What every strategy shares: the update checks, the streamed examples-weighted average,
and the `Strategy` type whose subclasses (one module per family) the registry finds.

A strategy says how the server turns a round's accepted updates into new global weights
(`step`), what it collects of them (`collector`: a running average that drops each update,
or every update kept for the round), what state it keeps and sends with the global weights
(`ready_state`, `message`), and what it changes in the client's training (`client_hook`).
Floating-point buffers (BatchNorm statistics) are averaged like weights; integer buffers
take the maximum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedct.federated.protocol import Update, Weights


def check_update(update: Update, reference: Weights, control: Weights | None = None) -> str | None:
    """Why an update must be rejected (wrong keys or shapes, NaN/Inf, no examples, a
    control variate missing or wrong under SCAFFOLD), or None."""
    if update.examples <= 0:
        return "trained on no examples"
    problem = _check_arrays(update.weights, reference, "")
    if problem is None and control:
        problem = _check_arrays(update.control, control, "control ")
    return problem


def _check_arrays(arrays: Weights, reference: Weights, what: str) -> str | None:
    missing = reference.keys() - arrays.keys()
    extra = arrays.keys() - reference.keys()
    if missing or extra:
        return f"{what}keys differ ({next(iter(missing or extra))})"
    for key, value in arrays.items():
        if value.shape != reference[key].shape:
            return (f"shape of {what}{key} is {tuple(value.shape)}, "
                    f"expected {tuple(reference[key].shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{what}{key} has NaN or Inf"
    return None


class RunningAverage:
    """The examples-weighted average of updates, summed as they arrive, and the
    examples-weighted sum of their SCAFFOLD control changes.

    It holds one float64 copy of the model, whatever the number of clients, so a server
    need not keep every update of a round until it aggregates. Integer buffers take the
    maximum.
    """

    def __init__(self, reference: Weights):
        self.reference = reference
        self.sums: Weights = {}
        self.control_sum: Weights = {}
        self.examples = 0
        self.count = 0

    def add(self, update: Update) -> None:
        for key, ref in self.reference.items():
            value = update.weights[key]
            if ref.is_floating_point():
                weighted = value.to(torch.float64) * update.examples  # a new tensor
                if key in self.sums:
                    self.sums[key].add_(weighted)
                else:
                    self.sums[key] = weighted
            else:
                self.sums[key] = (torch.maximum(self.sums[key], value) if key in self.sums
                                  else value.clone())
        for key, value in update.control.items():
            weighted = value.to(torch.float64) * update.examples  # a new tensor
            if key in self.control_sum:
                self.control_sum[key].add_(weighted)
            else:
                self.control_sum[key] = weighted
        self.examples += update.examples
        self.count += 1

    def add_mean(self, weights: Weights, control: Weights, *, examples: int, count: int) -> None:
        """Take a secure round's example-weighted mean in place of its updates, which the
        server never sees one by one."""
        for key, ref in self.reference.items():
            self.sums[key] = (weights[key].to(torch.float64) * examples if ref.is_floating_point()
                              else weights[key].clone())
        self.control_sum = {k: v.to(torch.float64) * examples for k, v in control.items()}
        self.examples, self.count = examples, count

    def result(self) -> Weights | None:
        if not self.count:
            return None
        return {key: (self.sums[key] / self.examples).to(ref.dtype) if ref.is_floating_point()
                else self.sums[key].clone() for key, ref in self.reference.items()}



def weighted_average(updates: list[Update], reference: Weights) -> Weights | None:
    running = RunningAverage(reference)
    for update in updates:
        running.add(update)
    return running.result()


@dataclass
class ClientHook:
    """What a strategy adds to one client's local training: a loss term on the shared
    model's parameters (`penalty`), and `finish`, called once after the last step with
    (global weights, trained weights, steps), which removes any optimiser hooks and returns
    (entries for the client's state, the control change the client sends)."""

    penalty: Callable[[nn.Module], torch.Tensor] | None = None
    finish: Callable[[Weights, Weights, int], tuple[dict, Weights]] = field(
        default=lambda global_weights, trained, steps: ({}, {}))


class Strategy:
    """A server strategy: FedAvg's behaviour unless a subclass says otherwise.

    Subclasses set `name` and `summary` (the CLI's help lists them) and override what
    differs; a module under `fedct/federated/strategies/` is found by the registry.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    keeps_updates: ClassVar[bool] = False  # every update kept for the round, not only a sum

    def check(self, config) -> None:
        """Refuse settings this strategy cannot honour (one line, naming the key)."""

    def collector(self, reference: Weights, config) -> RunningAverage:
        return RunningAverage(reference)

    def ready_state(self, state: dict, model: nn.Module, *, local_keys: set[str]) -> dict:
        """The server state before a round (what the strategy keeps between rounds)."""
        return state

    def message(self, state: dict) -> Weights:
        """What the server sends each client with the global weights (SCAFFOLD's control)."""
        return {}

    def step(self, global_weights: Weights, collected: RunningAverage, state: dict, *, config,
             trainable: set[str] | None, num_clients: int) -> tuple[Weights, dict]:
        """New global weights and server state from a round's collected updates (at least
        one); pure: the inputs are left untouched."""
        return collected.result(), dict(state)

    def client_hook(self, model: nn.Module, optimizer: torch.optim.Optimizer, config, *,
                    control: Weights, state: dict) -> ClientHook | None:
        return None


def stepped_keys(global_weights: Weights, trainable: set[str] | None) -> list[str]:
    """The keys a server optimiser steps: floating point and trained."""
    return [k for k in global_weights if global_weights[k].is_floating_point()
            and (trainable is None or k in trainable)]
