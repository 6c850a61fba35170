"""Read an ImageFolder or a CSV into rows, check that every image decodes, and fingerprint
the dataset (images are decoded by `fedct.data.decode`)."""

from __future__ import annotations

import csv
import difflib
import hashlib
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedct.data.decode import decode_image, is_dicom
from fedct.data.series import is_series
from fedct.data.volumes import VolumeOptions, is_volume, slices_or_skip
from fedct.errors import FedctError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm"}
FEDCT_OUTPUTS = ("split.yaml", "manifest.csv", "report.json", "summary.csv", "metrics.json")
NEGATIVE_NAME = re.compile(r"(^|[^a-z])(non|normal|neg|healthy|control|benign)", re.IGNORECASE)


@dataclass(frozen=True)
class Row:
    """One image: its path relative to the dataset root and what is known about it; a slice
    of a volume is the volume's path and the slice's index."""

    path: str
    label: str
    group: str = ""
    site: str = ""
    split: str = ""
    slice: int | None = None

    @property
    def key(self) -> str:
        """What tells rows apart: the path, with the slice of a volume."""
        return self.path if self.slice is None else f"{self.path}#{self.slice}"


@dataclass
class Dataset:
    """Rows of one dataset, the class names in index order, and the positive class."""

    root: Path
    source: Path
    rows: list[Row]
    classes: list[str]
    positive: str | None = None
    skipped: list[str] = field(default_factory=list)
    volumes: VolumeOptions | None = None  # how its volumes became slices, when it has any
    labels_per: str = "image"  # "patient": a CSV's patient_label column labels each group

    def label_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}


def read_dataset(
    path: str | Path, *, group_pattern: str | None = None, positive: str | None = None
) -> Dataset:
    """Read an ImageFolder directory or a `path,label[,group][,site][,split]` CSV (a
    `patient_label` column instead of `label` labels each patient)."""
    source = Path(path)
    if not source.exists():
        raise FedctError(f"{source}: no such file or directory")
    if source.is_dir():
        dataset = _read_image_folder(source)
    else:
        dataset = _read_csv(source)
    if group_pattern:
        dataset.rows = _groups_from_pattern(dataset.rows, group_pattern)
    if dataset.labels_per == "patient":
        _check_patient_labels(source, dataset.rows)
    dataset.rows = [r if r.group else replace(r, group=r.path) for r in dataset.rows]
    dataset.positive = _choose_positive(dataset.classes, positive, dataset.positive)
    return dataset


def _read_image_folder(root: Path) -> Dataset:
    rows: list[Row] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        made_by_fedct = [n for n in FEDCT_OUTPUTS if (class_dir / n).is_file()]
        if made_by_fedct:
            raise FedctError(f"{class_dir}: holds {made_by_fedct[0]}, a fedct output, not a class of "
                             "images; move it out of the dataset folder")
        files = sorted(f for f in class_dir.rglob("*") if f.is_file() and looks_like_image(f))
        rows.extend(Row(path=f.relative_to(root).as_posix(), label=class_dir.name) for f in files)
    if not rows:
        raise FedctError(f"{root}: no class folder with images (expected ROOT/CLASS/IMAGE)")
    classes = sorted({r.label for r in rows})
    return Dataset(root=root.resolve(), source=root.resolve(), rows=rows, classes=classes)


def looks_like_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES or is_volume(path):
        return True
    return path.suffix == "" and is_dicom(path)


def read_csv_rows(source: Path, required: tuple[str, ...] = ("path",)) -> tuple[list[str], list[dict]]:
    """A UTF-8 CSV's column names and rows (cells stripped); a one-line error naming the file
    for text that is not UTF-8 or a missing column."""
    try:
        with source.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{k.strip(): (v if isinstance(v, str) else "").strip()
                     for k, v in line.items() if k} for line in reader]
    except UnicodeDecodeError as exc:
        raise FedctError(f"{source}: not UTF-8 text (byte {exc.object[exc.start]:#x} at offset "
                         f"{exc.start}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise FedctError(f"{source}: not a readable CSV ({exc})") from None
    for column in required:
        if column not in columns:
            raise FedctError(f"{source}: missing column '{column}' (found: {', '.join(columns)})")
    return columns, rows


def _read_csv(source: Path) -> Dataset:
    columns, raw = read_csv_rows(source)
    per_patient = "patient_label" in columns
    if per_patient and ("label" in columns or "class" in columns):
        raise FedctError(f"{source}: columns 'label' and 'patient_label' both given: label "
                         "each image or each patient, not both")
    if not per_patient and "label" not in columns and "class" not in columns:
        raise FedctError(f"{source}: missing column 'label' (or 'class', or 'patient_label')")
    rows: list[Row] = []
    numeric: dict[str, str] = {}
    named: dict[str, str] = {}
    seen: dict[str, int] = {}
    for line_no, item in enumerate(raw, start=2):
        name = item.get("patient_label") or item.get("class") or item.get("label", "")
        if not item["path"] or not name:
            raise FedctError(f"{source}:{line_no}: empty path or label")
        _check_path(source, line_no, item["path"], seen)
        folder = source.parent / item["path"]
        if folder.is_dir() and not is_series(folder):  # one patient's slices, labelled once
            for path in _folder_images(source, line_no, folder):
                _check_path(source, line_no, path, seen)
                rows.append(Row(path=path, label=name,
                                group=item.get("group") or Path(item["path"]).as_posix(),
                                site=item.get("site", ""), split=item.get("split", "")))
            continue
        if "class" in item and item.get("label"):
            number = numeric.setdefault(name, item["label"])
            other = named.setdefault(item["label"], name)
            if number != item["label"]:
                raise FedctError(f"{source}:{line_no}: class {name!r} has label {item['label']!r} "
                                 f"here but {number!r} on an earlier row")
            if other != name:
                raise FedctError(f"{source}:{line_no}: label {item['label']!r} names class {name!r} "
                                 f"here but {other!r} on an earlier row")
        rows.append(
            Row(
                path=item["path"],
                label=name,
                group=item.get("group", ""),
                site=item.get("site", ""),
                split=item.get("split", ""),
            )
        )
    if not rows:
        raise FedctError(f"{source}: no rows")
    _check_typos(source, rows)
    names = {r.label for r in rows}
    if numeric and len(numeric) == len(names) and all(_is_int(v) for v in numeric.values()):
        classes = sorted(names, key=lambda n: int(numeric[n]))
    else:
        classes = sorted(names)
    return Dataset(root=source.parent.resolve(), source=source.resolve(), rows=rows,
                   classes=classes, labels_per="patient" if per_patient else "image")


def _folder_images(source: Path, line_no: int, folder: Path) -> list[str]:
    """A folder row's images, relative to the CSV's folder: its image files, each DICOM
    series under it as one volume, in name order."""
    everything = sorted(folder.rglob("*"))
    series = {p for p in everything if p.is_dir() and is_series(p)}
    found = [p for p in everything if p in series or (
        p.is_file() and not series.intersection(p.parents) and looks_like_image(p))]
    if not found:
        raise FedctError(f"{source}:{line_no}: folder {folder.name!r} holds no image (a folder "
                         "row lists one patient's slices, or is one DICOM series)")
    return [p.relative_to(source.parent).as_posix() for p in found]


def _check_patient_labels(source: Path, rows: list[Row]) -> None:
    """A patient_label column gives every image of one patient the same label."""
    if not any(r.group for r in rows):
        raise FedctError(f"{source}: a patient_label column labels patients, but nothing says "
                         "which images are one patient's: add a group column, give "
                         "--group-pattern, or list each patient's folder")
    first: dict[str, Row] = {}
    for row in rows:
        other = first.setdefault(row.group or row.path, row)
        if other.label != row.label:
            raise FedctError(f"{source}: patient {row.group or row.path!r} is labelled "
                             f"{other.label!r} ({other.path}) and {row.label!r} ({row.path}); "
                             "a patient_label column gives each patient one label")


def _check_path(source: Path, line_no: int, path: str, seen: dict[str, int]) -> None:
    """A row's image lies inside the CSV's folder and is listed once."""
    parts = Path(path).parts
    if Path(path).is_absolute() or ".." in parts:
        raise FedctError(f"{source}:{line_no}: path {path!r} is outside the CSV's folder (paths are "
                         "relative to it; put the CSV at the root of the images)")
    key = Path(path).as_posix()
    if key in seen:
        raise FedctError(f"{source}:{line_no}: path {path!r} is listed again (first on line "
                         f"{seen[key]}): one image in two rows can land in train and val")
    seen[key] = line_no


def _check_typos(source: Path, rows: list[Row]) -> None:
    """A class of a row or two whose name is close to a larger class is a typo, not a class."""
    counts = Counter(r.label for r in rows)
    for name, count in counts.items():
        if count > max(2, len(rows) // 100):
            continue
        larger = [c for c, n in counts.items() if n > count and c != name]
        close = difflib.get_close_matches(name, larger, n=1, cutoff=0.8)
        if close:
            line_no = next(i for i, r in enumerate(rows, start=2) if r.label == name)
            raise FedctError(f"{source}:{line_no}: class {name!r} ({count} rows) looks like a typo "
                             f"of {close[0]!r}")


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _groups_from_pattern(rows: list[Row], pattern: str) -> list[Row]:
    """Derive a patient id from each file name: the first capture group that matched (so
    alternatives `(a)|(b)` can describe several naming schemes), else the whole match."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise FedctError(f"--group-pattern {pattern!r}: {exc}") from None
    out = []
    for row in rows:
        match = regex.search(Path(row.path).name)
        if match is None:
            raise FedctError(f"--group-pattern {pattern!r} does not match {row.path}")
        matched = [g for g in match.groups() if g is not None]
        out.append(replace(row, group=matched[0] if matched else match.group(0)))
    return out


def _choose_positive(classes: list[str], asked: str | None, known: str | None) -> str | None:
    if asked:
        if asked not in classes:
            raise FedctError(f"--positive {asked!r} is not a class (classes: {', '.join(classes)})")
        if len(classes) > 2:
            raise FedctError(f"--positive {asked}: needs two classes; this dataset has "
                             f"{len(classes)} ({', '.join(classes)}), decided by the highest "
                             "probability")
        return asked
    if len(classes) > 2:
        return None
    if known or len(classes) != 2:
        return known
    negatives = [c for c in classes if NEGATIVE_NAME.search(c)]
    if len(negatives) == 1:
        return next(c for c in classes if c != negatives[0])
    return classes[1]


def check_files(dataset: Dataset, *, skip_bad: bool, workers: int = 4,
                volumes: VolumeOptions | None = None) -> Dataset:
    """Decode every image once; stop on the first bad one, or drop and list them. A volume
    becomes a row per slice its rule keeps (`volumes`, or the default rule and window)."""
    if any(r.slice is None and is_volume(dataset.root / r.path) for r in dataset.rows):
        dataset = expand_volumes(dataset, volumes or VolumeOptions(), skip_bad=skip_bad)
    elif volumes is not None and volumes.rescale:  # 16-bit slices windowed: recorded too
        dataset = replace(dataset, volumes=volumes)
    images = [r for r in dataset.rows if r.slice is None]  # slices: read as their volume was

    def problem(row: Row) -> str | None:
        path = dataset.root / row.path
        try:
            decode_image(path)
        except FedctError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = dict(zip([r.key for r in images], pool.map(problem, images), strict=True))
    problems = [found.get(r.key) for r in dataset.rows]
    bad = [p for p in problems if p]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more; --skip-bad skips them)" if len(bad) > 1 else ""
        raise FedctError(bad[0] + more)
    kept = [row for row, p in zip(dataset.rows, problems, strict=True) if p is None]
    return replace(dataset, rows=kept, skipped=[*dataset.skipped, *bad])


def expand_volumes(dataset: Dataset, options: VolumeOptions, *, skip_bad: bool) -> Dataset:
    """Each volume's row becomes a row per slice `options` keep (its group, the volume's
    path unless the data named one); volumes are read one at a time."""
    rows, bad = [], []
    for row in dataset.rows:
        if row.slice is not None or not is_volume(dataset.root / row.path):
            rows.append(row)
            continue
        kept = slices_or_skip(dataset.root / row.path, options, skip_bad=skip_bad, skipped=bad)
        rows += [replace(row, slice=k) for k in kept]
    if not rows:
        raise FedctError(f"{dataset.source}: no readable image or volume (first problem: "
                         f"{bad[0] if bad else 'none'})")
    return replace(dataset, rows=rows, skipped=[*dataset.skipped, *bad], volumes=options)


def content_digest(path: Path) -> bytes:
    """SHA-256 of a file's bytes, or of a series folder's files (names and bytes)."""
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).digest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f"{file.name}\0".encode() + hashlib.sha256(file.read_bytes()).digest())
    return digest.digest()


def fingerprint(dataset: Dataset) -> str:
    """SHA-256 over every row and every image's bytes: later commands detect a changed
    dataset. A volume's bytes are hashed once for all its slices."""
    digest = hashlib.sha256()
    files: dict[str, bytes] = {}
    for row in sorted(dataset.rows, key=lambda r: (r.path, -1 if r.slice is None else r.slice)):
        where = "" if row.slice is None else f"{row.slice}\0"
        digest.update(f"{row.path}\0{row.label}\0{row.group}\0{row.site}\0{where}".encode())
        if row.path not in files:
            files[row.path] = content_digest(dataset.root / row.path)
        digest.update(files[row.path])
    return digest.hexdigest()
