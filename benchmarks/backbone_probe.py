"""Which ImageNet backbone and input size give the strongest frozen features on COVID-CT?

    python benchmarks/backbone_probe.py [--models lite0,lite1,lite2] [--sizes 128,224,native]
                                        [--folds 5] [--seed 0] [--weights FILE]

For each backbone and size: the pre-logit features of every official train + val image
(fedct's own decode, resize and normalisation; the official test images are not used),
then a linear probe (scikit-learn's logistic regression, its C chosen by an inner grouped
cross-validation on each outer training part) scored by k-fold cross-validation over the
train + val images, grouped by the README's COVID-CT group rule (the medRxiv paper, or the
`N%K` source: one source never straddles two folds) and stratified by class. Prints the
mean fold AUC and accuracy (threshold 0.5) with their spread across folds, and, for
contrast with earlier figures, the probe trained on official train and scored on official
val with a Hanley-McNeil interval. Needs ../shared (COVID-CT and the ImageNet weights).
`--weights FILE` probes other weights of the one model named, e.g. the backbone
`fedct selfsup` wrote (RUN/backbone.safetensors).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedct.data.loading import SplitImages, make_transform
from fedct.data.manifest import SplitOptions, load_split, run_split
from fedct.federated.features import compute_features
from fedct.metrics import roc_auc
from fedct.model_card import auc_interval
from fedct.models import create_model, data_config
from fedct.training import set_threads

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COVID = SHARED / "data" / "covid-ct" / "splits.csv"
GROUPS = r"^(\d{4}\.\d{2}\.\d{2}\.\d+)-p|^(\d+)%|^(.+)\."  # the README's COVID-CT rule
NATIVE = {"lite0": 224, "lite1": 240, "lite2": 260}
C_GRID = np.logspace(-4, 3, 15)


def features_of(name: str, size: int, split, weights: Path | None = None):
    """Pre-logit features of every image, and the seconds they took."""
    weights = weights or SHARED / "weights" / f"tf_efficientnet_{name}_in1k.safetensors"
    model = create_model(f"tf_efficientnet_{name}", 2, pretrained=str(weights))
    images = SplitImages(split, size)
    dataset = images.dataset(split.entries, make_transform(data_cfg=data_config(model, size),
                                                           train=False, config=None))
    tick = time.perf_counter()
    out = compute_features(model, dataset, views=1, seed=0, device=torch.device("cpu"),
                           channels_last=True)[:, 0].numpy()
    return out, time.perf_counter() - tick


def train_val(tmp: Path):
    """COVID-CT's official train + val rows (a split made in `tmp`), their labels (1 for the
    positive class, else 0) and source groups."""
    split_dir = tmp / "split"
    run_split(COVID, split_dir, SplitOptions(keep_split=True, clients=1, seed=1),
              group_pattern=GROUPS)
    split = load_split(split_dir)
    split = split.subset([e for e in split.entries if e.split in ("train", "val")])
    positive = split.classes.index(split.positive)
    y = np.array([int(split.classes.index(e.row.label) == positive) for e in split.entries])
    return split, y, np.array([e.row.group for e in split.entries])


def nested_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int):
    """A probe whose C is chosen by grouped 3-fold cross-validation on (x, y) alone."""
    inner = list(StratifiedGroupKFold(3, shuffle=True, random_state=seed).split(x, y, groups))
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=C_GRID, l1_ratios=(0.0,), cv=inner, scoring="roc_auc", max_iter=5000,
        random_state=seed, use_legacy_attributes=True))
    return model.fit(x, y)


def cross_validate(x, y, groups, folds: int, seed: int) -> dict:
    aucs, accs, chosen = [], [], []
    outer = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    for train, test in outer.split(x, y, groups):
        model = nested_probe(x[train], y[train], groups[train], seed)
        score = model.predict_proba(x[test])[:, 1]
        aucs.append(roc_auc(y[test] == 1, score))
        accs.append(float(np.mean((score >= 0.5) == (y[test] == 1))))
        chosen.append(float(model[-1].C_[0]))
    return {"auc": (float(np.mean(aucs)), float(np.std(aucs, ddof=1))),
            "acc": (float(np.mean(accs)), float(np.std(accs, ddof=1))),
            "C": float(np.median(chosen))}


def official_val(x, y, groups, is_train, seed: int) -> tuple[float, float, float, float]:
    model = nested_probe(x[is_train], y[is_train], groups[is_train], seed)
    score = model.predict_proba(x[~is_train])[:, 1]
    truth = y[~is_train] == 1
    auc = roc_auc(truth, score)
    low, high = auc_interval(auc, int(truth.sum()), int((~truth).sum()))
    return auc, low, high, float(np.mean((score >= 0.5) == truth))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="lite0,lite1,lite2")
    parser.add_argument("--sizes", default="128,224,native")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, help="other weights for the one model named")
    args = parser.parse_args()
    if args.weights and "," in args.models:
        parser.error("--weights needs exactly one --models")
    if not COVID.is_file():
        print(f"needs {COVID}", file=sys.stderr)
        return 1
    set_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FEDCT_CACHE", str(Path(tmp) / "cache"))
        split, y, groups = train_val(Path(tmp))
        is_train = np.array([e.split == "train" for e in split.entries])
        for name in args.models.split(","):
            sizes = [NATIVE[name] if s == "native" else int(s) for s in args.sizes.split(",")]
            for size in dict.fromkeys(sizes):  # lite0's native size is 224: once
                x, seconds = features_of(name, size, split, args.weights)
                cv = cross_validate(x, y, groups, args.folds, args.seed)
                val = official_val(x, y, groups, is_train, args.seed)
                rows.append((name, size, cv, val, seconds))
                print(f"{name} {size}: fold AUC {cv['auc'][0]:.3f} +- {cv['auc'][1]:.3f}",
                      file=sys.stderr, flush=True)
    source = f"{args.weights}" if args.weights else "ImageNet"
    print(f"\n### Linear probe on frozen {source} features, COVID-CT train + val "
          f"({len(y)} images, {len(set(groups))} source groups), {args.folds}-fold grouped "
          f"cross-validation, seed {args.seed}\n")
    print("| backbone | input | fold AUC (mean +- sd) | fold accuracy at 0.5 | median C "
          "| official val AUC [95% CI] | val accuracy | features |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, size, cv, val, seconds in rows:
        print(f"| tf_efficientnet_{name} | {size} | {cv['auc'][0]:.3f} +- {cv['auc'][1]:.3f} "
              f"| {cv['acc'][0]:.3f} +- {cv['acc'][1]:.3f} | {cv['C']:.3g} "
              f"| {val[0]:.3f} [{val[1]:.2f}, {val[2]:.2f}] | {val[3]:.3f} | {seconds:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
