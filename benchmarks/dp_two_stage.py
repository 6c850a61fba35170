"""DP on the strongest stage 1 we have: the two-stage design, cross-validated on COVID-CT.

    python benchmarks/dp_two_stage.py --work DIR [--folds 5] [--only-folds 0,1]
        [--size 128] [--epochs 10] [--arms head,dp8,dp3,dp1,dp8-norms,fedavg]
        [--set optimizer=sgd --set lr=0.5 --tag sgd]

Each fold of the 5-fold grouped cut of the official train + val images (the cut of
benchmarks/backbone_finetune.py: same splits, same `--work`) is the scored val. Its
training part is cut in two by source group (stratified by class): the public half trains
stage 1 centrally (`fedct pretrain`, examples/covid-pretrain.yaml at `--size` for
`--epochs`), the private half is spread over 5 IID clients that run stage 2 from stage 1's
last checkpoint (`fedct federate --init RUN/last`):

- head: the DP configuration's head-only training (cached features, full batches) without
  noise, with the DP study's AdamW at lr 0.01 (benchmarks/dp_study.py);
- dp8 / dp3 / dp1: examples/covid-federate-dp.yaml at epsilon 8, 3 and 1 (head only), with
  that AdamW (`--set optimizer=sgd --set lr=...` for the SGD arms);
- dp8-norms: DP training of the head and every normalisation layer's scale and shift at
  epsilon 8, with that mode's settings from the same file;
- fedavg: non-DP FedAvg of the whole network, examples/covid-federate.yaml at `--size`;
- central (only when named in --arms): the same recipe on the private half held by one
  client, its rounds epochs of central training: the centralised figure that federated
  training is measured against;
- dirichlet (only when named): the same recipe over 5 clients with Dirichlet(0.5) label
  skew.

`--set KEY=VALUE` changes a stage-2 option of every arm but fedavg (`--tag` names those
runs). Every figure is the last round's (or stage 1's last epoch's) AUC on the fold, so nothing is
chosen on the rows it is scored on; mean +- sd over folds and the mean paired difference
from the run's own stage 1. Each DP run's epsilons are recomputed independently (as in
benchmarks/dp_study.py). Runs in `--work` are reused; the official test images are never
read.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from backbone_finetune import COVID, ROOT, SHARED, fold_split, spread
from dp_study import checked_max_epsilon
from sklearn.model_selection import StratifiedGroupKFold

from fedct.config import FederateConfig, PretrainConfig
from fedct.configure import build_config
from fedct.data.manifest import SplitOptions, load_split, run_split
from fedct.federated.simulation import run_federate
from fedct.pretrain import run_pretrain

EXAMPLES = ROOT / "examples"
ADAMW = {"optimizer": "adamw", "lr": 0.01}  # the DP study's head settings, chosen on val
ARMS = {
    "head": (EXAMPLES / "covid-federate-dp.yaml", {**ADAMW, "dp": False, "freeze": "head"}),
    "dp8": (EXAMPLES / "covid-federate-dp.yaml", {**ADAMW, "target_epsilon": 8.0}),
    "dp3": (EXAMPLES / "covid-federate-dp.yaml", {**ADAMW, "target_epsilon": 3.0}),
    "dp1": (EXAMPLES / "covid-federate-dp.yaml", {**ADAMW, "target_epsilon": 1.0}),
    "dp8-norms": (EXAMPLES / "covid-federate-dp.yaml", {  # the norms mode's chosen settings
        "target_epsilon": 8.0, "dp_train": "norms", "optimizer": "adamw", "lr": 0.003,
        "local_steps": 1}),
    "fedavg": (EXAMPLES / "covid-federate.yaml", {}),
    "central": (EXAMPLES / "covid-federate.yaml", {}),
    "dirichlet": (EXAMPLES / "covid-federate.yaml", {}),
}
WHOLE_NETWORK = ("fedavg", "central", "dirichlet")  # the example's recipe, no --set levers
PRIVATE = {"central": {"clients": 1}, "dirichlet": {"scheme": "dirichlet", "alpha": 0.5}}


def private_split(work: Path, fold_dir: Path, arm: str, seed: int) -> Path:
    """The private half as the arm holds it: over 5 IID clients, in one client (central)
    or over 5 Dirichlet(0.5) clients; made once from halves()' private.csv."""
    private = halves(work, fold_dir, seed)[1]
    if arm not in PRIVATE:
        return private
    out = private.parent / f"private-{arm}-split"
    if not (out / "split.yaml").is_file():
        run_split(private.parent / "private.csv", out, SplitOptions(**{
            "keep_split": True, "clients": 5, "scheme": "iid", "seed": seed, **PRIVATE[arm]}))
    return out


def halves(work: Path, fold_dir: Path, seed: int) -> tuple[Path, Path]:
    """Stage 1's split (the public half + the fold) and stage 2's (the private half over 5
    clients + the fold), made once from the fold's split."""
    out = work / "two-stage" / fold_dir.name
    public, private = out / "public-split", out / "private-split"
    if (public / "split.yaml").is_file() and (private / "split.yaml").is_file():
        return public, private
    split = load_split(fold_dir)
    train = [e for e in split.entries if e.split == "train"]
    val = [e for e in split.entries if e.split == "val"]
    labels = [e.row.label for e in train]
    groups = [e.row.group for e in train]
    cut = StratifiedGroupKFold(2, shuffle=True, random_state=seed)
    public_idx, _ = next(cut.split(np.zeros(len(train)), labels, groups))
    chosen = set(public_idx.tolist())
    out.mkdir(parents=True, exist_ok=True)
    for folder in {Path(e.row.path).parts[0] for e in split.entries}:
        link = out / folder
        if not link.exists():
            link.symlink_to(split.root / folder)
    for name, rows in (("public", [e for i, e in enumerate(train) if i in chosen]),
                       ("private", [e for i, e in enumerate(train) if i not in chosen])):
        with (out / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "class", "label", "group", "split"])
            for entry in rows:
                writer.writerow([entry.row.path, entry.row.label,
                                 split.classes.index(entry.row.label), entry.row.group, "train"])
            for entry in val:
                writer.writerow([entry.row.path, entry.row.label,
                                 split.classes.index(entry.row.label), entry.row.group, "val"])
    run_split(out / "public.csv", public, SplitOptions(keep_split=True, clients=1, seed=seed))
    run_split(out / "private.csv", private,
              SplitOptions(keep_split=True, clients=5, scheme="iid", seed=seed))
    return public, private


def last_row(run_dir: Path) -> dict:
    with (run_dir / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))[-1]


def stage1(split: Path, run_dir: Path, size: int, epochs: int, seed: int) -> dict:
    if not (run_dir / "report.json").is_file():
        resume = (run_dir / "resume.pt").is_file()
        config = build_config(PretrainConfig, EXAMPLES / "covid-pretrain.yaml", {
            "pretrained": str(SHARED / "weights" / "tf_efficientnet_lite0_in1k.safetensors"),
            "image_size": size, "epochs": epochs, "seed": seed})
        run_pretrain(split, run_dir, config, resume=resume, force=not resume, quiet=True)
    report = json.loads((run_dir / "report.json").read_text())
    return {"auc": report["last"]["val_auc"], "acc": report["last"]["val_acc"],
            "seconds": report["train_seconds"]}


def stage2(split: Path, run_dir: Path, arm: str, size: int, init: Path, levers: dict) -> dict:
    config_file, overrides = ARMS[arm]
    overrides = ({**overrides, "image_size": size} if arm in WHOLE_NETWORK
                 else {**overrides, **levers})
    if not (run_dir / "report.json").is_file():
        start = time.perf_counter()
        run_federate(split, run_dir, build_config(FederateConfig, config_file, overrides),
                     init=str(init), quiet=True, force=True)
        (run_dir / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    last = last_row(run_dir)
    out = {"auc": float(last["val_auc"]), "acc": float(last["val_acc"]),
           "seconds": json.loads((run_dir / "wall.json").read_text())["seconds"]}
    if (run_dir / "privacy.csv").is_file():
        out["epsilon"] = checked_max_epsilon(run_dir, split)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only-folds", default="")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--arms", default=",".join(a for a in ARMS if a not in PRIVATE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.set and not args.tag:
        parser.error("--set needs --tag, so the arm's runs are kept apart from the plain ones")
    levers = dict(item.split("=", 1) for item in args.set)
    if not COVID.is_file():
        print(f"needs {COVID}", file=sys.stderr)
        return 1
    os.environ.setdefault("FEDCT_CACHE", str(args.work / "cache"))
    arms = args.arms.split(",")
    folds = [int(f) for f in args.only_folds.split(",")] if args.only_folds else range(args.folds)
    named = {a: a if a in WHOLE_NETWORK or not args.tag else f"{a}-{args.tag}" for a in arms}
    results: dict[str, list[dict]] = {"stage 1": [], **{named[a]: [] for a in arms}}
    for fold in folds:
        fold_dir = fold_split(args.work, args.folds, fold, args.seed)
        public, _ = halves(args.work, fold_dir, args.seed)
        runs = args.work / "runs" / f"two-stage-{args.size}-e{args.epochs}" / f"fold{fold}"
        results["stage 1"].append(stage1(public, runs / "stage1", args.size, args.epochs,
                                         args.seed))
        for arm in arms:
            private = private_split(args.work, fold_dir, arm, args.seed)
            results[named[arm]].append(stage2(private, runs / named[arm], arm, args.size,
                                              runs / "stage1" / "last", levers))
            print(f"fold {fold} {named[arm]}: AUC {results[named[arm]][-1]['auc']:.3f} (stage 1 "
                  f"{results['stage 1'][-1]['auc']:.3f})", file=sys.stderr, flush=True)
    base = np.array([r["auc"] for r in results["stage 1"]])
    print(f"\n### Two-stage on COVID-CT, {len(base)} of {args.folds} grouped folds: stage 1 "
          f"on the public half of each fold's training part, stage 2 on the private half "
          f"(over 5 IID clients unless the arm says otherwise); lite0 at {args.size} px; "
          f"last round / epoch on the fold"
          f"{'; ' + ', '.join(args.set) if args.set else ''}\n")
    print("| arm | fold AUC | vs stage 1 (paired) | fold accuracy at 0.5 | max epsilon "
          "| minutes per fold |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arm, rows in results.items():
        aucs = np.array([r["auc"] for r in rows])
        epsilon = f"{max(r['epsilon'] for r in rows):.2f}" if "epsilon" in rows[0] else "-"
        print(f"| {arm} | {spread(aucs)} | {np.mean(aucs - base):+.3f} "
              f"| {spread([r['acc'] for r in rows])} | {epsilon} "
              f"| {np.mean([r['seconds'] for r in rows]) / 60:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
