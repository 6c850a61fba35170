"""`fedct predict`: classify new, unlabelled scans with a checkpoint at its stored threshold.

Images are decoded and preprocessed by the very code that trained and scores the model
(`decode_image`, `make_transform`, `training.predict`). Per patient, series or volume the
mean probability is the default aggregate: one odd slice moves it little, and a run whose
val rows share patients stores a threshold chosen on their means, which decides groups;
`max` (or `top:K`) flags a patient when any slice (or K) looks positive, more sensitive and
with more false alarms the more slices a series has. Without a stored patient-level
threshold for the aggregate, groups are decided at the slice threshold.
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedct.data.decode import is_dicom
from fedct.data.loading import (
    ImageTensorDataset,
    decode_resized,
    make_loader,
    make_transform,
    resized,
)
from fedct.data.sources import looks_like_image, read_csv_rows
from fedct.data.volumes import VolumeOptions, is_volume, read_volume, slices_or_skip
from fedct.data.volumes import window as window_hu
from fedct.errors import FedctError
from fedct.evaluation import check_threshold, chosen_threshold, load_model, tta_note
from fedct.files import atomic_write
from fedct.metrics import positive_class
from fedct.multiclass import ARGMAX, check_classes
from fedct.patients import aggregate_scores, parse_aggregate
from fedct.runs import checkpoint_paths, read_sidecar, refuse_overlap, refuse_overwriting_inputs
from fedct.training import pick_device, predict, set_threads

BATCH = 32


@dataclass(frozen=True)
class Item:
    """One image to classify: where it is, how the user named it, its patient or series."""

    path: Path
    name: str
    group: str = ""
    slice: int | None = None  # a slice of the volume at `path`


def volume_items(items: list[Item], options: VolumeOptions, *,
                 skip_bad: bool) -> tuple[list[Item], list[str]]:
    """Each volume becomes an item per slice `options` keep, grouped by its volume (unless
    a list named its group), and the problems of the volumes skipped."""
    out, skipped = [], []
    for item in items:
        if not is_volume(item.path):
            out.append(item)
            continue
        kept = slices_or_skip(item.path, options, skip_bad=skip_bad, skipped=skipped)
        out += [Item(item.path, f"{item.name}#{k}", item.group or item.name, k) for k in kept]
    return out, skipped


def collect(inputs: list[Path], *, group_column: str | None = None) -> list[Item]:
    """Images, folders (searched recursively), and CSV lists with a `path` column (relative
    to the CSV's folder) and a group column (`group_column`, which must then be there; by
    default `group` where present); a DICOM file's group is its series."""
    items: list[Item] = []
    for source in inputs:
        source = Path(source)
        if not source.exists():
            raise FedctError(f"{source}: no such file or directory")
        if source.is_dir():
            files = sorted(f for f in source.rglob("*") if f.is_file() and looks_like_image(f))
            if not files:
                raise FedctError(f"{source}: no images in this folder")
            items += [Item(f, str(f)) for f in files]
        elif source.suffix.lower() == ".csv":
            items += _read_list(source, group_column)
        else:
            items.append(Item(source, str(source)))
    return [item if item.group else Item(item.path, item.name, _series(item.path))
            for item in items]


def _read_list(source: Path, group_column: str | None) -> list[Item]:
    _, lines = read_csv_rows(source, ("path",) + ((group_column,) if group_column else ()))
    column = group_column or "group"
    items = []
    for line_no, line in enumerate(lines, start=2):
        if not line["path"]:
            raise FedctError(f"{source}:{line_no}: empty path")
        items.append(Item(source.parent / line["path"], line["path"], line.get(column, "")))
    if not items:
        raise FedctError(f"{source}: no rows")
    return items


def _series(path: Path) -> str:
    """A DICOM file's SeriesInstanceUID (header only), else no group."""
    if not is_dicom(path):
        return ""
    try:
        import pydicom

        return str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesInstanceUID", ""))
    except Exception:  # an unreadable header is reported when the pixels are decoded
        return ""


def aggregate(rows: list[dict], *, rule: str, threshold: float, positive: str,
              negative: str) -> list[dict]:
    """One row per group: its images' aggregated probability (mean, max or top:K mean) and
    the decision on it."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        if row["group"]:
            groups.setdefault(row["group"], []).append(row["probability"])
    out = []
    for group, probabilities in groups.items():
        value = aggregate_scores(np.asarray(probabilities), rule)
        out.append({"group": group, "images": len(probabilities), "rule": rule,
                    "probability": value, "decision": positive if value >= threshold else negative,
                    "threshold": threshold})
    return out


def check_outputs(checkpoint: str | Path, inputs: list[Path], items: list[Item], *, out: Path,
                  groups_out: Path, explain: Path | None, force: bool) -> None:
    """Before any inference: no output is an input (scans, lists, the checkpoint), heat maps
    go nowhere near the scans (the next run would read them as scans), nothing is replaced
    without --force."""
    lists = [Path(i) for i in inputs if Path(i).suffix.lower() == ".csv"]
    refuse_overwriting_inputs({"--out": out, "--out's groups": groups_out},
                              [*checkpoint_paths(checkpoint), *lists, *(i.path for i in items)])
    for target in (out, groups_out):
        if target.is_dir():
            raise FedctError(f"--out {out}: {target} is a folder; give the CSV file to write")
        if target.exists() and not force:
            raise FedctError(f"{target}: exists (use --force to replace it)")
    if explain is not None:
        folders = {f"input folder {i}": i for i in inputs if Path(i).is_dir()}
        refuse_overlap(Path(explain), folders, option="--explain")
        for item in items:
            if Path(explain).resolve() in item.path.resolve().parents:
                raise FedctError(f"--explain {explain}: holds the input {item.name}; choose a "
                                 "folder apart from the scans")
        if Path(explain).exists() and any(Path(explain).iterdir()) and not force:
            raise FedctError(f"--explain {explain}: exists and is not empty (use --force to "
                             "replace it)")


def run_predict(checkpoint: str | Path, inputs: list[Path], *, out: Path, aggregate_rule: str = "mean",
                group_column: str | None = None, threshold: float | None = None, skip_bad: bool = False,
                explain: Path | None = None, cam_layer: str | None = None, tta: bool = False,
                device: str = "auto", force: bool = False,
                on_batch: Callable[[int, int], None] | None = None,
                volumes: VolumeOptions | None = None) -> dict:
    """Predict every input image (and each slice of a volume that `volumes` keep); write
    `out` (a row per image) and, when groups are known (a volume is one), `out` with
    `.groups.csv` (a row per group). Nothing is written if an input is bad and `skip_bad`
    is off."""
    parse_aggregate(aggregate_rule)
    check_threshold(threshold)
    out = Path(out)
    groups_out = out.with_suffix(".groups.csv")
    items = collect(inputs, group_column=group_column)
    check_outputs(checkpoint, inputs, items, out=out, groups_out=groups_out, explain=explain,
                  force=force)
    classes = list(read_sidecar(checkpoint)["classes"])
    if len(classes) > 2:  # before any inference
        check_classes([classes], threshold=threshold, explain=explain)
        if aggregate_rule != "mean":
            raise FedctError(f"--aggregate {aggregate_rule}: ranks slices by a positive class; a "
                             f"model of {len(classes)} classes has none (use mean)")
    items, bad_volumes = volume_items(items, volumes or VolumeOptions(), skip_bad=skip_bad)
    model, meta = load_model(checkpoint)
    positive = positive_class(classes, meta.get("positive"))
    negative = next((c for c in classes if c != positive), "")
    cut, source = chosen_threshold(meta, threshold) if positive else (float("nan"), ARGMAX)
    size = int(meta["input_size"][-1])
    transform = make_transform(data_cfg={k: meta[k] for k in ("input_size", "mean", "std")},
                               train=False, config=None)
    set_threads()
    dev = pick_device(device)
    model.to(dev)
    explainer = _explainer(model, explain, cam_layer, positive=positive, negative=negative,
                           threshold=cut, target=classes.index(positive), image_size=size) \
        if positive else None
    try:
        rows, skipped = _predict_batches(items, model, transform, size, classes, cut=cut,
                                         positive=positive, negative=negative, dev=dev,
                                         tta=tta, skip_bad=skip_bad, explainer=explainer,
                                         on_batch=on_batch,
                                         options=volumes or VolumeOptions())
        skipped = [*bad_volumes, *skipped]
        if not rows:
            raise FedctError(f"every one of the {len(items)} inputs was bad, nothing written "
                             f"(first: {skipped[0]})")
        explained = explainer.finish(f"Grad-CAM for {positive}, "
                                     f"{checkpoint_paths(checkpoint)[0].name}") if explainer else None
    finally:
        if explainer:
            explainer.discard()  # heat maps of a run that did not finish; none once finished
    group_cut, group_source = cut, source
    patient = meta.get("patient_operating_point")
    if positive and threshold is None and patient and patient["aggregate"] == aggregate_rule:
        group_cut = float(patient["threshold"])
        group_source = f"{patient['rule']} on {patient['source']}"
    grouped = aggregate(rows, rule=aggregate_rule, threshold=group_cut, positive=positive,
                        negative=negative) if positive else aggregate_classes(rows, classes)
    atomic_write(out, lambda p: p.write_text(_csv(rows)))
    if grouped:
        atomic_write(groups_out, lambda p: p.write_text(_csv(grouped)))
    else:
        groups_out.unlink(missing_ok=True)  # a replaced run's groups would no longer match
    note = tta_note(checkpoint_paths(checkpoint)[0].name, meta, tta) if threshold is None else None
    report = {"checkpoint": str(checkpoint_paths(checkpoint)[0]), "positive": positive,
              "classes": classes, "threshold": cut, "threshold_source": source,
              "images": len(rows), "skipped": skipped,
              "positives": sum(r["decision"] == positive for r in rows) if positive else None,
              "out": str(out), "groups_out": str(groups_out) if grouped else None,
              "aggregate": aggregate_rule, "predictions": rows, "groups": grouped,
              "group_threshold": group_cut, "group_threshold_source": group_source,
              "notes": [note] if note else []}
    if explained:
        report["explanations"] = explained
    return report


def _predict_batches(items: list[Item], model, transform, size: int, classes: list[str], *,
                     cut: float, positive: str | None, negative: str, dev, tta: bool,
                     skip_bad: bool, explainer, on_batch,
                     options: VolumeOptions) -> tuple[list[dict], list[str]]:
    """A row per readable item (its positive-class probability and the decision at `cut`;
    with no positive class, the class of highest probability and every class's), and the
    problems of the items skipped."""
    rows, skipped = [], []
    volume = functools.lru_cache(maxsize=1)(read_volume)  # one volume in memory, read once
    window = options.level_width
    for start in range(0, len(items), BATCH):
        batch, pixels = [], []
        for item in items[start:start + BATCH]:
            try:
                pixels.append(decode_resized(item.path, size, window, options.slope_intercept)
                              if item.slice is None else
                              resized(window_hu(volume(item.path)[item.slice], window), size))
                batch.append(item)
            except FedctError as exc:
                if not skip_bad:
                    raise FedctError(f"{exc} (--skip-bad skips bad inputs and lists them)") from None
                skipped.append(str(exc))
        if batch:
            images = torch.from_numpy(np.stack(pixels)).unsqueeze(1)
            dataset = ImageTensorDataset(images, [0] * len(batch), transform)
            probs, _ = predict(model, make_loader(dataset, batch_size=BATCH, train=False, seed=0),
                               device=dev, channels_last=False, tta=tta)
            if positive is None:
                rows += [class_row(item.name, item.group, p, classes)
                         for item, p in zip(batch, probs, strict=True)]
            else:
                column = probs[:, classes.index(positive)]
                rows += [{"path": item.name, "group": item.group, "probability": float(p),
                          "decision": positive if p >= cut else negative, "threshold": cut}
                         for item, p in zip(batch, column, strict=True)]
            if explainer:
                explainer.explain(dataset, pixels, [i.name for i in batch], column, dev)
        if on_batch:
            on_batch(min(start + BATCH, len(items)), len(items))
    return rows, skipped


def class_row(name: str, group: str, probs: np.ndarray, classes: list[str]) -> dict:
    """An image's (or group's) row for a model of more than two classes: the class of highest
    probability, that probability, and every class's."""
    best = int(np.argmax(probs))
    return {"path": name, "group": group, "probability": float(probs[best]),
            "decision": classes[best], **{f"P({c})": float(p) for c, p in zip(classes, probs,
                                                                               strict=True)}}


def aggregate_classes(rows: list[dict], classes: list[str]) -> list[dict]:
    """One row per group for a model of more than two classes: the mean of its images'
    probabilities per class, and the class of highest mean."""
    groups: dict[str, list[list[float]]] = {}
    for row in rows:
        if row["group"]:
            groups.setdefault(row["group"], []).append([row[f"P({c})"] for c in classes])
    out = []
    for group, probs in groups.items():
        row = class_row("", group, np.mean(probs, axis=0), classes)
        del row["path"]
        out.append({"group": group, "images": len(probs), "rule": "mean",
                    **{k: v for k, v in row.items() if k != "group"}})
    return out


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["path"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _explainer(model, folder: Path | None, layer_name: str | None, *, positive: str,
               negative: str, threshold: float, target: int, image_size: int):
    if folder is None:
        return None
    from fedct.explain import BatchExplainer

    return BatchExplainer.for_model(model, folder=Path(folder), layer_name=layer_name,
                                    positive=positive, negative=negative, threshold=threshold,
                                    target=target, image_size=image_size)
