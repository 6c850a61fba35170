"""`fedct evaluate`: score checkpoints the way a clinical reader expects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedct.data.loading import SplitImages, make_loader, make_transform
from fedct.data.manifest import LOCAL_VAL, Entry, Split, load_split
from fedct.data.sources import check_files, read_dataset
from fedct.data.volumes import VolumeOptions
from fedct.errors import FedctError
from fedct.files import atomic_write, json_safe
from fedct.locks import exclusive
from fedct.metrics import (
    binary_metrics,
    bootstrap,
    one_class_note,
    plot_confusion,
    plot_reliability,
    plot_roc,
    positive_class,
    youden_threshold,
)
from fedct.models import create_model, load_weights, make_dp_safe
from fedct.multiclass import check_classes, score_classes, write_class_plots
from fedct.operating_point import (
    ScoreHistogram,
    expected_calibration_error,
    operating_point,
    parse_rule,
)
from fedct.patients import parse_aggregate, patient_meta, patient_rows
from fedct.runs import (
    checkpoint_paths,
    read_checkpoint,
    read_config,
    read_sidecar,
    refuse_overlap,
)
from fedct.training import pick_device, predict, set_threads

SPLITS = ("train", "val", "test", LOCAL_VAL, "all")


def load_model(checkpoint: str | Path):
    """The model a checkpoint describes, its weights loaded strictly, and its sidecar."""
    state, meta = read_checkpoint(checkpoint)
    size = meta.get("input_size")
    model = create_model(meta["architecture"], len(meta["classes"]), pretrained="none",
                         image_size=int(size[-1]) if size else None)
    if meta.get("dp_safe"):
        make_dp_safe(model)
    load_weights(model, state, source=checkpoint_paths(checkpoint)[0])
    return model, meta


def checkpoint_names(checkpoints: list[str | Path]) -> list[str]:
    """RUN/NAME for each checkpoint, with more of its path where two would share one (their
    ROC curves and heat-map folders are kept apart by it); the same checkpoint twice is refused."""
    weights = [checkpoint_paths(c)[0].resolve() for c in checkpoints]
    for i, path in enumerate(weights):
        if path in weights[:i]:
            raise FedctError(f"{checkpoints[i]}: given twice")
    depth = 2
    while True:
        names = ["/".join((*w.parent.parts[-(depth - 1):], w.stem)) for w in weights]
        if len(set(names)) == len(names) or depth > max(len(w.parts) for w in weights):
            return names
        depth += 1


def check_evaluation_outputs(out_dir: Path, names: list[str], *, split_dir, data,
                             explain) -> None:
    """Before any inference: results and heat maps go apart from the data they score (heat
    maps inside it would be read as images next time), and no earlier heat maps are replaced."""
    data_root = None
    if data is not None:
        data_root = Path(data) if Path(data).is_dir() else Path(data).parent
    refuse_overlap(out_dir, {"dataset": data, "split": split_dir},
                   roots={"dataset folder": data_root})
    if explain is None:
        return
    refuse_overlap(Path(explain), {"dataset": data, "split": split_dir},
                   roots={"dataset folder": data_root}, option="--explain")
    for name in names:
        folder = Path(explain) / name.replace("/", "-")
        if folder.exists() and any(folder.iterdir()):
            raise FedctError(f"--explain {explain}: {folder} exists and is not empty; choose "
                             "another folder")


def tta_note(name: str, meta: dict, tta: bool) -> str | None:
    """A note when the stored threshold was chosen on scores of another kind than these."""
    if bool(meta.get("tta")) == tta:
        return None
    if tta:
        return (f"{name}: its threshold was chosen on val scored without --tta; these scores "
                "are mirrored, so the threshold may sit elsewhere on them")
    return (f"{name}: its threshold was chosen on val scored with test-time mirroring; add "
            "--tta to score it the way it was chosen")


def data_for(*, split_dir, on, data, volumes: VolumeOptions | None = None) -> Split:
    if (split_dir is None) == (data is None):
        raise FedctError("give either --split SPLIT_DIR (with --on) or --data PATH (the "
                         "checkpoint's run names no split)" if data is None else
                         "give either --split SPLIT_DIR (with --on) or --data PATH")
    if split_dir is not None:
        if on not in SPLITS:
            raise FedctError(f"--on {on!r}: choose from {', '.join(SPLITS)}")
        split = load_split(split_dir)
        split = split.subset(split.select(split=None if on == "all" else on))
        if not split.entries:
            raise FedctError(f"{split_dir}: no rows with split {on!r}")
        return split
    dataset = check_files(read_dataset(data), skip_bad=False, volumes=volumes)
    entries = [Entry(row=r, split="data", client=None) for r in dataset.rows]
    return Split(directory=Path(data), root=dataset.root, entries=entries,
                 classes=dataset.classes, positive=dataset.positive,
                 meta={"volumes": dataset.volumes.record()} if dataset.volumes else {})


def _scopes(split: Split, per_client: bool) -> dict[str, np.ndarray]:
    scopes = {"all": np.arange(len(split.entries))}
    if per_client:
        clients = sorted({e.client for e in split.entries if e.client is not None})
        if not clients:
            raise FedctError("--per-client: these rows belong to no client (try --on train or "
                             "--on local_val, or a split made with --local-val)")
        for k in clients:
            scopes[f"client {k}"] = np.array([i for i, e in enumerate(split.entries) if e.client == k])
    return scopes


def fresh_folder(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ...: the first that does not exist, so no evaluation
    replaces an earlier one in the default place."""
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate


def check_threshold(override: str | None) -> None:
    """Refuse a --threshold that is neither a number in (0, 1) nor a rule, before any
    inference."""
    if override is not None:
        parse_rule(override)


def check_bootstrap(n_boot: int) -> None:
    if n_boot < 0:
        raise FedctError(f"--bootstrap {n_boot}: must be >= 0 (0: no intervals)")


def chosen_threshold(meta: dict, override: str | float | None, truth: np.ndarray | None = None,
                     prob: np.ndarray | None = None) -> tuple[float, str]:
    """The threshold to score at, and where it came from: --threshold (a number, or a rule
    chosen on the scored rows themselves, which flatters them), else the one the training
    run chose on its validation data (stored in the sidecar), else 0.5."""
    if override is not None:
        kind, value = parse_rule(override)
        if kind == "fixed":
            return value, "--threshold"
        if truth is None:
            raise FedctError(f"--threshold {override}: a rule needs labelled rows; give a number")
        point = operating_point(override, ScoreHistogram.of(truth.astype(bool), prob), "scored data")
        return float(point["threshold"]), f"{override} on the scored data (optimistic)"
    point = meta.get("operating_point")
    if point:
        return float(point["threshold"]), f"{point['rule']} on {point['source']}"
    return 0.5, "default (the checkpoint records none)"


def score(truth: np.ndarray, prob: np.ndarray, groups: np.ndarray, *, threshold: float,
          source: str, n_boot: int, seed: int) -> dict:
    def at(t: float) -> dict:
        ci = bootstrap(truth, prob, threshold=t, groups=groups, n=n_boot, seed=seed) \
            if n_boot else {}
        return {"threshold": t, **binary_metrics(truth, prob, t), "ci95": ci}

    at_half = at(0.5)
    youden = youden_threshold(truth, prob)
    ece, bins = expected_calibration_error(truth, prob)
    return {"n": int(len(truth)), "positives": int(truth.sum()),
            "chosen": {**(at_half if threshold == 0.5 else at(threshold)), "source": source},
            "threshold_0.5": at_half,
            "youden": {"threshold": youden, **binary_metrics(truth, prob, youden)},
            "calibration": {"ece": ece, "bins": bins}}


def score_checkpoint(name: str, path: str, meta: dict, positive: str, truth: np.ndarray,
                     prob: np.ndarray, groups: np.ndarray | None,
                     scopes: dict[str, np.ndarray], *, threshold: str | None, n_boot: int,
                     seed: int) -> list[dict]:
    """One checkpoint's results, a row per scope (all rows, each client's)."""
    cut, source = chosen_threshold(meta, threshold, truth, prob)
    return [{"checkpoint": name, "path": path, "data": scope, "positive": positive,
             "stage": meta.get("stage"),
             **score(truth[idx], prob[idx], None if groups is None else groups[idx],
                     threshold=cut, source=source, n_boot=n_boot, seed=seed)}
            for scope, idx in scopes.items()]


def write_evaluation(out_dir: Path, report: dict, curves: dict, negative: str) -> dict:
    """metrics.json and the ROC, confusion (at each checkpoint's threshold) and reliability
    plots of the pooled rows; each pooled result also goes into its run's model card.
    Returns the report with `out`."""
    pooled = [r for r in report["results"] if r["data"] == "all"]
    positive = report["results"][0]["positive"]
    cards = [record_in_run(r, data=report["data"], grouped=report["grouped_bootstrap"],
                           split_dir=report.get("split"))
             for r in pooled]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "metrics.json",
                 lambda p: p.write_text(json.dumps(json_safe(report), indent=2)))
    if positive is None:  # more than two classes: a curve per class, every class's matrix
        write_class_plots(out_dir, pooled, curves, f"ROC on {report['data']}, one class vs rest")
    else:
        plot_roc(curves, out_dir / "roc.png", f"ROC on {report['data']}",
                 points={r["checkpoint"]: r["chosen"] for r in pooled}, positive=positive)
        plot_confusion({f"{r['checkpoint']} @ {r['chosen']['threshold']:.2f}":
                        r["chosen"]["confusion"] for r in pooled},
                       out_dir / "confusion.png", positive, negative)
        plot_reliability({r["checkpoint"]: r["calibration"] for r in pooled},
                         out_dir / "reliability.png", positive)
    return {**report, "out": str(out_dir), "model_cards": [c for c in cards if c]}


def explain_split(model, images: SplitImages, split: Split, dataset, prob: np.ndarray,
                  folder: Path, *, cam_layer: str | None, positive: str, negative: str,
                  threshold: float, target: int, device) -> dict:
    """Grad-CAM for every scored image; on synthetic data, how often it finds the lesion."""
    from fedct.data.synthetic import read_lesions
    from fedct.explain import BatchExplainer

    explainer = BatchExplainer.for_model(model, folder=folder, layer_name=cam_layer,
                                         positive=positive, negative=negative,
                                         threshold=threshold, target=target,
                                         image_size=int(dataset[0][0].shape[-1]),
                                         lesions=read_lesions(split.root))
    grays = [images.images[images.index[e.row.key]][0].numpy() for e in split.entries]
    try:
        explainer.explain(dataset, grays, [e.row.key for e in split.entries], prob, device,
                          truths=[e.row.label for e in split.entries])
        return explainer.finish(f"Grad-CAM for {positive}, {folder.name}")
    finally:
        explainer.discard()


def run_split_of(run_dir: Path) -> str | None:
    """The split a fedct run trained on, as its config.yaml records it (None if not a run)."""
    try:
        return read_config(run_dir).get("split") if (run_dir / "config.yaml").is_file() else None
    except FedctError:
        return None


def splits_of_runs(checkpoints) -> Path | None:
    """The split the checkpoints' runs trained on, when their config.yaml files name one
    and agree: what `fedct evaluate` scores when no --split or --data is given."""
    found = {run_split_of(checkpoint_paths(c)[0].parent) for c in checkpoints} - {None}
    if len(found) > 1:
        raise FedctError(f"the checkpoints' runs trained on different splits "
                         f"({', '.join(sorted(found))}): give --split or --data")
    return Path(found.pop()) if found else None


def record_in_run(result: dict, *, data: str, grouped: bool, split_dir) -> str | None:
    """Add a pooled result to its run's evaluations and model card, when it scores the
    run's own split and the checkpoint lies in a fedct run directory that can be written
    and no other process is writing (a read-only or busy one keeps its card as it is);
    returns the card's path. Other data (--data, another split) never goes on the card."""
    from fedct.model_card import record_evaluation

    run_dir = Path(result["path"]).parent
    if not ((run_dir / "config.yaml").is_file() and (run_dir / "report.json").is_file()):
        return None
    if split_dir is None or run_split_of(run_dir) != str(Path(split_dir).resolve()):
        return None
    try:
        with exclusive(run_dir):  # a run still writing keeps its card; it rewrites it at its end
            return str(record_evaluation(run_dir, {
                "checkpoint": result["checkpoint"], "data": data, "n": result["n"],
                "patient_bootstrap": grouped, "chosen": result["chosen"]}))
    except (OSError, FedctError):
        return None


def run_evaluate(checkpoints: list[str | Path], *, split_dir=None, on: str = "val", data=None,
                 per_client: bool = False, out: str | Path | None = None, n_boot: int = 1000,
                 seed: int = 0, batch_size: int = 64, device: str = "auto",
                 tta: bool = False, threshold: str | None = None,
                 explain: str | Path | None = None, cam_layer: str | None = None,
                 volumes: VolumeOptions | None = None, level: str = "slice",
                 aggregate: str = "mean") -> dict:
    """Score checkpoints on a split's rows or on `data` (whose volumes become slices by
    `volumes`), per slice or per patient (`aggregate` of its slices); write the report,
    plots and model-card records."""
    if not checkpoints:
        raise FedctError("give at least one checkpoint")
    if level not in ("slice", "patient"):
        raise FedctError(f"--level {level!r}: choose slice or patient")
    parse_aggregate(aggregate)
    if level == "patient" and explain is not None:
        raise FedctError("--explain with --level patient: heat maps are per slice; score per "
                         "slice to draw them")
    check_bootstrap(n_boot)
    check_threshold(threshold)
    names = checkpoint_names(checkpoints)
    if split_dir is None and data is None:
        split_dir = splits_of_runs(checkpoints)
    split = data_for(split_dir=split_dir, on=on, data=data, volumes=volumes)
    scopes = _scopes(split, per_client)  # checked before any inference
    out_dir = Path(out) if out else fresh_folder(
        checkpoint_paths(checkpoints[0])[0].parent / f"eval-{Path(data).stem if data else on}")
    check_evaluation_outputs(out_dir, names, split_dir=split_dir, data=data, explain=explain)
    check_classes([read_sidecar(c)["classes"] for c in checkpoints], threshold=threshold,
                  explain=explain)
    set_threads()
    dev = pick_device(device)
    results, curves, explained, negative = [], {}, {}, "negative"
    cache: dict[tuple, SplitImages] = {}
    groups = np.array([e.row.group for e in split.entries])
    notes = set()
    for checkpoint, name in zip(checkpoints, names, strict=True):
        model, meta = load_model(checkpoint)
        classes = list(meta["classes"])
        unknown = sorted({e.row.label for e in split.entries} - set(classes))
        if unknown:
            raise FedctError(f"{checkpoint_paths(checkpoint)[0]}: trained for classes "
                             f"{classes}, but the data has {unknown[0]!r}")
        positive = positive_class(classes, meta.get("positive") or split.positive)
        size = int(meta["input_size"][-1])
        key = (size, tuple(classes))
        if key not in cache:
            cache[key] = SplitImages(split, size, classes=classes)
        note = tta_note(name, meta, tta) if threshold is None else None
        if note:
            notes.add(note)
        dcfg = {"input_size": meta["input_size"], "mean": meta["mean"], "std": meta["std"]}
        dataset = cache[key].dataset(split.entries, make_transform(data_cfg=dcfg, train=False,
                                                                   config=None))
        model.to(dev)
        probs, labels = predict(model, make_loader(dataset, batch_size=batch_size, train=False,
                                                   seed=0), device=dev, channels_last=False,
                                tta=tta)
        rows, row_groups = scopes, groups
        if level == "patient":  # one row per patient, resampled as such
            labels, probs, rows = patient_rows(labels, probs, groups, scopes, aggregate,
                                               positive=None if positive is None
                                               else classes.index(positive))
            meta, note = patient_meta(meta, aggregate)
            notes.update([note] if note else [])
            row_groups = None
        if positive is None:  # more than two classes: argmax decisions, no threshold
            results += score_classes(name, str(checkpoint_paths(checkpoint)[0]), meta, labels,
                                     probs, row_groups, rows, n_boot=n_boot, seed=seed)
            curves[name] = (labels, probs)
            del model
            continue
        prob = probs[:, classes.index(positive)]
        truth = labels == classes.index(positive)
        results += score_checkpoint(name, str(checkpoint_paths(checkpoint)[0]), meta, positive,
                                    truth, prob, row_groups, rows, threshold=threshold,
                                    n_boot=n_boot, seed=seed)
        curves[name] = (truth, prob)
        negative = next((c for c in classes if c != positive), "negative")
        note = one_class_note(truth, positive, negative)
        if note:
            notes.add(note)
        if explain:
            explained[name] = explain_split(model, cache[key], split, dataset, prob,
                                            Path(explain) / name.replace("/", "-"),
                                            cam_layer=cam_layer, positive=positive,
                                            negative=negative, threshold=chosen_threshold(
                                                meta, threshold, truth, prob)[0],
                                            target=classes.index(positive), device=dev)
        del model
    where = (f"--data {data}" if data else f"{split_dir} --on {on}") + (
        f", per patient ({aggregate} of its slices)" if level == "patient" else "")
    report = {"data": where, "split": None if data else str(Path(split_dir).resolve()),
              "images": len(split.entries), "bootstrap": n_boot, "seed": seed,
              "tta": tta, "level": level, **({"aggregate": aggregate} if level == "patient" else {}),
              "grouped_bootstrap": level == "slice" and len(set(groups)) < len(groups),
              "results": results,
              "notes": sorted(notes),
              **({"explanations": explained} if explain else {})}
    return write_evaluation(out_dir, report, curves, negative)

