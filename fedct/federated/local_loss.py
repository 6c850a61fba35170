"""Local prior correction: a client's loss that knows its own label mix.

Under label skew each client's cross-entropy pulls the shared head towards its own class
prior; these losses take the client's class counts (which never leave it) out of the
logits it trains on, so the global model keeps its logits unshifted at test time.

- `ce`: plain cross-entropy.
- `balanced-softmax`: logit adjustment, logits + log(prior) (Ren et al. 2020; Menon et
  al. 2021).
- `fedlc`: FedLC's calibrated logits, logits - tau * n_c^(-1/4) (Zhang et al. 2022).
- `fedrs`: FedRS's restricted softmax, logits of classes the client does not hold scaled
  by alpha (Li & Zhan 2021; here the head's logits, bias included).

A class the client does not hold counts as one example in `balanced-softmax` and `fedlc`:
a count of zero would shift its logit to -inf, which removes the class and leaves a
one-class client with a loss of zero and nothing to learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedct.config import CHOICES
from fedct.training import class_weights


class LocalLoss(nn.Module):
    """Cross-entropy on the client's adjusted logits (class weights and smoothing as for ce)."""

    def __init__(self, kind: str, counts: torch.Tensor, *, weight: torch.Tensor | None = None,
                 label_smoothing: float = 0.0, fedlc_tau: float = 1.0, fedrs_alpha: float = 0.5):
        super().__init__()
        if kind not in CHOICES["local_loss"]:
            raise ValueError(f"unknown local loss {kind!r}")
        self.kind = kind
        self.label_smoothing = label_smoothing
        counts = counts.float()
        held = counts.clamp(min=1.0)
        if kind == "balanced-softmax":
            shift, scale = torch.log(held / held.sum()), torch.ones_like(counts)
        elif kind == "fedlc":
            shift, scale = -fedlc_tau * held.pow(-0.25), torch.ones_like(counts)
        elif kind == "fedrs":
            shift = torch.zeros_like(counts)
            scale = torch.where(counts > 0, torch.ones_like(counts), torch.full_like(counts, fedrs_alpha))
        else:
            shift, scale = torch.zeros_like(counts), torch.ones_like(counts)
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)
        self.register_buffer("weight", weight)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale.to(logits.dtype) + self.shift.to(logits.dtype)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(logits.dtype)
        return F.cross_entropy(self.adjust(logits), labels, weight=weight,
                               label_smoothing=self.label_smoothing)


def local_loss(config, labels: list[int], num_classes: int) -> LocalLoss:
    """The client's loss for `config.local_loss`, from its own training labels."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes)
    return LocalLoss(config.local_loss, counts, weight=class_weights(config, labels, num_classes),
                     label_smoothing=config.label_smoothing, fedlc_tau=config.fedlc_tau,
                     fedrs_alpha=config.fedrs_alpha)
