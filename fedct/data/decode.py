"""Decode any CT image file into one grayscale form.

Images are decoded by content, never by extension: the COVID-CT folder has JPEG data under
`.png` names and PNGs in RGBA, RGB and L modes. Every image ends as a 2-D uint8 array;
DICOM (and 16-bit slices given a rescale) are windowed in Hounsfield units.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from fedct.data.volumes import WINDOWS
from fedct.data.volumes import window as window_hu
from fedct.errors import FedctError

LUNG_WINDOW = WINDOWS["lung"]  # (level, width) in Hounsfield units


def decode_image(path: str | Path, *, window: tuple[float, float] = LUNG_WINDOW,
                 rescale: tuple[float, float] | None = None) -> np.ndarray:
    """Decode PNG/JPEG of any mode, or DICOM, into a 2-D uint8 array; DICOM and (with
    `rescale`, slope and intercept to HU) 16-bit images through `window`."""
    path = Path(path)
    if not path.is_file():
        raise FedctError(f"{path}: image file not found")
    if is_dicom(path):
        return _decode_dicom(path, window)
    try:
        with Image.open(path) as image:
            image.load()
            return _to_gray_uint8(image, window, rescale)
    except DecompressionBombError:
        raise FedctError(f"{path}: image too large to be a CT slice (over "
                         f"{Image.MAX_IMAGE_PIXELS * 2:,} pixels); refused unread") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FedctError(f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})") from None


def _to_gray_uint8(image: Image.Image, window: tuple[float, float],
                   rescale: tuple[float, float] | None) -> np.ndarray:
    mode = image.mode
    if mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        values = np.asarray(image, dtype=np.float32)
        if rescale is None:
            return _stretch(values)
        return window_hu(values * rescale[0] + rescale[1], window)
    if mode in {"RGBA", "LA", "PA", "P"} or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        rgb = rgba[..., :3] * alpha  # transparent pixels become black, like CT air
        gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(gray + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return ((values - low) * (255.0 / (high - low)) + 0.5).astype(np.uint8)


def is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _decode_dicom(path: Path, window: tuple[float, float]) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise FedctError(f"{path}: reading DICOM needs the dicom extra: pip install 'fedct[dicom]'") from None
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise FedctError(f"{path}: cannot decode DICOM ({exc.__class__.__name__}: {exc})") from None
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples > 1:
        return _dicom_colour(path, pixels, samples)
    if pixels.ndim == 3:
        pixels = pixels[pixels.shape[0] // 2]
    if pixels.ndim != 2:
        raise FedctError(f"{path}: DICOM pixel data of shape {pixels.shape}, not a slice")
    hounsfield = pixels * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0)
    )
    return window_hu(hounsfield, window)


def _dicom_colour(path: Path, pixels: np.ndarray, samples: int) -> np.ndarray:
    """A colour DICOM (a secondary capture: display values, not Hounsfield units) becomes
    luminance like a colour PNG; a multi-frame one gives its middle frame."""
    if pixels.ndim == 4:
        pixels = pixels[pixels.shape[0] // 2]
    if pixels.ndim != 3 or pixels.shape[-1] != samples or samples < 3:
        raise FedctError(f"{path}: DICOM colour pixel data of shape {pixels.shape} "
                         f"({samples} samples per pixel), not an RGB slice")
    gray = pixels[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(gray + 0.5, 0, 255).astype(np.uint8) if pixels.max() <= 255 else _stretch(gray)
