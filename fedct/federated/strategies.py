"""Server aggregation as pure functions on state dicts: FedAvg, FedProx, FedAvgM, FedAdam,
FedYogi, SCAFFOLD.

FedProx aggregates like FedAvg (its difference is the client's proximal term); SCAFFOLD
steps by `server_lr` times the averaged change (its control variates: `scaffold`). The adaptive
strategies follow Reddi et al. 2021 ("Adaptive Federated Optimization"): the averaged client
change is a pseudo-gradient for a server optimiser with learning rate `server_lr`.
Floating-point buffers (BatchNorm statistics) are always plainly averaged; integer buffers
take the maximum.
"""

from __future__ import annotations

import torch

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


def aggregate(global_weights: Weights, updates: list[Update], *, strategy: str, config,
              server_state: dict, trainable: set[str] | None = None) -> tuple[Weights, dict]:
    """New global weights and server state from accepted updates (pure: inputs untouched)."""
    return apply_strategy(global_weights, weighted_average(updates, global_weights),
                          strategy=strategy, config=config, server_state=server_state,
                          trainable=trainable)


def apply_strategy(global_weights: Weights, average: Weights | None, *, strategy: str, config,
                   server_state: dict, trainable: set[str] | None = None) -> tuple[Weights, dict]:
    """New global weights and server state from the clients' average (None: no update)."""
    if average is None:
        return dict(global_weights), dict(server_state)
    if strategy in ("fedavg", "fedprox") or (strategy == "scaffold" and config.server_lr == 1):
        return average, dict(server_state)
    keys = [k for k in global_weights if global_weights[k].is_floating_point()
            and (trainable is None or k in trainable)]
    new = dict(average)
    if strategy == "scaffold":  # x + server_lr * (average - x); the controls are the server's
        for key in keys:
            step = average[key].double() - global_weights[key].double()
            new[key] = (global_weights[key].double() + config.server_lr * step).to(
                global_weights[key].dtype)
        return new, dict(server_state)
    state = {name: dict(server_state.get(name, {})) for name in ("m", "v")}
    for key in keys:
        delta = average[key].double() - global_weights[key].double()
        if strategy == "fedavgm":
            m = state["m"].get(key, torch.zeros_like(delta)).double()
            m = config.server_momentum * m + delta
            state["m"][key] = m.float()
            step = m
        else:
            m = state["m"].get(key, torch.zeros_like(delta)).double()
            v = state["v"].get(key, torch.full_like(delta, config.tau**2)).double()
            m = config.beta1 * m + (1 - config.beta1) * delta
            squared = delta * delta
            if strategy == "fedadam":
                v = config.beta2 * v + (1 - config.beta2) * squared
            elif strategy == "fedyogi":
                v = v - (1 - config.beta2) * squared * torch.sign(v - squared)
            else:
                raise ValueError(f"unknown strategy {strategy!r}")
            state["m"][key], state["v"][key] = m.float(), v.float()
            step = m / (v.sqrt() + config.tau)
        new[key] = (global_weights[key].double() + config.server_lr * step).to(
            global_weights[key].dtype)
    return new, state
