"""CT volumes (NIfTI, `.nii` / `.nii.gz`, or a folder holding one DICOM series) as axial
slices, by a stated rule, windowed in Hounsfield units.

A volume is read with nibabel (the `volumes` extra), turned to the closest canonical (RAS+)
orientation and cut along its superior axis; each slice is shown as a radiologist sees it
(anterior up, the patient's right on the image's left). Which slices become rows is the
`--slices` rule: `all`, `every:K`, `middle:N` (the N central slices), or `lung[:F]` (the
slices whose share of aerated-lung pixels, -950 to -500 HU inside the body, is at least F
of the slice, 0.05 unless given), so the neck and abdomen do not train as "COVID". Pixel values become
8-bit through a window (`--window lung`, `mediastinum` or `LEVEL,WIDTH`). Every slice of a
volume keeps the volume as its patient group unless the data name one. Volumes are read
one at a time, so one volume is in memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedct.data.series import is_series, read_series
from fedct.errors import FedctError

SUFFIXES = (".nii", ".nii.gz")
WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0)}
AERATED_LUNG = (-950.0, -500.0)  # Hounsfield units: aerated lung, not air outside the body
LUNG_SHARE = 0.05


def is_volume(path: str | Path) -> bool:
    """A NIfTI file, or a folder holding a DICOM series (give the path as found on disk)."""
    return str(path).lower().endswith(SUFFIXES) or is_series(Path(path))


@dataclass(frozen=True)
class VolumeOptions:
    """How volumes become slices: the slice rule and the window (level, width) in HU; and
    `rescale` ("SLOPE,INTERCEPT"), which takes 16-bit PNG/TIFF slices to HU so that they
    are windowed too (without it they are stretched between their own extremes)."""

    slices: str = "lung"
    window: str = "lung"
    rescale: str = ""

    def __post_init__(self):
        parse_slices(self.slices)
        parse_window(self.window)
        parse_rescale(self.rescale)

    @property
    def level_width(self) -> tuple[float, float]:
        return parse_window(self.window)

    @property
    def slope_intercept(self) -> tuple[float, float] | None:
        return parse_rescale(self.rescale)

    def record(self) -> dict:
        level, width = self.level_width
        return {"slices": self.slices, "window": self.window, "level": level, "width": width,
                **({"rescale": self.rescale} if self.rescale else {})}


def parse_rescale(text: str) -> tuple[float, float] | None:
    """(slope, intercept) from SLOPE,INTERCEPT, or None for no rescale."""
    if not text:
        return None
    try:
        slope, intercept = (float(v) for v in str(text).split(","))
    except ValueError:
        raise FedctError(f"--hu-rescale {text}: give SLOPE,INTERCEPT (e.g. 1,-1024)") from None
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
        raise FedctError(f"--hu-rescale {text}: a finite slope other than 0 and a finite "
                         "intercept")
    return slope, intercept


def parse_slices(text: str) -> tuple[str, float]:
    """('all', 0), ('every', K), ('middle', N) or ('lung', F) from a --slices value."""
    kind, _, value = str(text).strip().lower().partition(":")
    if kind == "all" and not value:
        return "all", 0
    if kind == "lung":
        try:
            share = float(value) if value else LUNG_SHARE
        except ValueError:
            share = -1.0
        if not 0 < share < 1:
            raise FedctError(f"--slices {text}: lung:F takes a share F in (0, 1)")
        return "lung", share
    if kind in ("every", "middle") and value.isdigit() and int(value) >= 1:
        return kind, int(value)
    raise FedctError(f"--slices {text}: choose all, every:K, middle:N or lung[:F]")


def parse_window(text: str) -> tuple[float, float]:
    """(level, width) in HU from lung, mediastinum or LEVEL,WIDTH."""
    name = str(text).strip().lower()
    if name in WINDOWS:
        return WINDOWS[name]
    try:
        level, width = (float(v) for v in name.split(","))
    except ValueError:
        raise FedctError(f"--window {text}: choose lung, mediastinum or LEVEL,WIDTH in "
                         "Hounsfield units (e.g. -600,1500)") from None
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise FedctError(f"--window {text}: the width must be a number > 0")
    return level, width


def read_volume(path: Path) -> np.ndarray:
    """The volume (a NIfTI file, or a DICOM series' folder: `fedct.data.series`) in HU as
    [slices, rows, columns], inferior to superior, each slice
    anterior up and the patient's right on the left; a one-line error naming the file for
    anything that is not one 3-D volume. Integer voxels with an integer rescale stay
    integers and the array is a view of the one read (a 512 x 512 x 300 int16 volume is
    150 MiB in memory, not 600 as float64); other voxels become float32."""
    if Path(path).is_dir():
        return read_series(Path(path))
    try:
        import nibabel as nib
    except ImportError:
        raise FedctError(f"{path}: reading NIfTI needs the volumes extra: pip install "
                         "'fedct[volumes]'") from None
    try:
        image = nib.load(str(path))
        shape = image.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise FedctError(f"{path}: a {len(shape)}-D NIfTI of shape {tuple(image.shape)}; "
                             "expected one 3-D CT volume" + (" (split the series into "
                                                             "volumes)" if len(shape) == 4 else ""))
        proxy = image.dataobj
        raw = np.asanyarray(proxy.get_unscaled()).reshape(shape)
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
        ornt = nib.orientations.io_orientation(image.affine)
    except FedctError:
        raise
    except Exception as exc:  # nibabel raises many types for damaged files
        raise FedctError(f"{path}: cannot read NIfTI ({exc.__class__.__name__}: {exc})") from None
    if raw.dtype.kind in "iu" and slope == 1.0 and inter == int(inter):
        data = raw if inter == 0 else raw.astype(np.int32) + int(inter)
    else:
        data = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
        if not np.isfinite(data).all():
            raise FedctError(f"{path}: NIfTI volume with non-finite values")
    if min(data.shape) < 1:
        raise FedctError(f"{path}: NIfTI volume of shape {data.shape} holds no voxel")
    canonical = nib.orientations.apply_orientation(data, ornt)  # RAS+: a view
    return np.transpose(canonical[::-1, ::-1, :], (2, 1, 0))


def window(hounsfield: np.ndarray, level_width: tuple[float, float]) -> np.ndarray:
    """HU to uint8 through a window: level - width/2 is black, level + width/2 white."""
    level, width = level_width
    low = level - width / 2
    return (np.clip((hounsfield - low) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def choose_slices(volume: np.ndarray, rule: str, path: Path) -> list[int]:
    """The slice indices `rule` keeps of a [slices, rows, columns] HU volume."""
    kind, value = parse_slices(rule)
    count = volume.shape[0]
    if kind == "all":
        return list(range(count))
    if kind == "every":
        return list(range(0, count, int(value)))
    if kind == "middle":
        start = max(0, (count - int(value)) // 2)
        return list(range(start, min(count, start + int(value))))
    shares = np.array([lung_share(hu) for hu in volume])
    low, high = AERATED_LUNG
    kept = [int(i) for i in np.flatnonzero(shares >= value)]
    if not kept:
        raise FedctError(f"{path}: no lung slice under --slices {rule} (the largest share of "
                         f"aerated lung, {low:g} to {high:g} HU, is {shares.max():.3f}); is it "
                         "a chest CT in HU? (--slices all keeps every slice)")
    return kept


def slices_or_skip(path: Path, options: VolumeOptions, *, skip_bad: bool,
                   skipped: list[str]) -> list[int]:
    """The slices `options` keep of the volume at `path`; a bad volume stops the command,
    or with `skip_bad` is listed in `skipped` and gives none."""
    try:
        return volume_slices(path, options)
    except FedctError as exc:
        if not skip_bad:
            raise FedctError(f"{exc} (--skip-bad skips bad inputs and lists them)") from None
        skipped.append(str(exc))
        return []


def lung_share(hounsfield: np.ndarray) -> float:
    """The share of a slice that is aerated lung: pixels from -950 to -500 HU inside the
    body (the holes that soft tissue above -500 HU encloses), so noisy air around the
    patient does not count."""
    from scipy.ndimage import binary_fill_holes

    low, high = AERATED_LUNG
    inside = binary_fill_holes(hounsfield > high)
    return float(np.mean(inside & (hounsfield >= low) & (hounsfield <= high)))


def volume_slices(path: Path, options: VolumeOptions) -> list[int]:
    """Which slices of the volume at `path` become rows (the volume read whole: the lung
    rule needs its voxels, and reading it checks it as `fedct split` checks every image)."""
    return choose_slices(read_volume(path), options.slices, path)


def decode_slices(path: Path, indices: list[int], level_width: tuple[float, float]) -> list[np.ndarray]:
    """The slices `indices` of one volume as uint8 images (the volume read once)."""
    volume = read_volume(path)
    bad = [i for i in indices if not 0 <= i < volume.shape[0]]
    if bad:
        raise FedctError(f"{path}: slice {bad[0]} is outside the volume's {volume.shape[0]} "
                         "slices")
    return [window(volume[i], level_width) for i in indices]


def write_volume(path: Path, hounsfield: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Write a [slices, rows, columns] HU volume as NIfTI (int16, RAS+ affine): the inverse
    of `read_volume`, for synthetic data and tests."""
    import nibabel as nib

    data = np.transpose(hounsfield, (2, 1, 0))[::-1, ::-1, :]
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(np.round(data).astype(np.int16), affine), str(path))
