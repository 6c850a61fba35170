"""BYOL (Grill et al. 2020): the networks, loss and views of stage 0, central and federated.

An online network (backbone, projector, predictor) learns to predict a slowly moving
target network's projection of another augmented view of the same image; the target is an
exponential moving average of the online backbone and projector. BYOL needs no negatives,
so it trains with the small batches two CPU cores allow. `fedct selfsup` trains it on one
machine (`fedct.selfsup`); `fedct federate --objective byol` trains the online network
through the federated rounds (`fedct.federated.client`): the online network is averaged,
and each client keeps its own target between rounds (as in Zhuang et al.'s federated BYOL,
ICLR 2022).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

from fedct.files import atomic_write
from fedct.runs import write_safetensors

BACKBONE = "backbone.safetensors"


def mlp(width_in: int, hidden: int, width_out: int) -> nn.Sequential:
    """BYOL's projector and predictor: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(width_in, hidden), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, width_out))


class ByolOnline(nn.Module):
    """The network that trains: a timm backbone (no head), projector and predictor."""

    def __init__(self, backbone: nn.Module, *, hidden: int, width: int):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.num_features, hidden, width)
        self.predictor = mlp(width, hidden, width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(images)))


def make_target(online: ByolOnline) -> nn.ModuleDict:
    """A frozen copy of the online backbone and projector."""
    target = copy.deepcopy(nn.ModuleDict({"backbone": online.backbone,
                                          "projector": online.projector}))
    return target.requires_grad_(False)


def byol_loss(online: ByolOnline, target: nn.ModuleDict, first: torch.Tensor,
              second: torch.Tensor) -> torch.Tensor:
    """The symmetric BYOL loss: (2 - 2 cos) for each view predicting the other, in [0, 8]."""
    predicted = online(torch.cat([first, second]))
    with torch.no_grad():
        target.eval()  # its norms use their moving statistics, like BYOL's target
        projected = target["projector"](target["backbone"](torch.cat([second, first])))
    cos = nn.functional.cosine_similarity(predicted, projected.detach(), dim=-1)
    return 2 * (2 - 2 * cos.mean())


@torch.no_grad()
def move_target(target: nn.ModuleDict, online: ByolOnline, decay: float) -> None:
    """One EMA step of the target toward the online backbone and projector."""
    for name in ("backbone", "projector"):
        for ema, new in zip(target[name].state_dict().values(),
                            getattr(online, name).state_dict().values(), strict=True):
            if ema.is_floating_point():
                ema.lerp_(new, 1 - decay)
            else:
                ema.copy_(new)


class Byol(ByolOnline):
    """The online network with its target inside (stage 0 on one machine: `resume.pt` holds
    both)."""

    def __init__(self, backbone: nn.Module, *, hidden: int, width: int):
        super().__init__(backbone, hidden=hidden, width=width)
        self.target = make_target(self)

    def loss(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return byol_loss(self, self.target, first, second)

    def update_target(self, decay: float) -> None:
        move_target(self.target, self, decay)


class PairTrainee(nn.Module):
    """A client's BYOL step in the shape of a supervised one: its batch is [B, 2, C, H, W]
    (two views of each image) and its output the loss, so the federated client update
    trains it like any model (strategies' hooks, step counts), the target moving by EMA
    after each step (`after_step`). Its first round's target is the global network."""

    def __init__(self, online: ByolOnline, *, decay: float, channels_last: bool,
                 target_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.online = online
        self.target = make_target(online)
        if target_state is not None:  # the client's own target, kept from its last round
            self.target.load_state_dict(target_state)
        self.decay = decay
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        first, second = (pairs[:, i].contiguous(memory_format=self.memory_format)
                         for i in (0, 1))
        return byol_loss(self.online, self.target, first, second)

    def after_step(self, _step: int) -> None:
        move_target(self.target, self.online, self.decay)


def pair_loss(loss: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
    """The loss `PairTrainee` returned; the labels are never read."""
    return loss


def view_transform(data_cfg: dict, config) -> v2.Compose:
    """One random view of a grey uint8 [1, H, W] image: crop, flip, rotation, contrast, blur."""
    size = data_cfg["input_size"][-1]
    blur = max(3, size // 20 * 2 + 1)
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(config.crop_scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(10),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
        v2.RandomApply([v2.GaussianBlur(blur, sigma=(0.1, 2.0))], p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Lambda(lambda x: x.expand(3, -1, -1)),
        v2.Normalize(mean=data_cfg["mean"], std=data_cfg["std"]),
    ])


class TwoViews:
    """Two independent views of one image, stacked: [2, C, H, W]."""

    def __init__(self, view):
        self.view = view

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.view(image), self.view(image)])


def save_backbone(out: Path, backbone_state: dict[str, torch.Tensor], *, architecture: str,
                  data_cfg: dict, **provenance) -> None:
    """The backbone in timm's names (what `--pretrained FILE` loads), with what made it in
    the file's header."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone_state.items()}
    header = {"format": "pt", "fedct_stage": "selfsup", "fedct_objective": "byol",
              "fedct_architecture": architecture, "fedct_data_config": json.dumps(data_cfg),
              **{f"fedct_{k}": str(v) for k, v in provenance.items()}}
    atomic_write(out / BACKBONE, lambda path: write_safetensors(path, tensors, header,
                                                                 what="the backbone"))


def backbone_of(online_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's entries of an online network's state dict, in timm's names."""
    return {k.removeprefix("backbone."): v for k, v in online_state.items()
            if k.startswith("backbone.")}
