"""One local training loop and one prediction loop, used by stage 1, stage 2 and Flower."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable

import numpy as np
import torch
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader

from fedct.models import train_mode
from fedct.privacy import step_was_skipped


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads() -> None:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def class_weights(config, labels: list[int], num_classes: int) -> torch.Tensor | None:
    """Inverse-frequency class weights with `balance: loss`, else None."""
    if config.balance != "loss" or not labels:
        return None
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).clamp(min=1).float()
    return counts.sum() / (num_classes * counts)


def make_loss(config, labels: list[int], num_classes: int) -> nn.Module:
    return nn.CrossEntropyLoss(weight=class_weights(config, labels, num_classes),
                               label_smoothing=config.label_smoothing)


def make_optimizer(model: nn.Module, config, *, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW or SGD over trainable parameters; no weight decay on norms and biases.

    With `layer_decay` < 1, timm's layer-wise groups give each earlier block a smaller lr
    (the pretrained low-level features move least), as in BEiT/timm fine-tuning recipes.
    """
    lr = config.lr if lr is None else lr
    if 0 < getattr(config, "layer_decay", 1.0) < 1:
        groups = param_groups_layer_decay(model, weight_decay=config.weight_decay,
                                          layer_decay=config.layer_decay)
        for group in groups:
            group["lr"] = lr * group.pop("lr_scale")
    else:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def cosine_between(start: float, end: float, progress: float) -> float:
    """Half a cosine from `start` (progress 0) to `end` (progress 1 and beyond)."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, progress)))


def round_lr(config, round_number: int) -> float:
    """The clients' lr in a federated round: constant, or cosine from `lr` in round 1 to
    `min_lr` in the last.

    A constant lr leaves the last rounds as noisy as the first; decaying it lets the
    global model settle, as the cosine schedule does for a central run's epochs.
    """
    if config.lr_schedule != "cosine" or config.rounds <= 1:
        return config.lr
    return cosine_between(config.lr, config.min_lr, (round_number - 1) / (config.rounds - 1))


def cosine_with_warmup(optimizer, *, total_steps: int, warmup_steps: int,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return cosine_between(1.0, min_lr_ratio, progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                          enabled=amp and device.type == "cuda")


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    scheduler=None,
    grad_clip: float = 0.0,
    amp: bool = False,
    channels_last: bool = True,
    max_steps: int | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict:
    """One pass (or `max_steps` optimiser steps) of local training; returns loss and counts.

    `penalty` adds a term to the loss (FedProx's proximal term); `mix` turns a batch and its
    labels into mixed images and soft targets (`fedct.recipes.BatchMix`). With an Opacus optimiser,
    clipping and noise happen inside `optimizer.step()`, and skipped physical steps of a
    BatchMemoryManager do not count as steps.
    """
    train_mode(model)
    total_loss, examples, steps = 0.0, 0, 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in loader:
        if len(labels) == 0:  # Poisson sampling can draw an empty batch
            continue
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        targets = labels
        if mix is not None:
            images, targets = mix(images, labels)
        with _autocast(device, amp):
            loss = loss_fn(model(images), targets)
            if penalty is not None:
                loss = loss + penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        total_loss += float(loss.detach()) * len(labels)
        examples += len(labels)
        if step_was_skipped(optimizer):
            continue
        steps += 1
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(steps)
        if max_steps is not None and steps >= max_steps:
            break
    return {"loss": total_loss / max(1, examples), "examples": examples, "steps": steps}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, *, device: torch.device,
            channels_last: bool = True, amp: bool = False,
            tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [N, C] and true labels [N], in loader order.

    `tta` averages the probabilities of each image and its left-right mirror (a CT slice's
    findings may sit in either lung, and training already flips).
    """
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    probs, truth = [], []
    for images, labels in loader:
        images = images.to(device).contiguous(memory_format=memory_format)
        with _autocast(device, amp):
            prob = torch.softmax(model(images).float(), dim=1)
            if tta:
                prob = (prob + torch.softmax(model(images.flip(-1)).float(), dim=1)) / 2
        probs.append(prob.cpu())
        truth.append(labels)
    if not probs:
        return np.zeros((0, 0)), np.zeros((0,), dtype=int)
    return torch.cat(probs).numpy(), torch.cat(truth).numpy()


def mean_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))
