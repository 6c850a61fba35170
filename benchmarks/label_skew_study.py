"""Label skew: FedAvg, FedProx, SCAFFOLD and the local prior corrections.

    python benchmarks/label_skew_study.py --work DIR [--part synth covid] [--draws 1 2 3]
                                          [--all-draws NAME ...] [--rounds 10]
                                          [--local-epochs 1] [--only NAME ...] [--table-only]

Two parts, each a grid of federated runs from the same start:

- synth: `fedct synth` (1600 slices of 400 patients, 64 px), split by patient 60/25/15,
  10 clients; partitions "one class" (shards, each client holds one class) and Dirichlet
  0.1. Starts from the shared ImageNet weights; "centralised" trains on all train rows
  for as many epochs as the federated runs have rounds.
- covid: COVID-CT's official train/val, 5 clients, Dirichlet 0.5 and 0.1 drawn with
  split seeds --draws; starts from DIR/covid/stage1/best (made here if absent: a central
  fine-tune on client 0 of an IID split, the public share of the two-stage design). Every
  method runs on the first draw; the later draws run FedAvg, the combination and the
  methods named by --all-draws. The "iid" row is FedAvg on an IID split (seed 1).

Methods: fedavg, fedprox (mu 0.01), scaffold, balanced-softmax, fedlc (tau 1), fedrs
(alpha 0.5), and "combination": the better of fedprox/scaffold with the best of the three
local losses, both chosen by mean val AUC over the part's runs on its first draw (chosen
on val, as everything here). The synth part adds FedAvg and SCAFFOLD with `freeze_bn`
(BatchNorm statistics fixed during local training) on its one-class clients, and with
SGD (lr 0.01, Nesterov momentum 0.9; SCAFFOLD's analysis assumes SGD) at Dirichlet 0.1. Every run
validates on the coordinator's val rows: best round by val AUC, threshold by the
equal-error rule (eer) on those rows, and reports accuracy at that threshold and at 0.5,
sensitivity, specificity and AUC of the best round.
With --work DIR finished runs (report.json) are reused. Needs ../shared.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path

from fedct.config import FederateConfig, PretrainConfig
from fedct.configure import build_config
from fedct.data.manifest import SplitOptions, run_split
from fedct.data.synthetic import write_synthetic
from fedct.federated.simulation import run_federate
from fedct.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COVID = SHARED / "data" / "covid-ct" / "splits.csv"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_in1k.safetensors"
SINGLE = {
    "fedavg": {},
    "fedprox": {"strategy": "fedprox", "mu": 0.01},
    "scaffold": {"strategy": "scaffold"},
    "balanced-softmax": {"local_loss": "balanced-softmax"},
    "fedlc": {"local_loss": "fedlc"},
    "fedrs": {"local_loss": "fedrs"},
}
STRATEGIES, LOSSES = ("fedprox", "scaffold"), ("balanced-softmax", "fedlc", "fedrs")
# synth only, each on one partition: BatchNorm in eval mode during local training, so a
# client whose batches hold one class does not normalise the class signal away
# (`freeze_bn`); and SGD, the optimiser SCAFFOLD's analysis assumes (AdamW elsewhere)
VARIANTS = {"fedavg, frozen BN": ("one class", {"freeze_bn": True}),
            "scaffold, frozen BN": ("one class", {"strategy": "scaffold", "freeze_bn": True}),
            "fedavg, SGD": ("dirichlet 0.1", {"optimizer": "sgd", "lr": 0.01}),
            "scaffold, SGD": ("dirichlet 0.1", {"strategy": "scaffold", "optimizer": "sgd",
                                                "lr": 0.01})}


def best_figures(run_dir: Path) -> dict:
    """The best round's (or epoch's) val figures, and the run's training seconds."""
    best = json.loads((run_dir / "report.json").read_text())["best"]
    with (run_dir / "summary.csv").open() as handle:
        seconds = sum(float(r["seconds"]) for r in csv.DictReader(handle))
    return {"acc_thr": best["thr_acc"], "acc_half": best["val_acc"], "auc": best["val_auc"],
            "sens": best["thr_sensitivity"], "spec": best["thr_specificity"],
            "threshold": best["threshold"], "seconds": round(seconds, 1)}


def combination(results: dict[str, list[dict]]) -> dict:
    """The better strategy with the best local loss, by mean val AUC over first-draw runs."""
    def mean_auc(name):
        return statistics.mean(r["auc"] for r in results[name])

    strategy = max(STRATEGIES, key=mean_auc)
    loss = max(LOSSES, key=mean_auc)
    return {"name": f"{strategy}+{loss}", **SINGLE[strategy], **SINGLE[loss]}


def federate(split: Path, run_dir: Path, overrides: dict, init: str, *, run: bool = True):
    """The run's figures, running it first unless it has finished (None: not run)."""
    if not (run_dir / "report.json").is_file():
        if not run:
            return None
        run_federate(split, run_dir, build_config(FederateConfig, None, overrides), init=init,
                     quiet=True, force=True)
        print(f"{run_dir}: done", file=sys.stderr, flush=True)
    return best_figures(run_dir)


COVID_SETTINGS = {"image_size": 128, "aug_scale_min": 0.5, "aug_rotation": 15}


def covid_inputs(work: Path, common: dict, draws: list[int], alphas=(0.5, 0.1)):
    """COVID-CT's splits (5 clients: Dirichlet `alphas` drawn with seeds `draws`, and IID) and
    the stage-1 model they start from, made under work/covid where absent; returns
    ([(partition, draw, split dir)], the IID split dir, the init checkpoint)."""
    splits = []
    for draw in draws:
        for alpha in alphas:
            path = work / "covid" / f"split-dir{alpha}-s{draw}"
            if not (path / "split.yaml").is_file():
                run_split(COVID, path, SplitOptions(keep_split=True, clients=5,
                                                    scheme="dirichlet", alpha=alpha, seed=draw))
            splits.append((f"dirichlet {alpha}", draw, path))
    iid = work / "covid" / "split-iid"
    if not (iid / "split.yaml").is_file():
        run_split(COVID, iid, SplitOptions(keep_split=True, clients=5, scheme="iid", seed=1))
    stage1 = work / "covid" / "stage1"
    if not (stage1 / "report.json").is_file():
        run_pretrain(iid, stage1, build_config(PretrainConfig, None, {
            **{k: common[k] for k in ("model", "batch_size", "seed", "lr", "threshold",
                                      "image_size", "aug_scale_min", "aug_rotation")},
            "pretrained": str(WEIGHTS), "epochs": 30, "clients": [0]}), quiet=True, force=True)
    return splits, iid, str(stage1 / "best")


def common_settings(args) -> dict:
    """The settings every federated run of the studies shares."""
    return {"model": "tf_efficientnet_lite0", "batch_size": 32, "seed": 0, "lr": 1e-3,
            "lr_schedule": "cosine", "rounds": args.rounds, "local_epochs": args.local_epochs,
            "val": "pooled", "monitor": "val_auc", "threshold": "eer"}


def run_part(part: str, args, work: Path) -> list[dict]:
    """Every run of one part: rows of (partition, method, draw, figures)."""
    rows = []
    common = common_settings(args)
    if part == "synth":
        data = work / "synth" / "data"
        if not (data / "dataset.csv").is_file():
            write_synthetic(data, n=1600, size=64, seed=0, difficulty=0.5, sites=4)
        common.update(image_size=64)
        partitions = {"one class": SplitOptions(scheme="shards", clients=10, classes_per_client=1,
                                                fractions=(0.6, 0.25, 0.15), seed=1),
                      "dirichlet 0.1": SplitOptions(scheme="dirichlet", alpha=0.1, clients=10,
                                                    fractions=(0.6, 0.25, 0.15), seed=1)}
        splits = [(name, 1, work / "synth" / name.replace(" ", "-")) for name in partitions]
        for name, _, path in splits:
            if not (path / "split.yaml").is_file():
                run_split(data / "dataset.csv", path, partitions[name])
        init = str(WEIGHTS)
        central = work / "synth" / "centralised"
        if not (central / "report.json").is_file():
            run_pretrain(splits[0][2], central, build_config(PretrainConfig, None, {
                **{k: common[k] for k in ("model", "batch_size", "seed", "lr", "threshold")},
                "image_size": 64, "pretrained": init, "epochs": args.rounds * args.local_epochs}),
                quiet=True, force=True)
        rows.append(("-", "centralised", 0, best_figures(central)))
    else:
        common.update(COVID_SETTINGS)
        splits, iid, init = covid_inputs(work, common, args.draws)
        central = work / "covid" / "centralised"  # optional: a central run on all train rows
        if (central / "report.json").is_file():
            rows.append(("-", "centralised", 0, best_figures(central)))
        figures = federate(iid, work / "covid" / "iid", common, init, run=not args.table_only)
        if figures:
            rows.append(("iid", "fedavg", 1, figures))
    first = min(args.draws) if part == "covid" else 1
    results: dict[str, list[dict]] = {}
    chosen = None
    # the first draw's runs (which choose the combination) before the later draws'
    work_list = [(phase, split) for later in (False, True)
                 for phase in ("single", "combination", "variants")
                 for split in splits if (split[1] != first) == later]
    for phase, (partition, draw, path) in work_list:
        if phase == "variants" and part != "synth":
            continue
        if phase == "combination" and chosen is None:
            if not all(name in results for name in (*STRATEGIES, *LOSSES)):
                continue
            chosen = combination(results)
        methods = (SINGLE if phase == "single" else {chosen["name"]: chosen}
                   if phase == "combination" else
                   {name: settings for name, (on, settings) in VARIANTS.items() if on == partition})
        for method, settings in methods.items():
            label = "combination" if phase == "combination" else method
            if draw != first and label not in ("fedavg", "combination", *args.all_draws):
                continue
            if args.only and label not in args.only:
                continue
            overrides = {**common, **{k: v for k, v in settings.items() if k != "name"}}
            run_dir = path.parent / f"{path.name}-{method.replace(', ', '-').replace(' ', '-')}"
            figures = federate(path, run_dir, overrides, init, run=not args.table_only)
            if figures is None:
                continue
            if draw == first:
                results.setdefault(method, []).append(figures)
            rows.append((partition, f"{method} (combination)" if phase == "combination"
                         else method, draw, figures))
    return rows


def summarise(rows: list) -> list[str]:
    """Markdown rows: one per partition and method, mean and range over the draws."""
    table = ["| partition | method | draws | acc at threshold (range) | acc at 0.5 | AUC (range) "
             "| sens / spec at threshold |", "| --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict = {}
    for partition, method, _, figures in rows:
        groups.setdefault((partition, method), []).append(figures)
    def mean(runs, key):
        return statistics.mean(r[key] for r in runs)

    def span(runs, key):
        values = [r[key] for r in runs]
        return f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""

    for (partition, method), runs in groups.items():
        table.append(f"| {partition} | {method} | {len(runs)} | {mean(runs, 'acc_thr'):.3f}"
                     f"{span(runs, 'acc_thr')} | {mean(runs, 'acc_half'):.3f} | "
                     f"{mean(runs, 'auc'):.3f}{span(runs, 'auc')} | {mean(runs, 'sens'):.3f} / "
                     f"{mean(runs, 'spec'):.3f} |")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--part", nargs="*", default=["synth", "covid"], choices=("synth", "covid"))
    parser.add_argument("--draws", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--all-draws", nargs="*", default=[],
                        help="covid: methods besides fedavg and the combination run on every draw")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--table-only", action="store_true",
                        help="print the tables of the finished runs, run nothing")
    args = parser.parse_args()
    if not COVID.is_file() or not WEIGHTS.is_file():
        print(f"needs {COVID} and {WEIGHTS}", file=sys.stderr)
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEDCT_CACHE", str(args.work / "cache"))
    for part in args.part:
        rows = run_part(part, args, args.work)
        (args.work / f"label_skew_{part}.json").write_text(json.dumps(rows, indent=1))
        print(f"\n### {part}: {args.rounds} rounds x {args.local_epochs} local epochs\n")
        print("\n".join(summarise(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
