"""A DICOM series (a folder of single-slice CT files) read as one volume, as `volumes` reads
a NIfTI file: Hounsfield units, [slices, rows, columns], inferior to superior.

The slices are ordered by their position along the slice normal (ImagePositionPatient
projected on the cross product of ImageOrientationPatient's axes), not by file name or
InstanceNumber. An axial series in DICOM's patient frame (LPS) already has rows running
anterior to posterior and columns from the patient's right to left, the radiological view
fedct uses for NIfTI too. Refused in one line naming the folder: no DICOM file, files of
more than one series, a slice without a position or orientation, two slices at one
position, spacing that varies between slices, slices of different sizes, a series that is
not axial, a multi-frame or colour file. Needs pydicom (the `dicom` extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedct.errors import FedctError

SPACING_TOLERANCE = 0.01  # relative: a slice gap may differ from the median by 1%


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in `folder` (by content: the DICM marker)."""
    from fedct.data.decode import is_dicom

    return sorted(p for p in folder.iterdir() if p.is_file() and is_dicom(p))


def is_series(path: Path) -> bool:
    return path.is_dir() and bool(dicom_files(path))


def read_series(folder: Path) -> np.ndarray:
    """The series in `folder` as a [slices, rows, columns] HU array (float32)."""
    try:
        import pydicom
    except ImportError:
        raise FedctError(f"{folder}: reading a DICOM series needs the dicom extra: pip install "
                         "'fedct[dicom]'") from None
    files = dicom_files(folder)
    if not files:
        raise FedctError(f"{folder}: no DICOM file in this folder (a series is one folder of "
                         "slices)")
    slices = []
    for path in files:
        try:
            slices.append((path, pydicom.dcmread(path)))
        except Exception as exc:  # pydicom raises many types for damaged files
            raise FedctError(f"{path}: cannot read DICOM ({exc.__class__.__name__})") from None
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices})
    if len(series) > 1:
        raise FedctError(f"{folder}: files of {len(series)} series ({', '.join(series[:3])}); "
                         "put each series in a folder of its own")
    positions = [_position(path, ds) for path, ds in slices]
    order = np.argsort(positions, kind="stable")
    ordered = [positions[k] for k in order]
    for a, b in zip(order[:-1], order[1:], strict=True):
        if abs(positions[b] - positions[a]) < 1e-3:
            raise FedctError(f"{folder}: {files[a].name} and {files[b].name} lie at one position "
                             f"({positions[a]:.2f} mm); is a slice duplicated?")
    gaps = np.diff(ordered)
    if len(gaps) and np.ptp(gaps) > SPACING_TOLERANCE * np.median(gaps):
        raise FedctError(f"{folder}: slice spacing varies from {gaps.min():.2f} to "
                         f"{gaps.max():.2f} mm; a slice is missing or the series mixes "
                         "reconstructions")
    volume = [_hounsfield(slices[k][0], slices[k][1]) for k in order]
    shapes = {v.shape for v in volume}
    if len(shapes) > 1:
        raise FedctError(f"{folder}: slices of different sizes ({sorted(shapes)})")
    return np.stack(volume)


def _position(path: Path, ds) -> float:
    """The slice's position along the slice normal, in mm; only axial series are taken."""
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
        raise FedctError(f"{path}: no ImagePositionPatient or ImageOrientationPatient, so its "
                         "place in the series is unknown")
    rows, columns = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(rows, columns)
    if abs(normal[2]) < 0.9:
        raise FedctError(f"{path}: not an axial slice (ImageOrientationPatient "
                         f"{list(map(float, orientation))}); fedct reads axial series")
    return float(np.dot(np.asarray(position, float), normal) * np.sign(normal[2]))


def _hounsfield(path: Path, ds) -> np.ndarray:
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise FedctError(f"{path}: cannot decode DICOM pixels ({exc.__class__.__name__})") from None
    if pixels.ndim != 2:
        raise FedctError(f"{path}: pixel data of shape {pixels.shape}; a series holds one "
                         "grey slice per file")
    return pixels * np.float32(float(ds.get("RescaleSlope", 1))) + np.float32(
        float(ds.get("RescaleIntercept", 0)))


def write_series(folder: Path, hounsfield: np.ndarray, spacing: tuple[float, float, float],
                 *, series: str | None = None) -> None:
    """Write a [slices, rows, columns] HU volume as an axial DICOM series (one file per
    slice, unsigned 16-bit with intercept -1024), inferior slice first: for synthetic data
    and tests."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = series or generate_uid()
    for z, hu in enumerate(hounsfield):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(str(folder / f"slice{z:04d}.dcm"), {}, file_meta=meta,
                         preamble=b"\0" * 128)
        ds.SeriesInstanceUID, ds.InstanceNumber = uid, z + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(z * spacing[2])]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.Rows, ds.Columns = hu.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.clip(np.round(hu + 1024), 0, 65535).astype(np.uint16).tobytes()
        pydicom.dcmwrite(folder / f"slice{z:04d}.dcm", ds, enforce_file_format=True)
