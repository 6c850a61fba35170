"""`manifest.csv`, a split's rows: its columns, how it is written and read back row by row
checked, and the digest `split.yaml` keeps of it.

A split of 2-D images has the columns `path,label,group,site,split,client`; a split with
volumes adds `slice` (the slice's index in the volume at `path`, empty for a 2-D image).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedct.data import partition
from fedct.data.sources import Row
from fedct.errors import FedctError

COLUMNS = ("path", "label", "group", "site", "split", "client")
SLICE = "slice"
LOCAL_VAL = "local_val"


@dataclass(frozen=True)
class Entry:
    """One manifest row: a dataset row with its split and its client (None: held by no client)."""

    row: Row
    split: str
    client: int | None


def manifest_digest(entries: list[Entry]) -> str:
    """A digest of every manifest row, split and client included: split.yaml's record of
    which image is in which split and client, in which order (an edit that moves test rows
    into a client's training rows, or reorders what a client trains on, is refused)."""
    digest = hashlib.sha256()
    for e in entries:
        where = "" if e.row.slice is None else f"\0{e.row.slice}"
        digest.update(f"{e.row.path}\0{e.row.label}\0{e.row.group}\0{e.row.site}\0{e.split}"
                      f"\0{'' if e.client is None else e.client}{where}\n".encode())
    return digest.hexdigest()


def write_manifest(path: Path, entries: list[Entry]) -> None:
    slices = any(e.row.slice is not None for e in entries)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow((*COLUMNS, SLICE) if slices else COLUMNS)
        for e in entries:
            r = e.row
            writer.writerow([r.path, r.label, r.group, r.site, e.split,
                             "" if e.client is None else e.client,
                             *([] if not slices else ["" if r.slice is None else r.slice])])


def read_manifest(manifest: Path, classes: list[str], clients: int) -> list[Entry]:
    """Every row checked: its label, split and client, a path inside the dataset, a slice
    index where there is one, each image or slice once."""
    entries, seen = [], {}
    try:
        with manifest.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = tuple(reader.fieldnames or ())
            if columns not in (COLUMNS, (*COLUMNS, SLICE)):
                raise FedctError(f"{manifest}: expected columns {','.join(COLUMNS)}[,{SLICE}]")
            lines = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FedctError(f"{manifest}: unreadable manifest ({exc.__class__.__name__})") from None
    splits = (*partition.SPLITS, LOCAL_VAL)
    for line_no, item in enumerate(lines, start=2):
        where = f"{manifest}:{line_no}"
        if any(v is None for v in item.values()) or None in item:
            raise FedctError(f"{where}: expected {len(columns)} cells")
        path, index = item["path"], item.get(SLICE, "")
        if not path or Path(path).is_absolute() or ".." in Path(path).parts:
            raise FedctError(f"{where}: path {path!r} is empty or outside the dataset folder")
        if index and not index.isdigit():
            raise FedctError(f"{where}: slice {index!r}, expected a slice number or empty")
        row = Row(path=path, label=item["label"], group=item["group"], site=item["site"],
                  split=item["split"], slice=int(index) if index else None)
        if row.key in seen:
            raise FedctError(f"{where}: path {row.key!r} is listed again (first on line "
                             f"{seen[row.key]})")
        seen[row.key] = line_no
        if item["label"] not in classes:
            raise FedctError(f"{where}: label {item['label']!r} not in split.yaml classes")
        if item["split"] not in splits:
            raise FedctError(f"{where}: split {item['split']!r}, expected one of {', '.join(splits)}")
        client = item["client"]
        if client and not (client.isdigit() and int(client) < clients):
            raise FedctError(f"{where}: client {client!r}, expected a client number from 0 to "
                             f"{clients - 1} or empty")
        entries.append(Entry(row=row, split=item["split"], client=int(client) if client else None))
    return entries
