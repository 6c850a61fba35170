"""Stage 0: self-supervised pretraining of a timm backbone on unlabelled images (BYOL).

Hospitals hold far more unlabelled scans than labelled ones. BYOL's networks and loss are in
`fedct.byol`; here they train on one machine, the target's EMA decay raised from
`target_decay` to 1 along a cosine over the run (`fedct federate --objective byol` is the
federated form). The result is the backbone alone, a plain timm state dict
(`RUN/backbone.safetensors`) that `fedct pretrain --pretrained` and `fedct federate --init`
(with `--model`) start from like any ImageNet weights file.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedct.byol import BACKBONE, Byol, save_backbone, view_transform
from fedct.config import SelfSupConfig, to_dict
from fedct.data.loading import load_images
from fedct.errors import FedctError
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


class Views(Dataset):
    """Two views of each cached image, as two tensors."""

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
    loader = DataLoader(Views(images, view_transform(dcfg, config)), batch_size=batch,
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
        save_backbone(out, model.backbone.state_dict(), architecture=config.model,
                      data_cfg=dcfg, epoch=epoch, images=len(paths))
        save_resume(out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), **state})
        console.print(f"epoch {epoch}/{config.epochs}: BYOL loss {loss:.3f} ({elapsed:.1f}s)",
                      highlight=False)
    report = {"stage": "selfsup", "run": str(out), "objective": "byol", "epochs": state["epoch"],
              "images": len(paths), "final_loss": loss, "backbone": str(out / BACKBONE),
              "train_seconds": round(seconds, 2), "device": str(device)}
    write_report(out, report)
    return report
