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
SHEET_PER_GROUP = 12  # contact-sheet tiles per (label, decision); every image has its own PNG
TILE = 128  # pixels a side of a contact-sheet tile


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
    """Heat maps [B, H, W] for class `target`, upsampled to the input size: Grad-CAM's own
    magnitudes (>= 0), so that maps of several images can share one scale."""
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
    return heat.clamp(min=0).cpu().numpy()


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
    """Writes one overlay PNG per image into `folder` (its map scaled to its own peak), then
    the contact sheet (balanced across labels and decisions, one shared scale) and a JSON
    index with each image's heat-map peak (and the lesion hit rate where lesions are known)."""

    folder: Path
    positive: str
    negative: str = "negative"
    threshold: float = 0.5
    lesions: dict[str, np.ndarray] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    groups: dict[tuple, list] = field(default_factory=dict)  # (truth, decision) -> tiles

    def add(self, path: str, gray: np.ndarray, heat: np.ndarray, probability: float,
            truth: str | None = None) -> None:
        peak = float(heat.max())
        picture = overlay(gray, heat / peak if peak > 0 else heat)
        name = f"{len(self.records):05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(path).stem)}.png"
        self.folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(self.folder / name)
        row, col = peak_of(heat)
        decision = self.positive if probability >= self.threshold else self.negative
        record = {"path": path, "png": name, "probability": probability, "decision": decision,
                  "peak": [row / heat.shape[0], col / heat.shape[1]]}
        if truth is not None:
            record["truth"] = truth
        mask = self.lesions.get(path)
        if mask is not None:
            mask_row = min(int(row * mask.shape[0] / heat.shape[0]), mask.shape[0] - 1)
            mask_col = min(int(col * mask.shape[1] / heat.shape[1]), mask.shape[1] - 1)
            record["peak_in_lesion"] = bool(mask[mask_row, mask_col])
        self.records.append(record)
        tiles = self.groups.setdefault((truth, decision), [])
        if len(tiles) < SHEET_PER_GROUP:
            tiles.append((shrunk(gray), shrunk(heat), Path(path).name, probability))

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
        if self.groups:
            contact_sheet(self.ordered_groups(), sheet, title, positive=self.positive,
                          threshold=self.threshold)
        summary = {"layer": layer, "class": self.positive, "images": len(self.records),
                   "threshold": self.threshold,
                   "contact_sheet": sheet.name if self.groups else None,
                   "localisation": self.localisation(), "per_image": self.records}
        atomic_write(self.folder / "explanations.json",
                     lambda p: p.write_text(json.dumps(summary, indent=2)))
        return {k: v for k, v in summary.items() if k != "per_image"} | {"folder": str(self.folder)}


    def ordered_groups(self) -> list[tuple[str, list]]:
        """(heading, tiles) per (label, decision): true positives, missed positives, false
        alarms, true negatives; by decision alone when labels are unknown."""
        order = [(self.positive, self.positive), (self.positive, self.negative),
                 (self.negative, self.positive), (self.negative, self.negative),
                 (None, self.positive), (None, self.negative)]
        keys = [k for k in order if k in self.groups] + [
            k for k in self.groups if k not in order]
        return [(f"{truth} called {decision}" if truth else f"called {decision}",
                 self.groups[(truth, decision)]) for truth, decision in keys]


def shrunk(array: np.ndarray) -> np.ndarray:
    """A float copy at most TILE pixels a side, for the contact sheet."""
    image = Image.fromarray(np.asarray(array, dtype=np.float32), mode="F")
    image.thumbnail((TILE, TILE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def contact_sheet(groups: list[tuple[str, list]], path: Path, title: str, *, positive: str,
                  threshold: float) -> None:
    """A block of tiles per (label, decision), captioned with label, decision and
    probability; every map on one scale (1 = the strongest map on the sheet), with its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    top = max(float(heat.max()) for _, tiles in groups for _, heat, _, _ in tiles) or 1.0
    columns = max(4, min(SHEET_PER_GROUP // 2, max(len(tiles) for _, tiles in groups)))
    rows = sum(math.ceil(len(tiles) / columns) for _, tiles in groups)
    figure, axes = plt.subplots(rows, columns, figsize=(1.7 * columns + 1.0, 1.9 * rows + 0.8),
                                squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    row = 0
    for heading, tiles in groups:
        for k, (gray, heat, name, probability) in enumerate(tiles):
            ax = axes[row + k // columns, k % columns]
            ax.imshow(overlay(np.clip(gray, 0, 255).astype(np.uint8), heat / top))
            truth, _, decision = heading.rpartition(" called ")
            ax.set_title(f"{name[:18]}\n{truth or 'label ?'}, called {decision}\n"
                         f"p({positive}) = {probability:.2f}", fontsize=5.5)
        axes[row, 0].text(-0.1, 0.5, heading, transform=axes[row, 0].transAxes, rotation=90,
                          ha="right", va="center", fontsize=7)
        row += math.ceil(len(tiles) / columns)
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes, shrink=0.6,
                          fraction=0.03, pad=0.02)
    bar.set_label(f"Grad-CAM for {positive}, one scale for the sheet", fontsize=7)
    figure.suptitle(f"{title}; called {positive} at p >= {threshold:.2f}", fontsize=9)
    atomic_write(path, lambda p: figure.savefig(p, dpi=110, format="png"))
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
                  positive: str, negative: str, threshold: float, target: int,
                  image_size: int,
                  lesions: dict[str, np.ndarray] | None = None) -> BatchExplainer:
        name, layer = cam_layer(model, layer_name, image_size=image_size)
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(folder)
        return cls(model, name, layer, target,
                   Explanations(staging, positive, negative, threshold, lesions or {}), folder)

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
