"""Full fine-tunes of lite0 / lite1 / lite2 on COVID-CT, compared by grouped k-fold
cross-validation over the official train + val images (never the official test images).

    python benchmarks/backbone_finetune.py --work DIR [--models lite0,lite1,lite2]
        [--sizes 128] [--folds 5] [--epochs 10] [--config examples/covid-pretrain.yaml]
        [--set mixup_alpha=0.2 --set average_last=3 --tag mix] [--tta]

Each arm (backbone, input size) is `fedct pretrain` once per fold on a split made by
`fedct split --keep-split --folds K --fold I` with the README's COVID-CT group rule (one
medRxiv paper or `N%K` source never straddles two folds). A run that is already in `--work`
is reused, and one cut short is resumed, so a long study runs in parts. Prints, per arm,
the fold val AUC and accuracy (threshold 0.5) of the last epoch (mean +- sd over folds:
nothing chosen on the fold's own val) and of the best epoch by val AUC (optimistic: the
epoch is chosen on the rows it is scored on), and the seconds per epoch.

`--set KEY=VALUE` changes any stage-1 option for the arm (a recipe lever; `--tag` names the
arm's runs); `--tta` also scores each fold's last checkpoint on the mean of each val image
and its mirror; with `average_last` the mean of the last K epochs' weights (RUN/averaged) is
scored too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from fedct.config import PretrainConfig
from fedct.configure import build_config
from fedct.data.manifest import SplitOptions, run_split
from fedct.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COVID = SHARED / "data" / "covid-ct" / "splits.csv"
GROUPS = r"^(\d{4}\.\d{2}\.\d{2}\.\d+)-p|^(\d+)%|^(.+)\."  # the README's COVID-CT rule
NATIVE = {"lite0": 224, "lite1": 240, "lite2": 260}


def fold_split(work: Path, folds: int, fold: int, seed: int) -> Path:
    out = work / "splits" / f"fold{fold}-of-{folds}"
    if not (out / "split.yaml").is_file():
        run_split(COVID, out, SplitOptions(keep_split=True, folds=folds, fold=fold, clients=1,
                                           seed=seed), group_pattern=GROUPS)
    return out


def train(split_dir: Path, run_dir: Path, config: PretrainConfig) -> dict:
    """The fold's run: reused when finished, resumed when cut short."""
    if not (run_dir / "report.json").is_file():
        resume = (run_dir / "resume.pt").is_file()
        run_pretrain(split_dir, run_dir, config, resume=resume, force=not resume, quiet=True)
    return json.loads((run_dir / "report.json").read_text())


def tta_auc(split_dir: Path, run_dir: Path) -> float:
    """Val AUC of the run's last checkpoint with test-time mirroring."""
    from fedct.data.loading import SplitImages, make_loader, make_transform
    from fedct.data.manifest import load_split
    from fedct.evaluation import load_model
    from fedct.metrics import positive_index, summary_metrics
    from fedct.training import predict

    split = load_split(split_dir)
    model, meta = load_model(run_dir / "last")
    rows = split.select(split="val")
    images = SplitImages(split, int(meta["input_size"][-1]))
    dataset = images.dataset(rows, make_transform(data_cfg=meta, train=False, config=None))
    probs, truth = predict(model, make_loader(dataset, batch_size=64, train=False, seed=0),
                           device=torch.device("cpu"), tta=True)
    return summary_metrics(probs, truth, positive_index(split.classes, split.positive))["auc"]


def spread(values: list[float]) -> str:
    values = np.asarray(values, dtype=float)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return f"{values.mean():.3f} +- {sd:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--models", default="lite0,lite1,lite2")
    parser.add_argument("--sizes", default="128")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only-folds", default="", help="run these folds only, e.g. 0,1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "covid-pretrain.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a stage-1 option for every run of the arm (repeatable)")
    parser.add_argument("--tag", default="", help="names the arm's runs (with --set)")
    parser.add_argument("--tta", action="store_true", help="also score the last epoch with TTA")
    args = parser.parse_args()
    if not COVID.is_file():
        print(f"needs {COVID}", file=sys.stderr)
        return 1
    os.environ.setdefault("FEDCT_CACHE", str(args.work / "cache"))
    if args.set and not args.tag:
        parser.error("--set needs --tag, so the arm's runs are kept apart from the plain ones")
    levers = dict(item.split("=", 1) for item in args.set)
    folds = [int(f) for f in args.only_folds.split(",")] if args.only_folds else range(args.folds)
    rows = []
    for name in args.models.split(","):
        for size_name in args.sizes.split(","):
            size = NATIVE[name] if size_name == "native" else int(size_name)
            weights = SHARED / "weights" / f"tf_efficientnet_{name}_in1k.safetensors"
            config = build_config(PretrainConfig, args.config, {
                "model": f"tf_efficientnet_{name}", "pretrained": str(weights),
                "image_size": size, "epochs": args.epochs, "seed": args.seed, **levers})
            reports = []
            for fold in folds:
                split_dir = fold_split(args.work, args.folds, fold, args.seed)
                arm = f"{name}-{size}-e{args.epochs}" + (f"-{args.tag}" if args.tag else "")
                run_dir = args.work / "runs" / arm / f"fold{fold}"
                reports.append(train(split_dir, run_dir, config))
                if args.tta:
                    reports[-1]["tta_auc"] = tta_auc(split_dir, run_dir)
                print(f"{name} {size} fold {fold}: last AUC {reports[-1]['last']['val_auc']:.3f}",
                      file=sys.stderr, flush=True)
            rows.append((name, size, reports))
    print(f"\n### Full fine-tune, COVID-CT train + val, {args.folds}-fold grouped "
          f"cross-validation ({len(list(folds))} folds run), {args.epochs} epochs, "
          f"{args.config.name}{' + ' + ', '.join(args.set) if args.set else ''}\n")
    print("| backbone | input | last-epoch AUC | last-epoch accuracy at 0.5 | TTA AUC "
          "| averaged AUC | best-epoch AUC (optimistic) | s / epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, size, reports in rows:
        seconds = [r["train_seconds"] / max(1, r["last"]["epoch"]) for r in reports]
        tta = spread([r["tta_auc"] for r in reports]) if args.tta else "-"
        averaged = (spread([r["averaged"]["val_auc"] for r in reports])
                    if all(r.get("averaged") for r in reports) else "-")
        print(f"| tf_efficientnet_{name} | {size} "
              f"| {spread([r['last']['val_auc'] for r in reports])} "
              f"| {spread([r['last']['val_acc'] for r in reports])} | {tta} | {averaged} "
              f"| {spread([r['best']['val_auc'] for r in reports])} | {np.mean(seconds):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
