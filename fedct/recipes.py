"""Stage-1 recipe levers beyond the plain loop: timm's Mixup / CutMix on each batch, and the
mean of the last K epochs' weights (the COVID-CT baseline voted over epochs; timm's
`avg_checkpoints.py` does the same offline).
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from torch import nn


class BatchMix:
    """timm's `Mixup` (mixup and/or cutmix) on a training batch, as `train_epoch`'s `mix`.

    timm mixes a batch with its own reverse and needs an even batch; an odd last example is
    passed through unmixed with its (smoothed) one-hot target, so every example trains.
    Targets become soft, so the loss is timm's `SoftTargetCrossEntropy`, and label smoothing
    moves into the targets.
    """

    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float, prob: float,
                 label_smoothing: float, num_classes: int):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                           label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        even = len(labels) - len(labels) % 2
        if even == len(labels):
            return self.mixup(images, labels)
        rest = mixup_target(labels[even:], self.num_classes, 1.0, self.label_smoothing)
        if even == 0:
            return images, rest
        mixed, targets = self.mixup(images[:even].clone(), labels[:even])
        return torch.cat([mixed, images[even:]]), torch.cat([targets, rest])


def batch_mix(config, num_classes: int) -> BatchMix | None:
    """The config's mixing, or None when `mixup_alpha` and `cutmix_alpha` are both 0."""
    if config.mixup_alpha <= 0 and config.cutmix_alpha <= 0:
        return None
    return BatchMix(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                    prob=config.mix_prob, label_smoothing=config.label_smoothing,
                    num_classes=num_classes)


def mixed_loss() -> nn.Module:
    return SoftTargetCrossEntropy()


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of several state dicts of one model (norm statistics included);
    integer buffers such as BatchNorm's step count are taken from the last."""
    if not states:
        raise ValueError("no weights to average")
    averaged = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            averaged[key] = torch.stack([s[key].float() for s in states]).mean(0).to(last.dtype)
        else:
            averaged[key] = last.clone()
    return averaged
