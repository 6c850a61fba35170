"""The split directory: `manifest.csv` + `split.yaml` + `partition.png`, the contract between commands.

`fedct split` writes it once; every later command reads it and never re-splits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from fedct import __version__
from fedct.data import partition
from fedct.data.manifest_file import (  # noqa: F401 (the split directory's names, here)
    COLUMNS,
    LOCAL_VAL,
    Entry,
    manifest_digest,
    read_manifest,
    write_manifest,
)
from fedct.data.sources import Dataset, check_files, fingerprint, read_dataset
from fedct.data.volumes import VolumeOptions
from fedct.errors import FedctError
from fedct.files import staging_dir

MANIFEST = "manifest.csv"
SPLIT_YAML = "split.yaml"
PARTITION_PNG = "partition.png"

@dataclass
class SplitOptions:
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    keep_split: bool = False
    clients: int | None = 5
    scheme: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 1
    by: str = "site"
    min_per_client: int = 1
    local_val: float = 0.0
    seed: int = 0
    folds: int = 0  # > 1: cross-validation, train + val cut into this many folds
    fold: int = 0  # the fold that is val


@dataclass
class Split:
    """A split directory read back: where the images are, every entry, and the metadata."""

    directory: Path
    root: Path
    entries: list[Entry]
    classes: list[str]
    positive: str | None
    meta: dict = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return int(self.meta.get("partition", {}).get("clients", 0))

    def subset(self, entries: list[Entry]) -> Split:
        """The same split holding only `entries` (a node's own rows, the rows to score)."""
        return replace(self, entries=list(entries))

    def select(self, *, split: str | None = None, clients: list[int] | None = None) -> list[Entry]:
        return [
            e for e in self.entries
            if (split is None or e.split == split) and (clients is None or e.client in clients)
        ]


def make_split(dataset: Dataset, options: SplitOptions) -> tuple[list[Entry], int]:
    """Assign every row a split and every training row a client."""
    rows = dataset.rows
    if len(dataset.classes) < 2:
        raise FedctError(f"{dataset.source}: one class only ({', '.join(dataset.classes)}): a "
                         "classifier needs images of two or more classes to train (score a "
                         "one-class set with `fedct evaluate --data`)")
    for label in dataset.classes:
        if not any(r.label == label for r in rows):
            raise FedctError(f"class {label!r} has no images")
    if options.keep_split:
        bad = sorted({r.split for r in rows} - set(partition.SPLITS))
        if bad:
            raise FedctError(
                f"--keep-split: {dataset.source} has split value {bad[0]!r} "
                "(every row needs train, val or test)"
            )
        splits = [r.split for r in rows]
    else:
        splits = partition.assign_splits(rows, options.fractions, options.seed)
    if options.fold and not options.folds:
        raise FedctError(f"--fold {options.fold}: give --folds K too")
    if options.folds:
        splits = partition.assign_fold(rows, splits, options.folds, options.fold, options.seed)
    train = [i for i, s in enumerate(splits) if s == "train"]
    for label in dataset.classes:
        if not any(rows[i].label == label for i in train):
            raise FedctError(f"class {label!r} has no training images")
    client_of, clients = partition.assign_clients(
        rows, train, scheme=options.scheme, clients=options.clients, seed=options.seed + 1,
        alpha=options.alpha, classes_per_client=options.classes_per_client, by=options.by,
        min_per_client=options.min_per_client,
    )
    held_out = partition.carve_local_val(rows, client_of, options.local_val, options.seed + 2)
    entries = []
    for i, row in enumerate(rows):
        split = LOCAL_VAL if i in held_out else splits[i]
        entries.append(Entry(row=row, split=split, client=client_of.get(i)))
    return entries, clients


def summarize(entries: list[Entry], classes: list[str], clients: int) -> dict:
    counts = {s: _count(e.row.label for e in entries if e.split == s)
              for s in (*partition.SPLITS, LOCAL_VAL)}
    per_client = []
    for k in range(clients):
        train = [e.row.label for e in entries if e.client == k and e.split == "train"]
        local = [e.row.label for e in entries if e.client == k and e.split == LOCAL_VAL]
        per_client.append({"id": k, "train": _count(train, classes), "local_val": _count(local, classes),
                           "total": len(train)})
    train_labels = [[e.row.label for e in entries if e.client == k and e.split == "train"]
                    for k in range(clients)]
    return {
        "counts": {s: {c: v.get(c, 0) for c in classes} for s, v in counts.items() if v},
        "clients": per_client,
        "heterogeneity": {"mean_tv_distance": round(partition.heterogeneity(train_labels, classes), 4)},
    }


def _count(labels, classes: list[str] | None = None) -> dict[str, int]:
    counts = Counter(labels)
    if classes is None:
        return dict(sorted(counts.items()))
    return {c: counts.get(c, 0) for c in classes}


def run_split(
    dataset_path: str | Path,
    out: str | Path,
    options: SplitOptions,
    *,
    group_pattern: str | None = None,
    positive: str | None = None,
    skip_bad: bool = False,
    force: bool = False,
    volumes: VolumeOptions | None = None,
) -> tuple[Path, dict]:
    """Read, check, split and write a split directory atomically; returns it and its metadata.
    `volumes`: how NIfTI volumes become slices (recorded in split.yaml for every later read)."""
    from fedct.locks import exclusive

    with exclusive(out, "split"):
        return _split(dataset_path, Path(out), options, group_pattern=group_pattern,
                      positive=positive, skip_bad=skip_bad, force=force, volumes=volumes)


def _split(dataset_path, out: Path, options: SplitOptions, *, group_pattern, positive, skip_bad,
           force, volumes) -> tuple[Path, dict]:
    from fedct.runs import refuse_overlap

    source = Path(dataset_path)
    refuse_overlap(out, {"dataset": source},
                   roots={"dataset folder": source.parent if source.is_file() else None})
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FedctError(f"{out}: exists and is not empty (use --force to replace it)")
    dataset = read_dataset(dataset_path, group_pattern=group_pattern, positive=positive)
    dataset = check_files(dataset, skip_bad=skip_bad, volumes=volumes)
    entries, clients = make_split(dataset, options)
    meta = {
        "fedct_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dataset": {
            "source": str(dataset.source),
            "root": str(dataset.root),
            "images": len(dataset.rows),
            "fingerprint": fingerprint(dataset),
            "skipped": dataset.skipped,
        },
        "classes": dataset.classes,
        "positive": dataset.positive,
        "seed": options.seed,
        "split": {"mode": "kept" if options.keep_split else "stratified",
                  "fractions": None if options.keep_split else list(options.fractions),
                  **({"folds": options.folds, "fold": options.fold} if options.folds else {})},
        "partition": {"scheme": options.scheme, "clients": clients, "alpha": options.alpha,
                      "classes_per_client": options.classes_per_client, "by": options.by,
                      "min_per_client": options.min_per_client, "local_val": options.local_val},
    }
    if dataset.volumes is not None:
        meta["volumes"] = dataset.volumes.record()
    meta.update(summarize(entries, dataset.classes, clients))
    meta["manifest_digest"] = manifest_digest(entries)
    if all(r.group == r.path and r.slice is None for r in dataset.rows):
        meta["warnings"] = [f"{dataset.source}: no patient column, so images are split one by one "
                            "and slices of one patient can land in two splits or clients (give a "
                            "group column or --group-pattern)"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        write_manifest(tmp / MANIFEST, entries)
        (tmp / SPLIT_YAML).write_text(yaml.safe_dump(meta, sort_keys=False))
        plot_partition(meta, tmp / PARTITION_PNG)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, meta


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def plot_partition(meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = meta["classes"]
    clients = meta["clients"]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(clients) + 2), 3.2), dpi=100)
    bottom = [0] * len(clients)
    for c in classes:
        heights = [cl["train"][c] for cl in clients]
        ax.bar([str(cl["id"]) for cl in clients], heights, bottom=bottom, label=c)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    part = meta["partition"]
    ax.set_title(f"{part['scheme']} over {part['clients']} clients "
                 f"(TV {meta['heterogeneity']['mean_tv_distance']:.2f})")
    ax.set_xlabel("client")
    ax.set_ylabel("training images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_split(directory: str | Path, *, verify: bool = True) -> Split:
    """Read a split directory; with `verify`, refuse one whose dataset changed since the split."""
    directory = Path(directory)
    manifest, meta_path = directory / MANIFEST, directory / SPLIT_YAML
    for needed in (manifest, meta_path):
        if not needed.is_file():
            raise FedctError(f"{needed}: not found (is {directory} a `fedct split` output?)")
    meta, root, classes = _read_split_meta(meta_path)
    entries = read_manifest(manifest, classes, int(meta["partition"]["clients"]))
    recorded = meta.get("manifest_digest")
    if recorded is not None and recorded != manifest_digest(entries):
        raise FedctError(f"{manifest}: edited since `fedct split` wrote it (its rows, splits or "
                         f"clients differ from {SPLIT_YAML}'s digest); run `fedct split` again")
    if "volumes" in meta or any(e.row.slice is not None for e in entries):
        check_volume_record(meta_path, meta.get("volumes"))
    split = Split(directory=directory, root=root, entries=entries, classes=classes,
                  positive=meta.get("positive"), meta=meta)
    if verify:
        verify_fingerprint(split)
    return split


def _read_split_meta(path: Path) -> tuple[dict, Path, list[str]]:
    """split.yaml with the fields every command relies on checked."""
    try:
        meta = yaml.safe_load(path.read_text()) or {}
        root = Path(meta["dataset"]["root"])
        classes = meta["classes"]
        clients = meta["partition"]["clients"]
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise FedctError(f"{path}: unreadable split metadata ({exc.__class__.__name__}: "
                         f"{str(exc)[:100]})") from None
    if not (isinstance(classes, list) and len(classes) >= 2 and len(set(map(str, classes))) == len(classes)):
        raise FedctError(f"{path}: key 'classes' is {classes!r}, expected two or more distinct names")
    classes = [str(c) for c in classes]
    if meta.get("positive") is not None and meta["positive"] not in classes:
        raise FedctError(f"{path}: key 'positive' is {meta['positive']!r}, not one of {classes}")
    if meta.get("positive") is not None and len(classes) > 2:
        raise FedctError(f"{path}: key 'positive' is {meta['positive']!r}; {len(classes)} classes "
                         "have none (they are decided by the highest probability)")
    if not (isinstance(clients, int) and not isinstance(clients, bool) and clients >= 0):
        raise FedctError(f"{path}: key 'partition.clients' is {clients!r}, expected a count >= 0")
    return meta, root, classes


def check_volume_record(path: Path, record) -> None:
    """split.yaml's record of how volumes became slices: a manifest of slices needs it whole."""
    if not isinstance(record, dict):
        raise FedctError(f"{path}: the manifest lists volume slices but key 'volumes' is "
                         f"{record!r}; run `fedct split` again")
    try:
        options = VolumeOptions(slices=str(record.get("slices")), window=str(record.get("window")),
                                rescale=str(record.get("rescale", "")))
    except FedctError as exc:
        raise FedctError(f"{path}: key 'volumes': {exc}") from None
    if (record.get("level"), record.get("width")) != options.level_width:
        raise FedctError(f"{path}: key 'volumes' has level {record.get('level')!r} and width "
                         f"{record.get('width')!r}, not those of window {options.window!r}")


def split_digest(split: Split) -> str:
    """What a run records of its split: the manifest and the split metadata, hashed."""
    digest = hashlib.sha256()
    for name in (MANIFEST, SPLIT_YAML):
        digest.update((split.directory / name).read_bytes())
    return digest.hexdigest()[:32]


def verify_fingerprint(split: Split) -> None:
    """Re-hash the images against split.yaml's fingerprint, once per unchanged set of files.

    A passed check is remembered in the cache under a key of the files' paths and stamps
    (size, mtime, ctime, inode: the image cache's rule; an edit that restores the mtime still
    changes the ctime), so a Flower node answering every round, or a command run again, does
    not re-read every image.
    """
    from fedct.data.loading import cache_dir, path_stamp

    missing = [e.row.path for e in split.entries if not (split.root / e.row.path).exists()]
    if missing:
        raise FedctError(f"{split.root / missing[0]}: image listed in {split.directory / MANIFEST} "
                         f"is missing ({len(missing)} missing)")
    expected = split.meta.get("dataset", {}).get("fingerprint")
    if not expected:
        return
    digest = hashlib.sha256(f"{expected}\n".encode())
    stamps = {p: path_stamp(split.root / p) for p in {e.row.path for e in split.entries}}
    for entry in sorted(split.entries, key=lambda e: e.row.key):
        digest.update(f"{entry.row.key}\0{entry.row.label}\0{entry.row.group}\0{entry.row.site}"
                      f"\0{stamps[entry.row.path]}\n".encode())
    marker = cache_dir() / f"verified-{digest.hexdigest()[:32]}"
    if marker.is_file():
        return
    dataset = Dataset(root=split.root, source=split.root, rows=[e.row for e in split.entries],
                      classes=split.classes)
    if fingerprint(dataset) != expected:
        raise FedctError(f"{split.directory}: the dataset under {split.root} changed since it was "
                         "split (fingerprint differs); run `fedct split` again")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # a read-only cache only costs the re-hash next time
