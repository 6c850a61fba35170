"""Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization"): the averaged
client change is a pseudo-gradient for a server optimiser with learning rate `server_lr`:
momentum (FedAvgM, Hsu et al. 2019), Adam (FedAdam) or Yogi (FedYogi). Only the trained
floating-point weights are stepped; the rest take the average."""

from __future__ import annotations

import torch

from fedct.errors import FedctError
from fedct.federated.protocol import Weights
from fedct.federated.strategies.base import RunningAverage, Strategy, stepped_keys


class ServerOptimizer(Strategy):
    """A step of `server_lr` along the optimiser's direction from the round's average."""

    def check(self, config) -> None:
        if not config.server_lr > 0:
            raise FedctError(f"server_lr {config.server_lr}: must be > 0")

    def direction(self, delta: torch.Tensor, key: str, state: dict, config) -> torch.Tensor:
        raise NotImplementedError

    def step(self, global_weights: Weights, collected: RunningAverage, state: dict, *, config,
             trainable: set[str] | None, num_clients: int) -> tuple[Weights, dict]:
        average = collected.result()
        new = dict(average)
        state = {name: dict(state.get(name, {})) for name in ("m", "v")}
        for key in stepped_keys(global_weights, trainable):
            delta = average[key].double() - global_weights[key].double()
            step = self.direction(delta, key, state, config)
            new[key] = (global_weights[key].double() + config.server_lr * step).to(
                global_weights[key].dtype)
        return new, state


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    summary = "server momentum (server_momentum) on the average change"

    def direction(self, delta, key, state, config):
        m = state["m"].get(key, torch.zeros_like(delta)).double()
        m = config.server_momentum * m + delta
        state["m"][key] = m.float()
        return m


class FedAdam(ServerOptimizer):
    name = "fedadam"
    summary = "server Adam (beta1, beta2, tau) on the average change"

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor, config) -> torch.Tensor:
        return config.beta2 * v + (1 - config.beta2) * squared

    def direction(self, delta, key, state, config):
        m = state["m"].get(key, torch.zeros_like(delta)).double()
        v = state["v"].get(key, torch.full_like(delta, config.tau**2)).double()
        m = config.beta1 * m + (1 - config.beta1) * delta
        v = self.second_moment(v, delta * delta, config)
        state["m"][key], state["v"][key] = m.float(), v.float()
        return m / (v.sqrt() + config.tau)


class FedYogi(FedAdam):
    name = "fedyogi"
    summary = "server Yogi: fedadam with an additive second moment"

    def second_moment(self, v, squared, config):
        return v - (1 - config.beta2) * squared * torch.sign(v - squared)
