"""Server aggregation as pure functions on state dicts: FedAvg, FedProx, FedAvgM, FedAdam, FedYogi.

FedProx aggregates like FedAvg (its difference is the client's proximal term). The adaptive
strategies follow Reddi et al. 2021 ("Adaptive Federated Optimization"): the averaged client
change is a pseudo-gradient for a server optimiser with learning rate `server_lr`.
Floating-point buffers (BatchNorm statistics) are always plainly averaged; integer buffers
take the maximum.
"""

from __future__ import annotations

import torch

from fedct.federated.protocol import Update, Weights


def check_update(update: Update, reference: Weights) -> str | None:
    """Why an update must be rejected (wrong keys or shapes, NaN/Inf, no examples), or None."""
    if update.examples <= 0:
        return "trained on no examples"
    missing = reference.keys() - update.weights.keys()
    extra = update.weights.keys() - reference.keys()
    if missing or extra:
        return f"keys differ ({next(iter(missing or extra))})"
    for key, value in update.weights.items():
        if value.shape != reference[key].shape:
            return f"shape of {key} is {tuple(value.shape)}, expected {tuple(reference[key].shape)}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key} has NaN or Inf"
    return None


def weighted_average(updates: list[Update], reference: Weights) -> Weights:
    total = sum(u.examples for u in updates)
    out = {}
    for key, ref in reference.items():
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for u in updates:
                acc += u.weights[key].to(torch.float64) * (u.examples / total)
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = torch.stack([u.weights[key] for u in updates]).max(dim=0).values
    return out


def aggregate(global_weights: Weights, updates: list[Update], *, strategy: str, config,
              server_state: dict, trainable: set[str] | None = None) -> tuple[Weights, dict]:
    """New global weights and server state from accepted updates (pure: inputs untouched)."""
    if not updates:
        return dict(global_weights), dict(server_state)
    average = weighted_average(updates, global_weights)
    if strategy in ("fedavg", "fedprox"):
        return average, dict(server_state)
    keys = [k for k in global_weights if global_weights[k].is_floating_point()
            and (trainable is None or k in trainable)]
    state = {name: dict(server_state.get(name, {})) for name in ("m", "v")}
    new = dict(average)
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
