"""The paper's study on COVID-CT, scaled to 2 CPU cores: centralised vs federated over 5 clients.

    python benchmarks/covid_study.py [--image-size 128] [--rounds 20] [--local-epochs 2]
                                     [--lr 1e-3] [--lr-schedule cosine] [--split-seed 1]
                                     [--only NAME ...] [--work DIR]

With --work DIR the run directories are kept there, and a run whose report.json exists is
read back instead of run again: on 2 cores the grid takes hours, so it can be run in parts.

Every run starts from the shared ImageNet weights of tf_efficientnet_lite0 and is scored on
COVID-CT val. "stage 1" is a central fine-tune on a public share (client 0 of an IID split,
a fifth of train), "centralised" the same recipe on all of train (AdamW 1e-3, 30 epochs);
"one-stage" federates straight from ImageNet. Federated runs use --lr (the clients' lr,
cosine-decayed over the rounds by default) and --local-epochs unless the run names its
own; DP head-only runs lr 1e-2 (a linear layer under noise needs a larger step), DP full
runs lr 5e-4 with BatchNorm frozen in eval mode (`freeze_bn`), Opacus hooks. Prints a
markdown table and writes docs/covid_study.png (val accuracy per round). Needs ../shared.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

from fedct.config import FederateConfig, PretrainConfig
from fedct.configure import build_config
from fedct.data.manifest import SplitOptions, run_split
from fedct.federated.simulation import run_federate
from fedct.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COVID = SHARED / "data" / "covid-ct" / "splits.csv"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_in1k.safetensors"

# name: (partition, alpha, local epochs (None: --local-epochs), stage-1 init?,
#        dp: None | (epsilon, dp_train))
RUNS = {
    "iid": ("iid", 0, None, True, None),
    "dir-1.0": ("dirichlet", 1.0, None, True, None),
    "dir-0.5": ("dirichlet", 0.5, None, True, None),
    "dir-0.1": ("dirichlet", 0.1, None, True, None),
    "dir-0.5 one-stage": ("dirichlet", 0.5, None, False, None),
    "dir-0.1 one-stage": ("dirichlet", 0.1, None, False, None),
    "dir-0.5 E=1": ("dirichlet", 0.5, 1, True, None),
    "dir-0.5 E=5": ("dirichlet", 0.5, 5, True, None),
    "iid DP eps=8 head": ("iid", 0, None, True, (8.0, "head")),
    "iid DP eps=3 head": ("iid", 0, None, True, (3.0, "head")),
    "iid DP eps=1 head": ("iid", 0, None, True, (1.0, "head")),
    "iid DP eps=8 full": ("iid", 0, None, True, (8.0, "full")),
    "iid DP eps=3 full": ("iid", 0, None, True, (3.0, "full")),
    "iid DP eps=1 full": ("iid", 0, None, True, (1.0, "full")),
}


def rows_of(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="clients' lr (non-DP runs)")
    parser.add_argument("--lr-schedule", default="cosine", choices=("constant", "cosine"))
    parser.add_argument("--central-epochs", type=int, default=30)
    parser.add_argument("--split-seed", type=int, default=1, help="seed of the client partitions")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "covid_study.png")
    parser.add_argument("--work", type=Path, default=None, help="keep runs here; reuse finished ones")
    args = parser.parse_args()
    if not COVID.is_file() or not WEIGHTS.is_file():
        print(f"needs {COVID} and {WEIGHTS}", file=sys.stderr)
        return 1
    common = {"model": "tf_efficientnet_lite0", "image_size": args.image_size, "batch_size": 32,
              "seed": 0, "aug_scale_min": 0.5, "aug_rotation": 15}
    results, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("FEDCT_CACHE", str(work / "cache"))
        splits = {}

        def split_for(scheme: str, alpha: float) -> Path:
            key = (scheme, alpha)
            if key not in splits and (work / f"split-{scheme}-{alpha}" / "split.yaml").is_file():
                splits[key] = work / f"split-{scheme}-{alpha}"
            if key not in splits:
                splits[key] = run_split(COVID, work / f"split-{scheme}-{alpha}", SplitOptions(
                    keep_split=True, clients=5, scheme=scheme, alpha=alpha or 0.5,
                    seed=args.split_seed))[0]
            return splits[key]

        def finished(run_dir: Path, start) -> tuple[dict, float]:
            """The run's report: read back when it finished earlier, else run it now."""
            if (run_dir / "report.json").is_file():
                report = json.loads((run_dir / "report.json").read_text())
            else:
                report = start()
            seconds = sum(float(r["seconds"]) for r in rows_of(run_dir / "summary.csv"))
            return report, seconds

        for name, label, clients in (("central", "centralised (all train)", None),
                                     ("stage1", "stage 1 only (public fifth)", [0])):
            config = build_config(PretrainConfig, None, {
                **common, "pretrained": str(WEIGHTS), "lr": 1e-3, "epochs": args.central_epochs,
                "clients": clients})
            report, seconds = finished(work / name, lambda n=name, c=config: run_pretrain(
                split_for("iid", 0), work / n, c, quiet=True, force=True))
            results.append((label, report["best"], seconds, None))
            curves[label] = [float(r["val_acc"]) for r in rows_of(work / name / "summary.csv")]
        for name, (scheme, alpha, epochs, staged, dp) in RUNS.items():
            if args.only and name not in args.only:
                continue
            overrides = {**common, "rounds": args.rounds, "lr": args.lr,
                         "local_epochs": epochs or args.local_epochs,
                         "lr_schedule": args.lr_schedule}
            if dp:  # head: a linear model under noise needs a larger step; full: frozen BN
                overrides.update({"dp": True, "target_epsilon": dp[0], "dp_train": dp[1],
                                  "lr": 1e-2 if dp[1] == "head" else 5e-4,
                                  "freeze_bn": dp[1] == "full", "grad_sample_mode": "hooks"})
            init = str(work / "stage1" / "best") if staged else str(WEIGHTS)
            run_dir = work / name.replace(" ", "_").replace("=", "")
            report, seconds = finished(run_dir, lambda d=run_dir, o=overrides, i=init, sc=scheme,
                                       a=alpha: run_federate(split_for(sc, a), d,
                                                             build_config(FederateConfig, None, o),
                                                             init=i, quiet=True, force=True))
            best = report["best"]
            results.append((name, best, seconds, report.get("max_epsilon")))
            curves[name] = [float(r["val_acc"]) for r in rows_of(run_dir / "summary.csv")]
            print(f"{name}: {json.dumps({k: best[k] for k in ('val_acc', 'val_auc')})} "
                  f"{seconds:.0f}s", file=sys.stderr, flush=True)
    print(f"\n### COVID-CT val, tf_efficientnet_lite0 at {args.image_size} px, 5 clients, "
          f"{args.rounds} rounds of {args.local_epochs} local epochs unless named, client lr "
          f"{args.lr:g} {args.lr_schedule} (best round or epoch by val AUC)\n")
    print("| run | val accuracy | val AUC | sensitivity | specificity | max epsilon | train time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, best, seconds, eps in results:
        print(f"| {name} | {best['val_acc']:.3f} | {best['val_auc']:.3f} | "
              f"{best['val_sensitivity']:.3f} | {best['val_specificity']:.3f} | "
              f"{'-' if eps is None else f'{eps:.2f}'} | {seconds / 60:.1f} min |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    colours = plt.get_cmap("tab20").colors
    for index, (name, values) in enumerate(curves.items()):
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name,
                color=colours[index % len(colours)], linestyle="--" if "DP" in name else "-")
    ax.set_xlabel("round (centralised: epoch)")
    ax.set_ylabel("val accuracy")
    ax.set_title(f"COVID-CT val accuracy per round ({args.image_size} px)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
