"""Clinical metrics for a positive class, bootstrap confidence intervals, ROC and confusion plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import binomtest, mannwhitneyu
from sklearn.metrics import roc_curve

from fedct.files import atomic_write

METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1",
           "balanced_accuracy", "auc")


def roc_auc(is_positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U of the positives' scores over the
    negatives' (scipy; ties count half), divided by their pairs. Equal to scikit-learn's
    roc_auc_score and fast enough for 1000 bootstrap resamples; NaN with one class."""
    is_positive = np.asarray(is_positive, dtype=bool)
    score = np.asarray(score, dtype=float)
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = mannwhitneyu(score[is_positive], score[~is_positive], use_continuity=False,
                     method="asymptotic").statistic
    return float(u / (n_pos * n_neg))


def one_class_note(truth: np.ndarray, positive: str, negative: str) -> str | None:
    """What one-class data (an external healthy cohort, say) can and cannot measure."""
    if truth.all():
        return (f"every image is {positive}: sensitivity is defined; specificity, NPV and "
                "AUC are not (shown as -)")
    if not truth.any():
        return (f"no image is {positive}: specificity is defined; sensitivity, PPV, F1 and "
                "AUC are not (shown as -)")
    return None


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion (scipy); NaN for no trials. It treats the trials
    as independent: slices of one patient are not, so read it as a lower bound on the width."""
    if n == 0:
        return float("nan"), float("nan")
    interval = binomtest(int(successes), int(n)).proportion_ci(0.95, method="wilson")
    return float(interval.low), float(interval.high)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def binary_metrics(is_positive: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict:
    """Metrics of 'positive if score >= threshold' against the truth."""
    truth = np.asarray(is_positive, dtype=bool)
    called = np.asarray(score) >= threshold
    tp = int(np.sum(called & truth))
    tn = int(np.sum(~called & ~truth))
    fp = int(np.sum(called & ~truth))
    fn = int(np.sum(~called & truth))
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    precision = _ratio(tp, tp + fp)
    return {
        "accuracy": _ratio(tp + tn, len(truth)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": float(np.nanmean([sensitivity, specificity])),
        "auc": roc_auc(truth, score),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def youden_threshold(is_positive: np.ndarray, score: np.ndarray) -> float:
    """The threshold that maximises sensitivity + specificity - 1 on these data (scikit-learn's
    ROC points; the first of equals, so the highest such threshold)."""
    truth = np.asarray(is_positive, dtype=bool)
    if truth.all() or not truth.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(truth, score, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def bootstrap(is_positive: np.ndarray, score: np.ndarray, *, threshold: float,
              groups: np.ndarray | None = None, n: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs; resamples whole patients when groups are given (cluster bootstrap)."""
    truth = np.asarray(is_positive, dtype=bool)
    score = np.asarray(score, dtype=float)
    return resample_intervals(lambda idx: binary_metrics(truth[idx], score[idx], threshold),
                              len(truth), METRICS, groups=groups, n=n, seed=seed, level=level)


def resample_intervals(compute, rows: int, keys, *, groups: np.ndarray | None = None,
                       n: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of `compute(row indices)[key]` over `n` resamples of the rows,
    or of whole groups (patients) when given; NaN draws (a class missing) are left out."""
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(rows)]
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    draws = {m: [] for m in keys}
    for _ in range(n):
        pick = rng.integers(len(members), size=len(members))
        values = compute(np.concatenate([members[g] for g in pick]))
        for m in keys:
            draws[m].append(values[m])
    tail = (1 - level) / 2 * 100
    out = {}
    for m in keys:
        arr = np.asarray(draws[m], dtype=float)
        arr = arr[~np.isnan(arr)]
        out[m] = (float(np.percentile(arr, tail)), float(np.percentile(arr, 100 - tail))) \
            if len(arr) else (float("nan"), float("nan"))
    return out


def positive_index(classes: list[str], positive: str | None) -> int | None:
    """The one rule for the positive class: the named one, else the last class (for two
    classes, the second: CT_COVID after CT_NonCOVID is named anyway); None for more than two
    classes, which are decided by the highest probability."""
    if len(classes) > 2:
        return None
    return list(classes).index(positive) if positive else len(classes) - 1


def positive_class(classes: list[str], positive: str | None) -> str | None:
    """The positive class's name by `positive_index`'s rule (None for more than two)."""
    index = positive_index(classes, positive)
    return None if index is None else list(classes)[index]


def monitor_value(metrics: dict, monitor: str) -> float:
    """A monitored value where higher is better (a loss is negated); NaN counts as -inf.
    `metrics` has the monitor's own key (val_auc, fed_auc) or the bare one (auc)."""
    value = metrics[monitor] if monitor in metrics else metrics[monitor.split("_", 1)[1]]
    value = -value if monitor.endswith("loss") else value
    return float("-inf") if np.isnan(value) else float(value)


def summary_metrics(probs: np.ndarray, labels: np.ndarray, positive_index: int) -> dict:
    """The few numbers logged every epoch or round: accuracy (argmax), AUC, sens, spec, bal. acc.
    (macro AUC and NaN sens/spec for more than two classes)."""
    if probs.shape[1] > 2:
        from fedct.multiclass import class_summary

        return class_summary(probs, labels)
    predicted = probs.argmax(axis=1)
    truth = labels == positive_index
    score = probs[:, positive_index]
    called = predicted == positive_index
    sensitivity = _ratio(np.sum(called & truth), truth.sum())
    specificity = _ratio(np.sum(~called & ~truth), (~truth).sum())
    return {
        "acc": float(np.mean(predicted == labels)) if len(labels) else float("nan"),
        "auc": roc_auc(truth, score),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_acc": float(np.nanmean([sensitivity, specificity])) if len(labels) else float("nan"),
    }


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str,
             points: dict[str, dict] | None = None, positive: str = "positive") -> None:
    """ROC curves, each with its operating point (`points`: the chosen threshold and its
    sensitivity and specificity) marked and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    drawn = 0
    for name, (truth, score) in curves.items():
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        line, = ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(truth, score):.3f})")
        point = (points or {}).get(name)
        if point and point.get("sensitivity") is not None:
            x, y = 1 - point["specificity"], point["sensitivity"]
            ax.plot([x], [y], marker="o", markersize=6, color=line.get_color(),
                    markeredgecolor="black")
            ax.annotate(f"threshold {point['threshold']:.2f}\nsens {y:.2f}, spec "
                        f"{point['specificity']:.2f}", (x, y), xytext=(8, -22),
                        textcoords="offset points", fontsize=7)
        drawn += 1
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel(f"1 - specificity (share of non-{positive} called {positive})")
    ax.set_ylabel(f"sensitivity (share of {positive} found)")
    ax.set_title(title, fontsize=9)
    if drawn:
        ax.legend(fontsize=7, loc="lower right")
    else:  # one class in the data: no curve exists, and the figure says so
        ax.text(0.5, 0.55, "no ROC curve: these data hold\nimages of one class only",
                ha="center", va="center", fontsize=9,
                bbox={"facecolor": "white", "edgecolor": "0.6", "boxstyle": "round"})
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def plot_confusion(matrices: dict[str, dict], path: Path, positive: str, negative: str) -> None:
    """Two-class confusion matrices (counts tp/fp/tn/fn), one panel per checkpoint."""
    plot_confusion_grids({name: [[c["tn"], c["fp"]], [c["fn"], c["tp"]]]
                          for name, c in matrices.items()}, path, [negative, positive],
                         xlabel="predicted", ylabel="true")


def plot_confusion_grids(grids: dict[str, list], path: Path, labels: list[str], *,
                         xlabel: str, ylabel: str) -> None:
    """Confusion matrices (rows true, columns predicted, in `labels` order), one panel per
    checkpoint: each cell its count and its share of the row, coloured by that share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    side = max(3.2, 1.2 + 0.75 * k)
    fig, axes = plt.subplots(1, len(grids), figsize=(side * len(grids), side), dpi=100,
                             squeeze=False)
    for ax, (name, matrix) in zip(axes[0], grids.items(), strict=True):
        grid = np.asarray(matrix)
        totals = grid.sum(axis=1, keepdims=True)
        shares = np.divide(grid, totals, out=np.zeros(grid.shape), where=totals > 0)
        image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)  # colour: share of the row
        for (i, j), v in np.ndenumerate(grid):
            red, green, blue, _ = image.cmap(image.norm(shares[i, j]))  # the cell decides
            light = 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.5
            share = (f"{100 * shares[i, j]:.0f}%" + (" of true" if k == 2 else "")
                     if totals[i, 0] else "-")
            ax.text(j, i, f"{v}\n{share}", ha="center", va="center", fontsize=8 if k == 2 else 7,
                    color="black" if light else "white")
        ax.set_xticks(range(k), labels, fontsize=7, **({} if k == 2 else
                                                       {"rotation": 30, "ha": "right"}))
        ax.set_yticks(range(k), labels, fontsize=7)
        ax.set_xlabel(xlabel, fontsize=None if k == 2 else 8)
        ax.set_ylabel(ylabel, fontsize=None if k == 2 else 8)
        ax.set_title(name, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def plot_reliability(calibration: dict[str, dict], path: Path, positive: str,
                     observed: str | None = None) -> None:
    """Observed positive rate against mean score per score bin, one line per checkpoint
    (`observed`: what the y axis counts, when not the share of `positive`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, counts) = plt.subplots(2, 1, figsize=(4.5, 5.6), dpi=100, sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1]})
    width = 0.1 / max(1, len(calibration))
    for k, (name, c) in enumerate(calibration.items()):
        bins = c["bins"]
        line, = ax.plot([b["mean_score"] for b in bins], [b["observed"] for b in bins],
                        marker="o", markersize=3, label=f"{name} (ECE {c['ece']:.3f})")
        counts.bar([b["bin"] / 10 + (k + 0.5) * width for b in bins],
                   [b["count"] for b in bins], width=width, color=line.get_color())
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_ylabel(observed or f"observed share of {positive}")
    ax.set_title("reliability (10 equal-width bins)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    counts.set_ylabel("images", fontsize=8)
    counts.set_xlabel(f"predicted probability of {positive}")
    counts.set_xlim(0, 1)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
