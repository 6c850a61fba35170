"""Synthetic chest CT volumes in Hounsfield units (NIfTI), so tests and the demo cover the 3-D
path without downloads.

Each volume runs from the upper abdomen (liver, a little bowel gas) through the chest (two
lungs that grow and shrink along the body's axis, heart, vessels) to the lower neck; air
outside the body is -1000 HU, aerated lung about -850, soft tissue about 40, bone 700.
A positive patient's lesions lie over a run of consecutive chest slices: ground glass
(lung raised to about -450 HU) for COVID, small dense consolidations (about 0 HU) for CAP.
Labels are per volume (per patient), as hospitals hold them; `dataset.csv` lists the
volumes with their patient and site.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedct.data.series import write_series
from fedct.data.synthetic import NEGATIVE, POSITIVE, THREE_CLASSES
from fedct.data.volumes import write_volume
from fedct.errors import FedctError

SPACING = (0.7, 0.7, 5.0)  # mm: in-plane, then between slices
LESION_RUN = 5  # slices a lesion spans


def _ellipse(xx, yy, cx, cy, ax, ay):
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def _blobs(xx, yy, rng, count, sigma, inside):
    out = np.zeros_like(xx)
    ys, xs = np.nonzero(inside)
    for _ in range(count if len(ys) else 0):
        j = rng.integers(len(ys))
        out += np.exp(-((xx - xx[ys[j], xs[j]]) ** 2 + (yy - yy[ys[j], xs[j]]) ** 2)
                      / (2 * rng.uniform(*sigma) ** 2))
    return out


def synth_volume(rng: np.random.Generator, *, size: int, depth: int, lesion: str | None,
                 noise: float, offset: float) -> np.ndarray:
    """A [depth, size, size] HU volume, inferior to superior; `lesion` is None, "ggo"
    (ground glass) or "consolidation"."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    scale = rng.uniform(0.9, 1.05)
    chest = np.clip(np.sin(np.pi * (np.linspace(0, 1, depth) - 0.15) / 0.7), 0, None)
    chest[np.linspace(0, 1, depth) > 0.85] = 0
    lung_slices = np.flatnonzero(chest > 0.35)
    start = int(rng.integers(lung_slices[0], max(lung_slices[0] + 1,
                                                 lung_slices[-1] - LESION_RUN + 2)))
    lesion_slices = set(range(start, start + LESION_RUN)) if lesion else set()
    volume = np.full((depth, size, size), -1000.0)
    for z in range(depth):
        image = volume[z]
        body = _ellipse(xx, yy, 0, 0.05, 0.88 * scale, 0.66 * scale)
        image[body] = -100.0  # fat
        image[_ellipse(xx, yy, 0, 0.05, 0.82 * scale, 0.60 * scale)] = 40.0
        extent = chest[z]
        if extent > 0.15:
            lungs = np.zeros_like(body)
            for side in (-1, 1):
                lungs |= _ellipse(xx, yy, side * 0.36 * scale, 0.0, 0.27 * scale * extent,
                                  0.44 * scale * extent)
            image[lungs] = -850.0
            vessels = _blobs(xx, yy, rng, int(rng.integers(10, 20)), (0.01, 0.02), lungs)
            image += np.where(lungs, 700.0 * np.clip(vessels, 0, 1), 0)
            if 0.25 < z / depth < 0.7:
                image[_ellipse(xx, yy, 0.07 * scale, 0.12, 0.17 * scale, 0.2 * scale)] = 40.0
            if z in lesion_slices:
                if lesion == "ggo":
                    patch = _blobs(xx, yy, rng, int(rng.integers(1, 4)), (0.05, 0.12), lungs)
                    image += np.where(lungs, 400.0 * np.clip(patch, 0, 1), 0)
                else:
                    patch = _blobs(xx, yy, rng, int(rng.integers(1, 3)), (0.03, 0.05), lungs)
                    image += np.where(lungs, 850.0 * np.clip(patch, 0, 1), 0)
        elif z / depth < 0.3:  # upper abdomen: liver, a little bowel gas
            image[_ellipse(xx, yy, -0.25 * scale, 0.0, 0.4 * scale, 0.35 * scale)] = 60.0
            gas = _blobs(xx, yy, rng, 3, (0.02, 0.04), body) > 0.5
            image[gas] = -1000.0
        image[_ellipse(xx, yy, 0, 0.52 * scale, 0.09 * scale, 0.08 * scale)] = 700.0  # spine
    volume += offset + rng.normal(0, noise, volume.shape)
    return volume


def write_synthetic_volumes(out: str | Path, *, n: int = 24, seed: int = 0, size: int = 64,
                            depth: int = 24, sites: int = 3, classes: int = 2,
                            dicom: bool = False, force: bool = False) -> Path:
    """Write `n` volumes (one per patient) under OUT/volumes/, as NIfTI files or (`dicom`)
    as DICOM series, one folder each, and OUT/dataset.csv (path, label, group, site)."""
    out = Path(out)
    if n < 2 or size < 32 or depth < 8 or sites < 1 or classes not in (2, 3):
        raise FedctError("synth --volumes: need --n >= 2, --size >= 32, --depth >= 8, "
                         "--sites >= 1 and --classes 2 or 3")
    if out.exists() and any(out.iterdir()) and not force:
        raise FedctError(f"{out}: exists and is not empty (use --force to replace it)")
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    site_params = [(rng.uniform(10, 30), rng.uniform(-20, 20)) for _ in range(sites)]
    names = (POSITIVE, NEGATIVE) if classes == 2 else THREE_CLASSES
    rows = []
    for patient in range(n):
        label = names[patient % classes]
        lesion = {"CT_COVID": "ggo", "CT_CAP": "consolidation"}.get(label)
        site = int(rng.integers(sites))
        noise, offset = site_params[site]
        volume = synth_volume(rng, size=size, depth=depth, lesion=lesion, noise=noise,
                              offset=offset)
        rel = f"volumes/p{patient:04d}" + ("" if dicom else ".nii.gz")
        if dicom:
            write_series(out / rel, volume, SPACING)
        else:
            write_volume(out / rel, volume, SPACING)
        rows.append((rel, label, f"p{patient:04d}", f"site{site}"))
    with (out / "dataset.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group", "site"])
        writer.writerows(rows)
    return out
