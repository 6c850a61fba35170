"""SCAFFOLD (Karimireddy et al. 2020, option II): control variates against client drift.

The server's control c and each client's own c_i estimate the average local step (as
displacement per unit of learning rate) over the shared trainable parameters. On every
local step a client moves each parameter by an extra -lr * (c - c_i): for plain SGD this
is the paper's corrected gradient g - c_i + c; with AdamW or momentum the correction keeps
the control variates' units instead of being rescaled by the optimiser's moments. It is
applied to the optimiser's output, after Opacus has clipped and noised the gradient, so
under DP it is post-processing and the epsilon does not change.

After its K steps at learning rate lr the client sets c_i+ = c_i - c + (x - y_i) / (K lr)
and sends the change c_i+ - c_i; the server adds the round's changes to c (weighted by
examples, as the models are: `server_control`). c_i stays with the client, c with the
server's state.
"""

from __future__ import annotations

import torch
from torch import nn

from fedct.errors import FedctError
from fedct.federated.protocol import Weights
from fedct.federated.strategies.base import (
    ClientHook,
    RunningAverage,
    Strategy,
    stepped_keys,
)


class Scaffold(Strategy):
    name = "scaffold"
    summary = "control variates against client drift (Karimireddy et al. 2020)"

    def check(self, config) -> None:
        if not config.server_lr > 0:
            raise FedctError(f"server_lr {config.server_lr}: must be > 0")

    def ready_state(self, state: dict, model: nn.Module, *, local_keys: set[str]) -> dict:
        """The server's control, zero before the first round; it covers the trainable
        parameters the server aggregates (not FedBN's local norms)."""
        if "control" in state:
            return state
        return {**state, "control": zero_control(model, control_keys(model, exclude=local_keys))}

    def message(self, state: dict) -> Weights:
        return state["control"]

    def step(self, global_weights: Weights, collected: RunningAverage, state: dict, *, config,
             trainable: set[str] | None, num_clients: int) -> tuple[Weights, dict]:
        """x + server_lr * (average - x); c moves by the round's control changes."""
        average = collected.result()
        new = dict(average)
        if config.server_lr != 1:
            for key in stepped_keys(global_weights, trainable):
                step = average[key].double() - global_weights[key].double()
                new[key] = (global_weights[key].double() + config.server_lr * step).to(
                    global_weights[key].dtype)
        control = server_control(state["control"], collected.control_sum,
                                 examples=collected.examples, updates=collected.count,
                                 num_clients=num_clients)
        return new, {**state, "control": control}

    def client_hook(self, model: nn.Module, optimizer: torch.optim.Optimizer, config, *,
                    control: Weights, state: dict) -> ClientHook:
        if not control:
            raise FedctError("strategy scaffold: the server sent no control variate")
        own = state.get("control") or {k: torch.zeros_like(v) for k, v in control.items()}
        lrs = learning_rates(model, optimizer)
        handle = attach_correction(model, optimizer, control, own)

        def finish(global_weights: Weights, trained: Weights, steps: int):
            handle.remove()
            new, change = client_control_update(global_weights, trained, control, own,
                                                steps=steps, lrs=lrs)
            return {"control": new}, change

        return ClientHook(finish=finish)


def control_keys(model: nn.Module, *, exclude: set[str] = frozenset()) -> list[str]:
    """The parameters SCAFFOLD corrects: the trainable ones the server aggregates."""
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in exclude]


def zero_control(model: nn.Module, keys: list[str]) -> Weights:
    params = dict(model.named_parameters())
    return {k: torch.zeros_like(params[k], device="cpu", dtype=torch.float32) for k in keys}


def learning_rates(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each named parameter's learning rate (layer-wise decay gives groups their own)."""
    group_lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {n: group_lr[id(p)] for n, p in model.named_parameters() if id(p) in group_lr}


def attach_correction(model: nn.Module, optimizer: torch.optim.Optimizer,
                      server_control: Weights, client_control: Weights):
    """Hook -lr * (c - c_i) onto every step of `optimizer`; returns the hook's handle.

    Register it on the plain optimiser before Opacus wraps it: the DP optimiser calls the
    plain one's step after noising, so the hook sees the privatised step.
    """
    params = dict(model.named_parameters())
    shift = {id(params[k]): (server_control[k] - client_control[k]).to(
        device=params[k].device, dtype=params[k].dtype) for k in server_control}

    @torch.no_grad()
    def after_step(opt, args, kwargs) -> None:
        for group in opt.param_groups:
            for param in group["params"]:
                if id(param) in shift:
                    param.add_(shift[id(param)], alpha=-group["lr"])

    return optimizer.register_step_post_hook(after_step)


def client_control_update(global_weights: Weights, trained: Weights, server_control: Weights,
                          client_control: Weights, *, steps: int,
                          lrs: dict[str, float]) -> tuple[Weights, Weights]:
    """(c_i+, c_i+ - c_i) after `steps` local steps; no steps leave c_i as it was."""
    if steps == 0:
        return dict(client_control), {k: torch.zeros_like(v) for k, v in client_control.items()}
    new, delta = {}, {}
    for key, c in server_control.items():
        moved = (global_weights[key].float() - trained[key].float()) / (steps * lrs[key])
        new[key] = client_control[key] - c + moved
        delta[key] = new[key] - client_control[key]
    return new, delta


def server_control(control: Weights, weighted_sum: Weights, *, examples: int, updates: int,
                   num_clients: int) -> Weights:
    """c + (|S| / N) * the examples-weighted mean of the round's |S| client changes.

    The paper's clients weigh equally; fedct averages the models by examples, so the
    controls are weighted the same way and the correction aims at the same objective (a
    client with 4 images would otherwise steer c as much as one with 300). With equal
    client sizes this is the paper's c + (1/N) * sum of the changes.
    """
    if not examples:
        return dict(control)
    scale = updates / num_clients / examples
    return {k: (v.double() + weighted_sum[k] * scale).float() for k, v in control.items()}


def state_bytes(control: Weights) -> int:
    """Bytes of one control variate (what each message and each client's state adds)."""
    return sum(v.numel() * v.element_size() for v in control.values())
