"""Federated validation and the operating point on COVID-CT.

    python benchmarks/operating_point_study.py --work DIR [--rounds 20] [--local-epochs 2]
                                               [--threshold eer] [--rules youden eer]
                                               [--only NAME ...]

Every split keeps COVID-CT's official train/val and gives each of 5 clients a local
validation share carved out of its own training rows (`--local-val 0.2`, by patient). Each
federated run validates both ways (`val: both`) but chooses as a coordinator without data
would: best round by `fed_auc`, threshold by the rule on the clients' pooled histograms.
The official val rows (118 images the clients never see) then say how good those choices
were: the script scores every round's checkpoint on them and bootstraps (by patient, 1000
resamples) the round and the threshold that pooled val itself would have chosen, giving
intervals the federated choices are checked against. Accuracy, sensitivity and
specificity on official val are reported at 0.5 and at the threshold of each rule of
--rules, chosen on the clients' local val rows of the best round (what the run itself
chooses with that rule; its own --threshold rule is checked against its sidecar). The central
runs choose on official val itself (they have no other), so their figures there are
optimistic. With --work DIR finished runs are reused. Needs ../shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from fedct.config import FederateConfig, PretrainConfig
from fedct.configure import build_config
from fedct.data.loading import SplitImages, make_loader, make_transform
from fedct.data.manifest import SplitOptions, load_split, run_split
from fedct.evaluation import load_model
from fedct.federated.simulation import run_federate
from fedct.metrics import binary_metrics, bootstrap, roc_auc
from fedct.operating_point import ScoreHistogram, choose_threshold
from fedct.pretrain import run_pretrain
from fedct.runs import read_sidecar
from fedct.training import predict

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COVID = SHARED / "data" / "covid-ct" / "splits.csv"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_in1k.safetensors"
# name: (partition, alpha, dp target epsilon or None)
RUNS = {"iid": ("iid", 0.0, None), "dir-1.0": ("dirichlet", 1.0, None),
        "dir-0.5": ("dirichlet", 0.5, None), "dir-0.1": ("dirichlet", 0.1, None),
        "iid DP eps=8 head": ("iid", 0.0, 8.0)}
N_BOOT = 1000


def val_scores(checkpoint: Path, split, images: dict) -> tuple[np.ndarray, np.ndarray]:
    """(is COVID, COVID score) of the official val rows under a checkpoint."""
    model, meta = load_model(checkpoint)
    size = int(meta["input_size"][-1])
    if size not in images:
        images[size] = SplitImages(split, size, classes=list(meta["classes"]))
    dcfg = {"input_size": meta["input_size"], "mean": meta["mean"], "std": meta["std"]}
    dataset = images[size].dataset(split.entries, make_transform(data_cfg=dcfg, train=False,
                                                                 config=None))
    probs, labels = predict(model, make_loader(dataset, batch_size=64, train=False, seed=0),
                            device=torch.device("cpu"), channels_last=False)
    positive = list(meta["classes"]).index(meta["positive"])
    return labels == positive, probs[:, positive]


def interval(values, level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def patient_resamples(groups: np.ndarray, seed: int = 0):
    """Row indices of N_BOOT cluster-bootstrap resamples (whole patients)."""
    _, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    rng = np.random.default_rng(seed)
    for _ in range(N_BOOT):
        yield np.concatenate([members[g] for g in rng.integers(len(members), size=len(members))])


def analyse(name: str, run_dir: Path, steps: list[int], rules: list[str], val_split, images,
            local_split=None) -> list[dict]:
    """The run's choices against official val's own, and its figures there at 0.5 and at
    the threshold of each rule, one result per rule. `steps` are the rounds whose
    checkpoints compete (a central run: only its best epoch, chosen on official val
    already). Each rule's threshold is chosen on `local_split` (the clients' local val rows,
    scored as federated validation does; the run's own rule is checked against its
    sidecar), or on official val itself for a central run."""
    groups = np.array([e.row.group for e in val_split.entries])
    best_meta = read_sidecar(run_dir / "best")
    best_step = int(best_meta.get("round", best_meta.get("epoch")))
    paths = [run_dir / f"round-{r:04d}" for r in steps] if len(steps) > 1 else [run_dir / "best"]
    scored = [val_scores(c, val_split, images) for c in paths]
    truth = scored[0][0]
    score = scored[steps.index(best_step)][1]
    chosen_on = official = ScoreHistogram.of(truth, score)
    if local_split is not None:
        chosen_on = ScoreHistogram.of(*val_scores(run_dir / "best", local_split, {}))
    run_point = best_meta["operating_point"]
    if choose_threshold(run_point["rule"], chosen_on) != run_point["threshold"]:
        print(f"warning: {name}: the run chose threshold {run_point['threshold']:.4f}, its val "
              "rows scored here give another (a score on a bin edge?)", file=sys.stderr)
    resamples = list(patient_resamples(groups))
    boot_rounds = [steps[int(np.nanargmax([roc_auc(truth[idx], s[idx]) for _, s in scored]))]
                   for idx in resamples]
    round_ci = interval(boot_rounds)
    results = []
    for rule in rules:
        threshold = choose_threshold(rule, chosen_on)
        threshold_ci = interval([choose_threshold(rule, ScoreHistogram.of(truth[idx], score[idx]))
                                 for idx in resamples])
        results.append({
            "run": name, "rule": rule, "best": best_step,
            "pooled_best": steps[int(np.argmax([roc_auc(truth, s) for _, s in scored]))],
            "best_interval": round_ci, "best_inside": round_ci[0] <= best_step <= round_ci[1],
            "threshold": threshold, "pooled_threshold": choose_threshold(rule, official),
            "threshold_interval": threshold_ci,
            "threshold_inside": threshold_ci[0] <= threshold <= threshold_ci[1],
            "half": binary_metrics(truth, score, 0.5),
            "chosen": binary_metrics(truth, score, threshold),
            "chosen_ci": bootstrap(truth, score, threshold=threshold, groups=groups, n=N_BOOT)})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--central-epochs", type=int, default=30)
    parser.add_argument("--threshold", default="eer", help="the runs' own rule")
    parser.add_argument("--rules", nargs="*", default=["youden", "eer"],
                        help="rules compared after the runs, each chosen on the same val rows")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    if not COVID.is_file() or not WEIGHTS.is_file():
        print(f"needs {COVID} and {WEIGHTS}", file=sys.stderr)
        return 1
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEDCT_CACHE", str(work / "cache"))
    common = {"model": "tf_efficientnet_lite0", "image_size": args.image_size, "batch_size": 32,
              "seed": 0, "aug_scale_min": 0.5, "aug_rotation": 15, "threshold": args.threshold}

    def split_for(scheme: str, alpha: float) -> Path:
        out = work / f"split-{scheme}-{alpha}"
        if not (out / "split.yaml").is_file():
            run_split(COVID, out, SplitOptions(keep_split=True, clients=5, scheme=scheme,
                                               alpha=alpha or 0.5, local_val=0.2, seed=1))
        return out

    iid = split_for("iid", 0.0)
    full = load_split(iid)
    val_split = full.subset(full.select(split="val"))
    images: dict = {}
    results = []
    for name, clients in (("centralised", None), ("stage1", [0])):
        run_dir = work / name
        config = build_config(PretrainConfig, None, {
            **common, "pretrained": str(WEIGHTS), "lr": 1e-3, "epochs": args.central_epochs,
            "clients": clients})
        if not (run_dir / "report.json").is_file():
            run_pretrain(iid, run_dir, config, quiet=True, force=True)
        best_epoch = int(read_sidecar(run_dir / "best")["epoch"])
        results += analyse(name, run_dir, [best_epoch], args.rules, val_split, images)
    for name, (scheme, alpha, epsilon) in RUNS.items():
        if args.only and name not in args.only:
            continue
        run_dir = work / name.replace(" ", "_").replace("=", "")
        overrides = {**common, "rounds": args.rounds, "lr": 1e-3, "lr_schedule": "cosine",
                     "local_epochs": args.local_epochs, "val": "both", "monitor": "fed_auc",
                     "keep_last": args.rounds}
        if epsilon:
            overrides.update({"dp": True, "target_epsilon": epsilon, "dp_train": "head",
                              "lr": 1e-2, "grad_sample_mode": "hooks"})
        if not (run_dir / "report.json").is_file():
            run_federate(split_for(scheme, alpha), run_dir,
                         build_config(FederateConfig, None, overrides),
                         init=str(work / "stage1" / "best"), quiet=True, force=True)
        split = load_split(split_for(scheme, alpha))
        results += analyse(name, run_dir, list(range(1, args.rounds + 1)), args.rules, val_split,
                           images, local_split=split.subset(split.select(split="local_val")))
        print(f"{name}: done", file=sys.stderr, flush=True)
    (work / "operating_point_study.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\n### COVID-CT official val (118 images), {args.image_size} px, {args.rounds} "
          f"rounds x {args.local_epochs} local epochs; federated runs choose on the clients' "
          "local val, central runs on official val\n")
    print("| run | rule | best round (val's own, 95% interval) | threshold (val's own, "
          "95% interval) | acc / sens / spec at 0.5 | acc / sens / spec at threshold "
          "(95% CI of acc) | sens-spec gap | acc change |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        h, c = r["half"], r["chosen"]
        lo, hi = r["chosen_ci"]["accuracy"]
        print(f"| {r['run']} | {r['rule']} | {r['best']} ({r['pooled_best']}, "
              f"{r['best_interval'][0]:.0f}-{r['best_interval'][1]:.0f}) | "
              f"{r['threshold']:.3f} ({r['pooled_threshold']:.3f}, "
              f"{r['threshold_interval'][0]:.3f}-{r['threshold_interval'][1]:.3f}) | "
              f"{h['accuracy']:.3f} / {h['sensitivity']:.3f} / {h['specificity']:.3f} | "
              f"{c['accuracy']:.3f} / {c['sensitivity']:.3f} / {c['specificity']:.3f} "
              f"({lo:.3f}-{hi:.3f}) | {abs(c['sensitivity'] - c['specificity']):.3f} | "
              f"{c['accuracy'] - h['accuracy']:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
