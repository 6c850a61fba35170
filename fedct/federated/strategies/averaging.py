"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020): the examples-weighted average
of the clients' models; FedProx adds a proximal pull towards the global weights to each
client's training, which limits how far a client drifts on its own data."""

from __future__ import annotations

import torch
from torch import nn

from fedct.errors import FedctError
from fedct.federated.protocol import Weights
from fedct.federated.strategies.base import ClientHook, Strategy


class FedAvg(Strategy):
    name = "fedavg"
    summary = "examples-weighted average of the clients' models"


class FedProx(Strategy):
    name = "fedprox"
    summary = "fedavg with a proximal term mu/2 |w - w_global|^2 on each client"

    def check(self, config) -> None:
        if config.mu < 0:
            raise FedctError(f"mu {config.mu}: must be >= 0")

    def client_hook(self, model: nn.Module, optimizer: torch.optim.Optimizer, config, *,
                    control: Weights, state: dict) -> ClientHook | None:
        if config.mu <= 0:
            return None
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if config.dp:  # Opacus keeps only the privatised data gradient: pull after each step
            handle = attach_proximal_pull(model, optimizer, anchor, config.mu)

            def finish(global_weights: Weights, trained: Weights, steps: int):
                handle.remove()
                return {}, {}

            return ClientHook(finish=finish)

        def penalty(_: nn.Module) -> torch.Tensor:  # on the shared model's names
            return 0.5 * config.mu * sum(((p - anchor[n]) ** 2).sum()
                                         for n, p in model.named_parameters() if n in anchor)

        return ClientHook(penalty=penalty)


def attach_proximal_pull(model: nn.Module, optimizer: torch.optim.Optimizer,
                         anchor: Weights, mu: float):
    """FedProx under DP: after every (privatised) step, w -= lr * mu * (w - w_global).

    Opacus replaces each gradient by the clipped, noised sum of per-example gradients, so a
    proximal term in the loss would be lost; applied after the step (registered on the plain
    optimiser, which the DP optimiser calls after noising) it is post-processing, and for
    plain SGD it is exactly the term's gradient step.
    """
    params = dict(model.named_parameters())
    targets = {id(params[n]): value for n, value in anchor.items()}

    @torch.no_grad()
    def after_step(opt, args, kwargs) -> None:
        for group in opt.param_groups:
            for param in group["params"]:
                if id(param) in targets:
                    param.sub_(param - targets[id(param)], alpha=group["lr"] * mu)

    return optimizer.register_step_post_hook(after_step)
