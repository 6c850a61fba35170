"""Synthetic axial chest-CT slices, so the demo and the tests need no real data.

Each patient has a body outline, two lungs, a heart and a spine; vessels are bright dots in
the lungs. Positive patients carry ground-glass-like patches; some negatives carry faint
look-alike blobs, and sites differ in contrast and noise, so the task is learnable but not
trivially separable. `difficulty` (0 easy .. 1 hard) scales both effects. Where each patch
lies is kept (`lesions.npz`), so explanations can be checked against the truth. With three
classes, a third (CT_CAP, community-acquired pneumonia) carries one or two small dense
consolidations instead, and the negatives are called CT_Normal.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from fedct.errors import FedctError

POSITIVE, NEGATIVE = "CT_COVID", "CT_NonCOVID"
THREE_CLASSES = ("CT_CAP", "CT_COVID", "CT_Normal")  # consolidation, ground glass, none
SLICES_PER_PATIENT = 4
LESIONS = "lesions.npz"
LESION_LEVEL = 0.25  # a pixel is lesion where the patches reach this share of their strength


def _ellipse(xx, yy, cx, cy, ax, ay, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / ax
    v = (-(xx - cx) * s + (yy - cy) * c) / ay
    return u * u + v * v <= 1.0


def _blobs(xx, yy, rng, count, sigma_range, amplitude, centers_mask):
    """Sum of Gaussian blobs whose centres lie inside `centers_mask`."""
    out = np.zeros_like(xx)
    ys, xs = np.nonzero(centers_mask)
    if len(ys) == 0:
        return out
    for _ in range(count):
        j = rng.integers(len(ys))
        cx, cy = xx[ys[j], xs[j]], yy[ys[j], xs[j]]
        sigma = rng.uniform(*sigma_range)
        out += amplitude * rng.uniform(0.6, 1.0) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return out


def synth_slice(rng: np.random.Generator, *, size: int, positive: bool, difficulty: float,
                anatomy: dict, site: dict,
                consolidation: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The slice's uint8 pixels and, for a positive, the boolean mask of its patches
    (ground glass, or small dense consolidations with `consolidation`)."""
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    scale = anatomy["scale"] * rng.uniform(0.95, 1.05)
    image = np.zeros((size, size))
    body = _ellipse(xx, yy, 0, 0.05, 0.88 * scale, 0.66 * scale)
    image[body] = 0.55
    image[body & ~_ellipse(xx, yy, 0, 0.05, 0.82 * scale, 0.60 * scale)] = 0.45  # fat rim
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= _ellipse(xx, yy, side * 0.36 * scale, 0.0, 0.27 * scale * anatomy["lung"],
                          0.44 * scale * anatomy["lung"], side * 0.15)
    image[lungs] = 0.08
    image[_ellipse(xx, yy, 0.07 * scale, 0.12, 0.17 * scale, 0.2 * scale)] = 0.62  # heart
    image[_ellipse(xx, yy, 0, 0.52 * scale, 0.09 * scale, 0.08 * scale)] = 0.95  # spine
    image += _blobs(xx, yy, rng, int(rng.integers(15, 30)), (0.008, 0.02), 0.35, lungs) * lungs
    strength = 0.4 * (1.0 - difficulty) + 0.08
    mask = None
    if positive and consolidation:
        patches = _blobs(xx, yy, rng, int(rng.integers(1, 3)), (0.025, 0.05), 2.2 * strength,
                         lungs)
        image += patches * lungs
        mask = (patches * lungs) > LESION_LEVEL * 2.2 * strength
    elif positive:
        patches = _blobs(xx, yy, rng, int(rng.integers(1, 5)), (0.05, 0.13), strength, lungs)
        image += patches * lungs
        mask = (patches * lungs) > LESION_LEVEL * strength
    elif rng.random() < 0.6 * difficulty:
        image += _blobs(xx, yy, rng, 1, (0.04, 0.09), 0.6 * strength, lungs) * lungs
    image = image * site["gain"] + site["offset"]
    image += rng.normal(0, site["noise"], image.shape)
    pixels = Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8), mode="L")
    return np.asarray(pixels.filter(ImageFilter.GaussianBlur(radius=size / 256))), mask


def write_synthetic(out: str | Path, *, n: int = 400, seed: int = 0, size: int = 128,
                    difficulty: float = 0.5, sites: int = 4, classes: int = 2,
                    force: bool = False) -> Path:
    """Write an ImageFolder (CT_COVID/, CT_NonCOVID/; or CT_CAP/, CT_COVID/, CT_Normal/ for
    three classes), `dataset.csv` with group and site, and `lesions.npz`: each lesion
    image's mask under its path."""
    out = Path(out)
    if n < 2 or size < 32 or not 0 <= difficulty <= 1 or sites < 1:
        raise FedctError("synth: need --n >= 2, --size >= 32, 0 <= --difficulty <= 1, --sites >= 1")
    if classes not in (2, 3):
        raise FedctError(f"synth --classes {classes}: 2 (COVID, non-COVID) or 3 (CAP, COVID, "
                         "normal)")
    names = (POSITIVE, NEGATIVE) if classes == 2 else THREE_CLASSES
    if out.exists() and any(out.iterdir()) and not force:
        raise FedctError(f"{out}: exists and is not empty (use --force to replace it)")
    rng = np.random.default_rng(seed)
    site_params = [{"gain": rng.uniform(0.85, 1.15), "offset": rng.uniform(-0.05, 0.05),
                    "noise": rng.uniform(0.02, 0.05)} for _ in range(sites)]
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
    rows = []
    lesions = {}
    patients = (n + SLICES_PER_PATIENT - 1) // SLICES_PER_PATIENT
    written = 0
    for patient in range(patients):
        label = (POSITIVE, NEGATIVE, "CT_CAP")[patient % classes]
        label = "CT_Normal" if classes == 3 and label == NEGATIVE else label
        positive = label != NEGATIVE and label != "CT_Normal"
        site = int(rng.integers(sites))
        anatomy = {"scale": rng.uniform(0.85, 1.05), "lung": rng.uniform(0.9, 1.1)}
        for s in range(min(SLICES_PER_PATIENT, n - written)):
            pixels, mask = synth_slice(rng, size=size, positive=positive, difficulty=difficulty,
                                       anatomy=anatomy, site=site_params[site],
                                       consolidation=label == "CT_CAP")
            rel = f"{label}/p{patient:04d}_s{s}.png"
            Image.fromarray(pixels, mode="L").save(out / rel)
            if mask is not None:
                lesions[rel] = mask
            rows.append((rel, label, f"p{patient:04d}", f"site{site}"))
            written += 1
    with (out / "dataset.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group", "site"])
        writer.writerows(rows)
    np.savez_compressed(out / LESIONS, **lesions)
    return out


def read_lesions(root: str | Path) -> dict[str, np.ndarray]:
    """The lesion masks `write_synthetic` drew, by image path; empty for any other dataset."""
    path = Path(root) / LESIONS
    if not path.is_file():
        return {}
    with np.load(path) as masks:
        return {name: masks[name] for name in masks.files}
