"""Is head-only DP-SGD the limit? DP least squares against DP gradient descent on the same
frozen features, by grouped k-fold cross-validation of COVID-CT train + val.

    python benchmarks/dp_probe.py [--model lite0] [--size 224] [--weights FILE]
                                  [--epsilons 8,3,1] [--clients 1,5] [--folds 5]

Features: the frozen backbone's pre-logit features of every official train + val image
(ImageNet weights, or `--weights`, e.g. a `fedct selfsup` backbone), each scaled to unit L2
norm with a constant 1 appended and the pair scaled by 1/sqrt(2), so every example's
feature vector has norm at most 1 (no clipping needed, nothing learnt from the data).
Labels are +1 (positive class) / -1. In each outer fold the training part is spread over
`--clients` equal IID clients; each client privatises what it sends on its own (the noise
of fedct's per-client DP), and every client's epsilon is the one given, delta 1e-5:

- DP least squares (Mehta et al. 2023, "DP-LS"): each client releases X'X and X'y with
  Gaussian noise (the upper triangle drawn, the lower mirrored; sensitivity 1 each, both
  at noise multiplier sqrt(2) z, which composes to one Gaussian mechanism of multiplier z,
  calibrated by Opacus's RDP accountant for one step at sampling rate 1); the coordinator
  sums them and solves (A + lambda I) w = b.
- DP gradient descent on the logistic loss (head-only DP-SGD with full batches, fedct's
  `batch_size: all` mode): per-example gradients have norm <= 1 here, so clipping at 1
  changes nothing; each client runs `--steps` noisy full-batch steps a round for one round
  (noise calibrated by Opacus for that many steps), then the models are averaged.
- Without DP: scikit-learn's logistic regression, the ceiling.

lambda (DP-LS) and the learning rate (DP-GD) are chosen per method and epsilon by mean fold
AUC over a small grid, i.e. on the folds, the way every recipe here is chosen: optimistic
for both alike. Epsilons are checked independently: the analytic Gaussian mechanism's exact
epsilon (Balle and Wang 2018) for DP-LS's single release must not exceed the target.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from backbone_probe import COVID, NATIVE, features_of, train_val
from opacus.accountants.utils import get_noise_multiplier
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from fedct.metrics import roc_auc
from fedct.training import set_threads

DELTA = 1e-5
LAMBDAS = (10.0, 100.0, 1000.0, 10000.0, 100000.0)
LRS = (0.1, 0.5, 2.0)


def prepare(features: np.ndarray) -> np.ndarray:
    """Unit-norm features with a constant appended, scaled to norm 1 overall."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    return np.hstack([unit, np.ones((len(unit), 1))]) / math.sqrt(2)


def noise_multiplier(epsilon: float, steps: int) -> float:
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA,
                                      sample_rate=1.0, steps=steps, accountant="rdp"))


def exact_gaussian_epsilon(z: float) -> float:
    """The analytic Gaussian mechanism's epsilon at DELTA for sensitivity 1, noise z."""
    def delta_at(eps: float) -> float:
        return norm.cdf(0.5 / z - eps * z) - math.exp(eps) * norm.cdf(-0.5 / z - eps * z)

    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > DELTA else (low, mid)
    return high


def dp_least_squares(parts, epsilon: float | None, lam: float, rng) -> np.ndarray:
    dim = parts[0][0].shape[1]
    a, b = np.zeros((dim, dim)), np.zeros(dim)
    scale = 0.0 if epsilon is None else math.sqrt(2) * noise_multiplier(epsilon, 1)
    for x, y in parts:
        noise = np.triu(rng.normal(0, scale, (dim, dim))) if scale else np.zeros((dim, dim))
        a += x.T @ x + noise + np.triu(noise, 1).T
        b += x.T @ y + (rng.normal(0, scale, dim) if scale else 0)
    return np.linalg.solve(a + lam * np.eye(dim), b)


def dp_gradient_descent(parts, epsilon: float, lr: float, steps: int, rng) -> np.ndarray:
    z = noise_multiplier(epsilon, steps)
    weights = []
    for x, y in parts:
        w = np.zeros(x.shape[1])
        target = (y + 1) / 2
        for _ in range(steps):
            residual = 1 / (1 + np.exp(-(x @ w))) - target  # per-example gradient norm <= 1
            w -= lr * (x.T @ residual + rng.normal(0, z, x.shape[1])) / len(y)
        weights.append(w * len(y))
    return np.sum(weights, axis=0) / sum(len(y) for _, y in parts)


def folds_of(x, y, groups, folds: int, clients: int, seed: int):
    outer = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    for train, test in outer.split(x, y, groups):
        order = np.random.default_rng(seed).permutation(train)
        parts = [(x[idx], y[idx]) for idx in np.array_split(order, clients)]
        yield parts, x[test], y[test]


def score(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    s = x @ w
    return roc_auc(y == 1, s), float(np.mean((s > 0) == (y == 1)))


def study(x, y, groups, args) -> list[tuple]:
    rows = []
    for clients in args.clients:
        folds = list(folds_of(x, y, groups, args.folds, clients, args.seed))
        ceiling = []
        for parts, test_x, test_y in folds:
            px = np.vstack([p[0] for p in parts])
            py = np.concatenate([p[1] for p in parts])
            model = LogisticRegression(C=1.0, max_iter=5000).fit(px, py)
            s = model.decision_function(test_x)
            ceiling.append((roc_auc(test_y == 1, s), float(np.mean((s > 0) == (test_y == 1)))))
        rows.append((clients, "logistic, no DP (pooled)", "-", "-", ceiling))
        for epsilon in args.epsilons:
            for method, grid in (("DP least squares", LAMBDAS), ("DP gradient descent", LRS)):
                best = None
                for setting in grid:
                    rng = np.random.default_rng(args.seed)
                    results = []
                    for parts, test_x, test_y in folds:
                        w = (dp_least_squares(parts, epsilon, setting, rng)
                             if method == "DP least squares"
                             else dp_gradient_descent(parts, epsilon, setting, args.steps, rng))
                        results.append(score(w, test_x, test_y))
                    if best is None or np.mean([r[0] for r in results]) > np.mean(
                            [r[0] for r in best[1]]):
                        best = (setting, results)
                rows.append((clients, method, epsilon, best[0], best[1]))
                print(f"{clients} clients, {method}, epsilon {epsilon}: fold AUC "
                      f"{np.mean([r[0] for r in best[1]]):.3f}", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--size", default="224")
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--epsilons", default="8,3,1")
    parser.add_argument("--clients", default="1,5")
    parser.add_argument("--steps", type=int, default=20, help="DP-GD steps per client")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.epsilons = [float(e) for e in args.epsilons.split(",")]
    args.clients = [int(c) for c in args.clients.split(",")]
    if not COVID.is_file():
        print(f"needs {COVID}", file=sys.stderr)
        return 1
    for epsilon in args.epsilons:
        z = noise_multiplier(epsilon, 1)
        exact = exact_gaussian_epsilon(z)
        if exact > epsilon + 1e-6:
            raise SystemExit(f"epsilon check failed: z {z} gives exact epsilon {exact}")
        print(f"epsilon {epsilon}: DP-LS noise multiplier {z:.3f} (RDP); exact epsilon of that "
              f"release {exact:.3f}", file=sys.stderr)
    set_threads()
    size = NATIVE[args.model] if args.size == "native" else int(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FEDCT_CACHE", str(Path(tmp) / "cache"))
        split, positive, groups = train_val(Path(tmp))
        y = np.where(positive == 1, 1, -1)
        features, _ = features_of(args.model, size, split, args.weights)
    rows = study(prepare(features), y, groups, args)
    source = args.weights or "ImageNet"
    print(f"\n### DP linear probes on frozen {source} tf_efficientnet_{args.model} features "
          f"at {size} px, COVID-CT train + val, {args.folds}-fold grouped cross-validation, "
          f"delta {DELTA:g}, DP-GD {args.steps} full-batch steps\n")
    print("| clients | method | epsilon | lambda / lr | fold AUC | fold accuracy at 0 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for clients, method, epsilon, setting, results in rows:
        aucs, accs = np.array(results).T
        print(f"| {clients} | {method} | {epsilon} | {setting} | {aucs.mean():.3f} +- "
              f"{aucs.std(ddof=1):.3f} | {accs.mean():.3f} +- {accs.std(ddof=1):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
