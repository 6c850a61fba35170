"""Robust aggregation: the coordinate-wise median (FedMedian, Yin et al. 2018) and the
coordinate-wise trimmed mean (FedTrimmedAvg, ibid.) of the clients' models, as Flower's
strategies of those names compute them: each client counts once, whatever its examples.

One client with a broken scanner or a poisoned update moves a mean anywhere; a median or
a trimmed mean moves only as far as the honest clients allow. Both need every update of a
round at once, so the server keeps them until it aggregates (memory grows with the
clients), and secure aggregation, which reveals only their sum, cannot serve them.
"""

from __future__ import annotations

import torch

from fedct.errors import FedctError
from fedct.federated.protocol import Update, Weights
from fedct.federated.strategies.base import RunningAverage, Strategy


class KeptUpdates(RunningAverage):
    """Every accepted update of the round (its examples counted as a running average's
    would be), reduced coordinate-wise by `reduce` over the stacked client values."""

    def __init__(self, reference: Weights, reduce):
        super().__init__(reference)
        self.reduce = reduce
        self.kept: list[Weights] = []

    def add(self, update: Update) -> None:
        self.kept.append({k: update.weights[k] for k in self.reference})
        self.examples += update.examples
        self.count += 1

    def add_mean(self, weights, control, *, examples, count) -> None:
        raise FedctError("a robust strategy cannot aggregate a secure round's sum")

    def result(self) -> Weights | None:
        if not self.count:
            return None
        out = {}
        for key, ref in self.reference.items():
            stacked = torch.stack([w[key] for w in self.kept])
            out[key] = (self.reduce(stacked.double()).to(ref.dtype) if ref.is_floating_point()
                        else stacked.amax(dim=0))
        return out


def median(stacked: torch.Tensor) -> torch.Tensor:
    """numpy's median: the mean of the two middle values for an even count."""
    ordered = stacked.sort(dim=0).values
    n = ordered.shape[0]
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def trimmed_mean(stacked: torch.Tensor, beta: float) -> torch.Tensor:
    """The mean after int(beta * n) values are cut from each end (scipy's trim_mean)."""
    n = stacked.shape[0]
    cut = int(beta * n)
    return stacked.sort(dim=0).values[cut:n - cut].mean(dim=0)


class FedMedian(Strategy):
    name = "fedmedian"
    summary = "coordinate-wise median of the clients' models (robust; not with secagg)"
    keeps_updates = True

    def collector(self, reference: Weights, config) -> KeptUpdates:
        return KeptUpdates(reference, median)


class FedTrimmedAvg(Strategy):
    name = "fedtrimmedavg"
    summary = "coordinate-wise mean less trim_beta of each end (robust; not with secagg)"
    keeps_updates = True

    def check(self, config) -> None:
        if not 0 <= config.trim_beta < 0.5:
            raise FedctError(f"trim_beta {config.trim_beta}: must be in [0, 0.5)")

    def collector(self, reference: Weights, config) -> KeptUpdates:
        return KeptUpdates(reference, lambda stacked: trimmed_mean(stacked, config.trim_beta))
