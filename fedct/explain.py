"""Grad-CAM heat maps over the CT slice: where the model looked for the positive class.

Captum's `LayerGradCam` on a feature stage of the timm model (`feature_info`): the deepest
whose map is still fine enough to point at a lung region, or a module the user names. Each
image gets an overlay PNG; a contact sheet shows many at once. On synthetic data the truth
is known (`lesions.npz`): the share of positives whose heat-map peak falls inside a drawn
lesion is measured and reported.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from fedct.errors import FedctError
from fedct.files import atomic_write, staging_dir
from fedct.metrics import wilson_interval

MIN_CELLS = 8  # chosen on the demo's val: 1/8 of 96 px found the lesion most often
SHEET_MAX = 48  # images on the contact sheet; every image still gets its own PNG


def cam_layer(model: torch.nn.Module, name: str | None = None, *,
              image_size: int) -> tuple[str, torch.nn.Module]:
    """The module Grad-CAM reads: `name`, else the deepest feature stage whose map is at
    least MIN_CELLS cells a side at this input size. The last stage of a CNN is 1/32 of the
    input (3 x 3 cells at 96 px): too coarse to say which lung."""
    if name is None:
        stages = getattr(model, "feature_info", None)
        if not stages:
            raise FedctError(f"{type(model).__name__}: no feature_info to find a convolutional "
                             "stage; name one with --cam-layer")
        fine = [s for s in stages if image_size // s["reduction"] >= MIN_CELLS]
        name = (fine or list(stages)[:1])[-1]["module"]
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        raise FedctError(f"--cam-layer {name!r}: the model has no such module") from None


def grad_cam(model: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor,
             target: int) -> np.ndarray:
    """Heat maps [B, H, W] in [0, 1] for class `target`, upsampled to the input size."""
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    with torch.enable_grad():
        attribution = LayerGradCam(model, layer).attribute(images, target=target,
                                                           relu_attributions=True)
    if attribution.dim() != 4:
        raise FedctError("Grad-CAM needs a convolutional feature map [B, C, H, W]; this layer "
                         f"gives {attribution.dim()} dimensions (name another with --cam-layer)")
    heat = LayerAttribution.interpolate(attribution.detach(), tuple(images.shape[-2:]),
                                        interpolate_mode="bilinear")[:, 0]
    peak = heat.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
    return (heat / peak).clamp(0, 1).cpu().numpy()


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The slice in gray with the heat map in the jet colours on top, as uint8 RGB."""
    base = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    if heat.shape != gray.shape:
        heat = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(
            gray.shape[::-1], Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    colour = colormaps["jet"](heat)[..., :3]
    weight = alpha * heat[..., None]
    return (np.clip(base * (1 - weight) + colour * weight, 0, 1) * 255 + 0.5).astype(np.uint8)


def peak_of(heat: np.ndarray) -> tuple[int, int]:
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(col)


@dataclass
class Explanations:
    """Writes one overlay PNG per image into `folder`, then the contact sheet and a JSON
    index with each image's heat-map peak (and the lesion hit rate where lesions are known)."""

    folder: Path
    positive: str
    lesions: dict[str, np.ndarray] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    tiles: list[tuple[np.ndarray, str]] = field(default_factory=list)

    def add(self, path: str, gray: np.ndarray, heat: np.ndarray, probability: float,
            truth: str | None = None) -> None:
        picture = overlay(gray, heat)
        name = f"{len(self.records):05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(path).stem)}.png"
        self.folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(self.folder / name)
        row, col = peak_of(heat)
        record = {"path": path, "png": name, "probability": probability,
                  "peak": [row / heat.shape[0], col / heat.shape[1]]}
        if truth is not None:
            record["truth"] = truth
        mask = self.lesions.get(path)
        if mask is not None:
            mask_row = min(int(row * mask.shape[0] / heat.shape[0]), mask.shape[0] - 1)
            mask_col = min(int(col * mask.shape[1] / heat.shape[1]), mask.shape[1] - 1)
            record["peak_in_lesion"] = bool(mask[mask_row, mask_col])
        self.records.append(record)
        if len(self.tiles) < SHEET_MAX:
            label = f"p={probability:.2f}" + (f" ({truth})" if truth else "")
            self.tiles.append((picture, f"{Path(path).name}\n{label}"))

    def localisation(self) -> dict | None:
        """How often the peak falls inside a known lesion, over the positives that have one."""
        hits = [r["peak_in_lesion"] for r in self.records if "peak_in_lesion" in r]
        if not hits:
            return None
        low, high = wilson_interval(sum(hits), len(hits))
        return {"images": len(hits), "peak_in_lesion": sum(hits) / len(hits),
                "ci95": [low, high],
                "chance": float(np.mean([m.mean() for m in self.lesions.values()]))}

    def finish(self, *, layer: str, title: str) -> dict:
        sheet = self.folder / "contact_sheet.png"
        if self.tiles:
            contact_sheet(self.tiles, sheet, title)
        summary = {"layer": layer, "class": self.positive, "images": len(self.records),
                   "contact_sheet": sheet.name if self.tiles else None,
                   "localisation": self.localisation(), "per_image": self.records}
        atomic_write(self.folder / "explanations.json",
                     lambda p: p.write_text(json.dumps(summary, indent=2)))
        return {k: v for k, v in summary.items() if k != "per_image"} | {"folder": str(self.folder)}


def contact_sheet(tiles: list[tuple[np.ndarray, str]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(8, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 2.0 * rows + 0.4),
                                squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (picture, caption) in zip(axes.flat, tiles, strict=False):
        ax.imshow(picture)
        ax.set_title(caption, fontsize=6)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@dataclass
class BatchExplainer:
    """Grad-CAM for batches of preprocessed images, written out as they come."""

    model: torch.nn.Module
    layer_name: str
    layer: torch.nn.Module
    target: int
    sheet: Explanations  # writes into a hidden staging folder beside `destination`
    destination: Path

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, folder: Path, layer_name: str | None,
                  positive: str, target: int, image_size: int,
                  lesions: dict[str, np.ndarray] | None = None) -> BatchExplainer:
        name, layer = cam_layer(model, layer_name, image_size=image_size)
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(folder)
        return cls(model, name, layer, target, Explanations(staging, positive, lesions or {}),
                   folder)

    def explain(self, dataset, grays: list[np.ndarray], names: list[str],
                probabilities: np.ndarray, device: torch.device,
                truths: list[str] | None = None) -> None:
        """`dataset[i]` is the preprocessed `grays[i]`, named `names[i]`."""
        for start in range(0, len(names), 16):
            chunk = range(start, min(start + 16, len(names)))
            inputs = torch.stack([dataset[i][0] for i in chunk]).to(device)
            for i, heat in zip(chunk, grad_cam(self.model, self.layer, inputs, self.target),
                               strict=True):
                self.sheet.add(names[i], np.asarray(grays[i]), heat, float(probabilities[i]),
                               truths[i] if truths else None)

    def finish(self, title: str) -> dict:
        """Index and contact sheet, then the whole folder put in place at once (replacing an
        earlier one): a run that fails half-way leaves no partial set of heat maps."""
        summary = self.sheet.finish(layer=self.layer_name, title=title)
        if self.destination.exists():
            shutil.rmtree(self.destination)
        os.replace(self.sheet.folder, self.destination)
        return {**summary, "folder": str(self.destination)}

    def discard(self) -> None:
        """Remove the staging folder of a run that did not finish (nothing once finished)."""
        shutil.rmtree(self.sheet.folder, ignore_errors=True)
