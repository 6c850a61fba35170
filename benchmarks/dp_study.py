"""DP that keeps accuracy: head / norms / full at epsilon 1, 3 and 8 on COVID-CT.

    python benchmarks/dp_study.py --work DIR [--phase tune grid] [--table-only]

Uses the label skew study's COVID-CT inputs (benchmarks/label_skew_study.py: the same IID
split, Dirichlet 0.5 draw 1 and stage-1 model, made under DIR/covid where absent); its non-DP
FedAvg runs on those two partitions (DIR/covid/iid, DIR/covid/split-dir0.5-s1-fedavg) are
the baselines, run here when absent. Every DP run is 10 rounds of full-batch DP
(`batch_size: all`, every client example in every step), delta 1e-5, AdamW with a cosine lr.

- tune: on the IID split at epsilon 3, each mode's candidates (TUNING); the one with the best
  val AUC (best round) becomes the mode's setting (CHOSEN below, and the example config
  examples/covid-federate-dp.yaml). Tuning on val spends no privacy only because this is a
  simulation: a real federation pays for every run it makes.
- grid: IID and Dirichlet 0.5 x epsilon 1, 3, 8 x head, norms, full with the chosen settings,
  and the head's settings without DP (`freeze: head`): what head-only training can reach.

Every run reports its best round's (by pooled val AUC) val accuracy at the equal-error
threshold chosen on val and at 0.5, the AUC with a 95% bootstrap interval over patients
(`fedct evaluate`), and its wall time; and every client's final epsilon in privacy.csv is
recomputed from scratch (Opacus's RDP analysis functions, the rate from the client's row
count in the split, the steps from the run's config) and must agree to 1e-6 relative.
With --work DIR finished runs are reused. Needs ../shared.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import yaml
from label_skew_study import COVID, COVID_SETTINGS, WEIGHTS, common_settings, covid_inputs

from fedct.config import FederateConfig, batch_for
from fedct.configure import build_config
from fedct.data.manifest import load_split
from fedct.evaluation import run_evaluate
from fedct.federated.simulation import run_federate

DP = {"dp": True, "delta": 1e-5, "batch_size": "all", "max_grad_norm": 1.0,
      "lr_schedule": "cosine", "rounds": 10}
TUNING = {  # candidates per mode, tried on IID at epsilon 3
    "head": [{"lr": lr, "local_steps": steps, "feature_views": views}
             for lr in (0.01, 0.05) for steps in (5, 20) for views in (1, 8)],
    "norms": [{"lr": lr, "local_steps": 1} for lr in (3e-3, 1e-2)],
    "full": [{"lr": lr, "local_steps": 1, "freeze_bn": True} for lr in (3e-4, 1e-3)],
}
EPSILONS = (8.0, 3.0, 1.0)
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus RDP's defaults


def name_of(mode: str, settings: dict) -> str:
    return mode + "".join(f"-{k.replace('_', '')}{v}" for k, v in sorted(settings.items()))


def independent_epsilons(run_dir: Path, split_dir: Path) -> list[tuple[float, float]]:
    """(privacy.csv epsilon, recomputed epsilon) of every client's last row."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    config = yaml.safe_load((run_dir / "config.yaml").read_text())["config"]
    split = load_split(split_dir)
    with (run_dir / "privacy.csv").open() as handle:
        last = {row["client"]: row for row in csv.DictReader(handle) if row["status"] == "trained"}
    pairs = []
    for client, row in last.items():
        n = sum(1 for e in split.entries if e.client == int(client) and e.split == "train")
        batch = batch_for(n, config["batch_size"])
        per_round = config["local_steps"] or config["local_epochs"] * math.ceil(n / batch)
        steps = int(row["round"]) * per_round  # every client trains in every round here
        assert steps == int(row["steps"]), (run_dir, client)
        rdp = compute_rdp(q=1 / math.ceil(n / batch), noise_multiplier=float(row["noise_multiplier"]),
                          steps=steps, orders=ORDERS)
        pairs.append((float(row["epsilon"]), float(get_privacy_spent(orders=ORDERS, rdp=rdp,
                                                                      delta=config["delta"])[0])))
    return pairs


def figures(run_dir: Path, split_dir: Path) -> dict:
    """The best round's val figures, its AUC interval, wall time and the epsilon check."""
    report = json.loads((run_dir / "report.json").read_text())
    best = report["best"]
    evaluation = run_dir / "eval-val"
    if not (evaluation / "metrics.json").is_file():
        run_evaluate([run_dir / "best"], split_dir=split_dir, on="val", out=evaluation,
                     device="cpu")
    result = json.loads((evaluation / "metrics.json").read_text())["results"][0]
    if (run_dir / "wall.json").is_file():
        seconds = json.loads((run_dir / "wall.json").read_text())["seconds"]
    else:  # a run made by the label skew study: its rounds' time
        with (run_dir / "summary.csv").open() as handle:
            seconds = sum(float(r["seconds"]) for r in csv.DictReader(handle))
    ci = result["chosen"]["ci95"]
    out = {"acc_thr": best["thr_acc"], "acc_half": best["val_acc"], "auc": best["val_auc"],
           "auc_ci": ci["auc"], "acc_thr_ci": ci["accuracy"], "round": best["round"],
           "seconds": seconds}
    if (run_dir / "privacy.csv").is_file():
        out["epsilon"] = checked_max_epsilon(run_dir, split_dir)
    return out


def checked_max_epsilon(run_dir: Path, split_dir: Path) -> float:
    """The run's largest client epsilon, once every client's has been recomputed."""
    pairs = independent_epsilons(run_dir, split_dir)
    for reported, recomputed in pairs:
        if not math.isclose(reported, recomputed, rel_tol=1e-6, abs_tol=1e-4):
            raise SystemExit(f"{run_dir}: privacy.csv epsilon {reported} != independent "
                             f"{recomputed}")
    return max(r for r, _ in pairs)


def federate(split: Path, run_dir: Path, overrides: dict, init: str, *, run: bool) -> dict | None:
    if not (run_dir / "report.json").is_file():
        if not run:
            return None
        start = time.perf_counter()
        run_federate(split, run_dir, build_config(FederateConfig, None, overrides), init=init,
                     quiet=True, force=True)
        (run_dir / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
        print(f"{run_dir}: done", file=sys.stderr, flush=True)
    return figures(run_dir, split)


def row(label: str, f: dict) -> str:
    epsilon = f"{f['epsilon']:.2f}" if "epsilon" in f else "-"
    return (f"| {label} | {f['acc_thr']:.3f} ({f['acc_thr_ci'][0]:.2f}-{f['acc_thr_ci'][1]:.2f}) "
            f"| {f['acc_half']:.3f} | {f['auc']:.3f} ({f['auc_ci'][0]:.2f}-{f['auc_ci'][1]:.2f}) "
            f"| {epsilon} | {f['seconds'] / 60:.1f} min |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--phase", nargs="*", default=["tune", "grid"], choices=("tune", "grid"))
    parser.add_argument("--modes", nargs="*", default=list(TUNING), choices=list(TUNING))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not COVID.is_file() or not WEIGHTS.is_file():
        print(f"needs {COVID} and {WEIGHTS}", file=sys.stderr)
        return 1
    os.environ.setdefault("FEDCT_CACHE", str(args.work / "cache"))
    common = {**common_settings(argparse.Namespace(rounds=10, local_epochs=1)), **COVID_SETTINGS}
    splits, iid, init = covid_inputs(args.work, common, [1], alphas=(0.5,))
    partitions = {"iid": iid, "dirichlet 0.5": splits[0][2]}
    baselines = {"iid": args.work / "covid" / "iid",
                 "dirichlet 0.5": args.work / "covid" / "split-dir0.5-s1-fedavg"}
    out = args.work / "covid" / "dp"
    run = not args.table_only
    lines = ["| run | acc at eer (95% CI) | acc at 0.5 | AUC (95% CI) | max epsilon | wall |",
             "| --- | --- | --- | --- | --- | --- |"]
    chosen = {}
    for mode in args.modes:
        tried = {}
        for settings in TUNING[mode]:
            f = federate(iid, out / f"iid-eps3-{name_of(mode, settings)}",
                         {**common, **DP, "dp_train": mode, "target_epsilon": 3.0, **settings},
                         init, run=run and "tune" in args.phase)
            if f:
                tried[json.dumps(settings)] = f
                lines.append(row(f"tune iid eps 3 {name_of(mode, settings)}", f))
        if tried:
            chosen[mode] = json.loads(max(tried, key=lambda k: tried[k]["auc"]))
    print("\n".join(lines) + "\n\nchosen on val: " + json.dumps(chosen))
    lines = lines[:2]
    for partition, split in partitions.items():
        base = federate(split, baselines[partition], common, init, run=run)
        if base:
            lines.append(row(f"{partition} non-DP FedAvg", base))
        if "head" in chosen:  # the head mode's ceiling: the same training without noise
            head = {**common, **DP, **chosen["head"], "dp": False, "freeze": "head"}
            f = federate(split, out / f"{partition.replace(' ', '')}-nodp-head", head, init,
                         run=run and "grid" in args.phase)
            if f:
                lines.append(row(f"{partition} non-DP, head only (head's settings)", f))
        for epsilon in EPSILONS:
            for mode, settings in chosen.items():
                f = federate(split, out / f"{partition.replace(' ', '')}-eps{epsilon:g}-"
                                        f"{name_of(mode, settings)}",
                             {**common, **DP, "dp_train": mode, "target_epsilon": epsilon,
                              **settings}, init, run=run and "grid" in args.phase)
                if f:
                    lines.append(row(f"{partition} DP eps {epsilon:g} {mode}", f))
    print("\n".join(lines))
    (args.work / "dp_study.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
