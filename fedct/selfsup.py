"""Stage 0: self-supervised pretraining of a timm backbone on unlabelled images (BYOL).

Hospitals hold far more unlabelled scans than labelled ones. BYOL (Grill et al. 2020) needs
no negatives, so it trains with the small batches two CPU cores allow: an online network
(backbone, projector, predictor) learns to predict a slowly moving target network's
projection of another augmented view of the same image; the target is an exponential
moving average of the online backbone and projector, its decay raised from `target_decay`
to 1 along a cosine over the run. The result is the backbone alone, a plain timm state dict
(`RUN/backbone.safetensors`) that `fedct pretrain --pretrained` and `fedct federate --init`
(with `--model`) start from like any ImageNet weights file.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from fedct.config import SelfSupConfig, to_dict
from fedct.data.loading import load_images
from fedct.errors import FedctError
from fedct.files import atomic_write
from fedct.locks import exclusive
from fedct.models import create_model, data_config
from fedct.predict import collect
from fedct.runs import (
    SUMMARY,
    append_summary,
    check_resume_inputs,
    load_resume,
    prepare_run_dir,
    save_resume,
    truncate_csv,
    write_config,
    write_safetensors,
)
from fedct.tracking import write_report
from fedct.training import (
    cosine_between,
    cosine_with_warmup,
    make_optimizer,
    pick_device,
    seed_everything,
    set_threads,
)

BACKBONE = "backbone.safetensors"


def mlp(width_in: int, hidden: int, width_out: int) -> nn.Sequential:
    """BYOL's projector and predictor: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(width_in, hidden), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, width_out))


class Byol(nn.Module):
    """The online network; `target` is a frozen copy of backbone + projector, moved by EMA."""

    def __init__(self, backbone: nn.Module, *, hidden: int, width: int):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.num_features, hidden, width)
        self.predictor = mlp(width, hidden, width)
        self.target = copy.deepcopy(nn.ModuleDict({"backbone": backbone,
                                                   "projector": self.projector}))
        self.target.requires_grad_(False)

    def loss(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The symmetric BYOL loss: (2 - 2 cos) for each view predicting the other, in [0, 8]."""
        online = self.predictor(self.projector(self.backbone(torch.cat([first, second]))))
        with torch.no_grad():
            self.target.eval()  # its norms use their moving statistics, like BYOL's target
            target = self.target["projector"](self.target["backbone"](torch.cat([second, first])))
        cos = nn.functional.cosine_similarity(online, target.detach(), dim=-1)
        return 2 * (2 - 2 * cos.mean())

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        online = {"backbone": self.backbone, "projector": self.projector}
        for name, module in online.items():
            for ema, new in zip(self.target[name].state_dict().values(),
                                module.state_dict().values(), strict=True):
                if ema.is_floating_point():
                    ema.lerp_(new, 1 - decay)
                else:
                    ema.copy_(new)


def view_transform(data_cfg: dict, config: SelfSupConfig) -> v2.Compose:
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


class TwoViews(Dataset):
    def __init__(self, images: torch.Tensor, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        return self.transform(image), self.transform(image)


def run_selfsup(inputs: list[str | Path], out: str | Path, config: SelfSupConfig, *,
                resume: bool = False, force: bool = False, quiet: bool = False,
                console: Console | None = None) -> dict:
    """Train (or resume) a stage-0 run on the images in `inputs` (folders, files, CSV lists;
    any labels are ignored); the run directory is locked against a second writer."""
    with exclusive(out):
        return _selfsup([Path(p) for p in inputs], Path(out), config, resume=resume,
                        force=force, console=Console(quiet=True) if quiet else console or Console())


def _selfsup(inputs: list[Path], out: Path, config: SelfSupConfig, *, resume: bool, force: bool,
             console: Console) -> dict:
    paths = sorted({item.path.resolve() for item in collect(inputs)})
    if len(paths) < 4:
        raise FedctError(f"{', '.join(map(str, inputs))}: {len(paths)} images; self-supervised "
                         "pretraining needs at least 4")
    out = prepare_run_dir(out, resume=resume, force=force,
                          inputs={str(p): p for p in inputs if p.is_file()},
                          roots={str(p): p for p in inputs if p.is_dir()})
    set_threads()
    seed_everything(config.seed)
    device = pick_device(config.device)
    backbone = create_model(config.model, 0, pretrained=config.pretrained,
                            image_size=config.image_size)
    dcfg = data_config(backbone, config.image_size)
    model = Byol(backbone, hidden=config.hidden_dim, width=config.projection_dim).to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    images = load_images(paths, config.image_size)
    batch = min(config.batch_size, len(paths)) // 2 * 2
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(TwoViews(images, view_transform(dcfg, config)), batch_size=batch,
                        shuffle=True, drop_last=True, generator=generator)
    optimizer = make_optimizer(nn.ModuleList([model.backbone, model.projector, model.predictor]),
                               config)
    total = config.epochs * len(loader)
    scheduler = cosine_with_warmup(optimizer, total_steps=total,
                                   warmup_steps=int(config.warmup_epochs * len(loader)),
                                   min_lr_ratio=config.min_lr / config.lr)
    provenance = {"inputs": [str(p.resolve()) for p in inputs], "images": len(paths)}
    state = {"epoch": 0, "step": 0}
    if resume:
        check_resume_inputs(out, images=len(paths))
        saved = load_resume(out, ("model", "optimizer", "scheduler", *state))
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {k: int(saved[k]) for k in state}
        truncate_csv(out / SUMMARY, "epoch", state["epoch"])
        console.print(f"resuming {out} after epoch {state['epoch']}")
    else:
        write_config(out, to_dict(config), command="selfsup", extra=provenance)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    seconds = 0.0
    loss = float("nan")
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        seed_everything(config.seed * 1000 + epoch)  # a resumed epoch sees the same views
        generator.manual_seed(config.seed * 1000 + epoch)
        model.train()
        tick, losses = time.perf_counter(), []
        for first, second in loader:
            first, second = (v.to(device).contiguous(memory_format=memory_format)
                             for v in (first, second))
            loss_value = model.loss(first, second)
            optimizer.zero_grad(set_to_none=True)
            loss_value.backward()
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            model.update_target(cosine_between(config.target_decay, 1.0, state["step"] / total))
            losses.append(float(loss_value.detach()))
        elapsed = time.perf_counter() - tick
        seconds += elapsed
        loss = sum(losses) / len(losses)
        state["epoch"] = epoch
        append_summary(out, {"epoch": epoch, "train_loss": round(loss, 5),
                             "lr": max(g["lr"] for g in optimizer.param_groups),
                             "seconds": round(elapsed, 2)})
        save_backbone(out, model.backbone, config, epoch=epoch, images=len(paths), data_cfg=dcfg)
        save_resume(out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), **state})
        console.print(f"epoch {epoch}/{config.epochs}: BYOL loss {loss:.3f} ({elapsed:.1f}s)",
                      highlight=False)
    report = {"stage": "selfsup", "run": str(out), "objective": "byol", "epochs": state["epoch"],
              "images": len(paths), "final_loss": loss, "backbone": str(out / BACKBONE),
              "train_seconds": round(seconds, 2), "device": str(device)}
    write_report(out, report)
    return report


def save_backbone(out: Path, backbone: nn.Module, config: SelfSupConfig, *, epoch: int,
                  images: int, data_cfg: dict) -> None:
    """The online backbone in timm's names, with what made it in the file's header."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    header = {"format": "pt", "fedct_stage": "selfsup", "fedct_objective": "byol",
              "fedct_architecture": config.model, "fedct_epoch": str(epoch),
              "fedct_images": str(images), "fedct_data_config": json.dumps(data_cfg)}

    atomic_write(out / BACKBONE, lambda path: write_safetensors(path, tensors, header,
                                                                 what="the backbone"))
