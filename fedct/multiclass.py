"""Runs of three or more classes (COVID / CAP / Normal, say): decisions, metrics, pooled
validation and plots.

A two-class run has a positive class and a threshold chosen on val. A run of more classes
has neither: its decision is the class of highest probability (argmax), its AUC the mean of
the classes' one-vs-rest AUCs (macro, as scikit-learn's `roc_auc_score(multi_class="ovr")`),
and the binary-only settings (`--positive`, threshold rules, counts-only release) are
refused for it in one line. Federated validation pools, per class, a histogram of that
class's probability for its own rows and for the others, and the argmax confusion matrix:
aggregates only, as in the two-class case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from fedct.errors import FedctError
from fedct.files import atomic_write
from fedct.metrics import resample_intervals, roc_auc
from fedct.operating_point import BINS, ScoreHistogram

ARGMAX = "argmax"
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "auc")
PER_CLASS = ("n", "sensitivity", "specificity", "precision", "f1", "auc")


def is_multiclass(classes) -> bool:
    return len(classes) > 2


def refuse_binary_only(setting: str, classes) -> None:
    """The one-line refusal of a setting that needs a positive class and a threshold."""
    raise FedctError(f"{setting}: needs two classes; this run has {len(classes)} "
                     f"({', '.join(classes)}) and decides by the highest probability")


def check_settings(config, classes) -> None:
    """Refuse a run's binary-only settings when it has more than two classes (the default
    threshold 0.5 stands for none given)."""
    if not is_multiclass(classes):
        return
    if str(config.threshold) != "0.5":
        refuse_binary_only(f"threshold {config.threshold}", classes)
    if getattr(config, "eval_release", "histograms") == "counts":
        refuse_binary_only("eval_release counts", classes)


def _nanmean(values) -> float:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def class_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Argmax decisions scored as scikit-learn does: accuracy, balanced accuracy (mean
    recall over the classes present), macro and weighted F1 over the classes present or
    predicted, macro one-vs-rest AUC over the classes with rows both in and out; per class
    sensitivity (recall), specificity, PPV (precision), F1 and AUC; the confusion matrix
    (rows true, columns predicted)."""
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=float)
    k = len(classes)
    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, labels=list(range(k)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(k)), zero_division=np.nan)
    n = int(matrix.sum())
    per_class = {}
    for c, name in enumerate(classes):
        fp = int(matrix[:, c].sum() - matrix[c, c])
        negatives = n - int(support[c])
        per_class[name] = {"n": int(support[c]), "sensitivity": float(recall[c]),
                           "specificity": (negatives - fp) / negatives if negatives else float("nan"),
                           "precision": float(precision[c]), "f1": float(f1[c]),
                           "auc": roc_auc(labels == c, probs[:, c])}
    seen = (support > 0) | (matrix.sum(axis=0) > 0)
    return {"accuracy": float(np.trace(matrix) / n) if n else float("nan"),
            "balanced_accuracy": _nanmean(recall[support > 0]),
            "macro_f1": _nanmean(np.nan_to_num(f1[seen], nan=0.0)),
            "weighted_f1": float(np.average(np.nan_to_num(f1), weights=support))
            if n else float("nan"),
            "auc": _nanmean([per_class[c]["auc"] for c in classes]),
            "per_class": per_class, "confusion": matrix.tolist()}


def class_summary(probs: np.ndarray, labels: np.ndarray) -> dict:
    """The few numbers logged every epoch or round: accuracy, macro AUC, balanced accuracy;
    sensitivity and specificity belong to a positive class, so they are NaN here."""
    metrics = class_metrics(labels, probs, [str(c) for c in range(probs.shape[1])])
    return {"acc": metrics["accuracy"], "auc": metrics["auc"], "sensitivity": float("nan"),
            "specificity": float("nan"), "balanced_acc": metrics["balanced_accuracy"]}


def class_intervals(labels: np.ndarray, probs: np.ndarray, classes: list[str], *,
                    groups: np.ndarray | None, n: int, seed: int) -> dict:
    """Percentile bootstrap intervals of the headline metrics (whole patients resampled
    when groups are given)."""
    def compute(idx: np.ndarray) -> dict:
        return class_metrics(labels[idx], probs[idx], classes)

    return resample_intervals(compute, len(labels), HEADLINE, groups=groups, n=n, seed=seed)


@dataclass
class ClassHistograms:
    """Per class, the histogram of its probability for its own rows (positives) and for the
    other rows (negatives), and the argmax confusion matrix: what a client sends of its
    validation rows in a run of more than two classes."""

    per_class: list[ScoreHistogram]
    confusion: np.ndarray

    @classmethod
    def empty(cls, k: int) -> ClassHistograms:
        return cls([ScoreHistogram.empty() for _ in range(k)], np.zeros((k, k), dtype=np.int64))

    @classmethod
    def of(cls, labels: np.ndarray, probs: np.ndarray) -> ClassHistograms:
        labels = np.asarray(labels, dtype=int)
        k = probs.shape[1]
        matrix = confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(k)))
        return cls([ScoreHistogram.of(labels == c, probs[:, c]) for c in range(k)],
                   matrix.astype(np.int64))

    @classmethod
    def from_flat(cls, positives, negatives, confusion, k: int) -> ClassHistograms:
        """From a message's flat tuples; a ValueError when the shapes or counts disagree."""
        pos = np.asarray(positives, dtype=np.int64)
        neg = np.asarray(negatives, dtype=np.int64)
        matrix = np.asarray(confusion, dtype=np.int64)
        if pos.shape != (k * BINS,) or neg.shape != (k * BINS,) or matrix.shape != (k * k,):
            raise ValueError("malformed per-class histograms")
        out = cls([ScoreHistogram(p, q) for p, q in zip(pos.reshape(k, BINS),
                                                         neg.reshape(k, BINS), strict=True)],
                  matrix.reshape(k, k))
        rows = out.confusion.sum(axis=1)
        if any(h.n_pos != rows[c] or h.n_pos + h.n_neg != rows.sum()
               for c, h in enumerate(out.per_class)):
            raise ValueError("per-class histograms disagree with the confusion matrix")
        return out

    def flat(self) -> dict:
        return {"positives": tuple(int(v) for h in self.per_class for v in h.positives),
                "negatives": tuple(int(v) for h in self.per_class for v in h.negatives),
                "confusion": tuple(int(v) for v in self.confusion.ravel())}

    def __add__(self, other: ClassHistograms) -> ClassHistograms:
        return ClassHistograms([a + b for a, b in zip(self.per_class, other.per_class,
                                                      strict=True)],
                               self.confusion + other.confusion)

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    def auc(self) -> float:
        return _nanmean([h.auc() for h in self.per_class])

    def tie_bound(self) -> float:
        """How far the macro AUC can be from that of the unbinned scores (the mean of the
        classes' bounds)."""
        return _nanmean([h.tie_bound() for h in self.per_class])

    def metrics(self) -> dict:
        n, rows = self.n, self.confusion.sum(axis=1)
        recall = [self.confusion[c, c] / rows[c] for c in range(len(rows)) if rows[c]]
        return {"acc": float(np.trace(self.confusion) / n) if n else float("nan"),
                "auc": self.auc(), "sensitivity": float("nan"), "specificity": float("nan"),
                "balanced_acc": _nanmean(recall)}

    def point(self, source: str) -> dict:
        """The decision rule and what it gives on these rows, in place of an operating point."""
        metrics = self.metrics()
        return argmax_point(metrics["acc"], metrics["balanced_acc"], source)


def argmax_point(acc: float, balanced_acc: float, source: str) -> dict:
    nan = float("nan")
    return {"threshold": nan, "rule": ARGMAX, "source": source, "acc": acc,
            "sensitivity": nan, "specificity": nan, "balanced_acc": balanced_acc}


def plot_class_rocs(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                    classes: list[str], title: str) -> None:
    """One panel per checkpoint: each class's one-vs-rest ROC curve with its AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4.2), dpi=100,
                             squeeze=False)
    for ax, (name, (labels, probs)) in zip(axes[0], curves.items(), strict=True):
        for c, label in enumerate(classes):
            truth = labels == c
            if truth.all() or not truth.any():
                continue
            fpr, tpr, _ = roc_curve(truth, probs[:, c])
            ax.plot(fpr, tpr, label=f"{label} vs rest (AUC {roc_auc(truth, probs[:, c]):.3f})")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set_xlabel("1 - specificity (share of other classes called this class)", fontsize=8)
        ax.set_ylabel("sensitivity (share of this class found)", fontsize=8)
        ax.set_title(f"{title}\n{name}", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def score_classes(name: str, path: str, meta: dict, labels: np.ndarray, probs: np.ndarray,
                  groups: np.ndarray | None, scopes: dict[str, np.ndarray], *, n_boot: int,
                  seed: int) -> list[dict]:
    """`fedct evaluate`'s rows for a model of more than two classes, one per scope: the
    argmax decisions' metrics (headline figures with bootstrap intervals under `chosen`,
    per class under `metrics`) and the calibration of the predicted class's probability."""
    from fedct.operating_point import expected_calibration_error

    classes = list(meta["classes"])
    rows = []
    for scope, idx in scopes.items():
        metrics = class_metrics(labels[idx], probs[idx], classes)
        ci = class_intervals(labels[idx], probs[idx], classes, n=n_boot, seed=seed,
                             groups=None if groups is None else groups[idx]) if n_boot else {}
        correct = probs[idx].argmax(axis=1) == labels[idx]
        ece, bins = expected_calibration_error(correct, probs[idx].max(axis=1))
        rows.append({"checkpoint": name, "path": path, "data": scope, "classes": classes,
                     "positive": None, "stage": meta.get("stage"), "n": int(len(idx)),
                     "chosen": {"threshold": None, "source": ARGMAX,
                                **{k: metrics[k] for k in HEADLINE}, "ci95": ci},
                     "metrics": metrics, "calibration": {"ece": ece, "bins": bins}})
    return rows


def write_class_plots(out_dir: Path, pooled: list[dict], curves: dict, title: str) -> None:
    """roc.png (each class against the rest), confusion.png (every class) and
    reliability.png (the predicted class's probability against how often it is right)."""
    from fedct.metrics import plot_confusion_grids, plot_reliability

    classes = pooled[0]["classes"]
    plot_class_rocs(curves, out_dir / "roc.png", classes, title)
    plot_confusion_grids({r["checkpoint"]: r["metrics"]["confusion"] for r in pooled},
                         out_dir / "confusion.png", classes,
                         xlabel="predicted (highest probability)", ylabel="true (share of the row)")
    plot_reliability({r["checkpoint"]: r["calibration"] for r in pooled},
                     out_dir / "reliability.png", "the predicted class",
                     observed="share predicted right")


def check_classes(class_lists: list[list[str]], *, threshold: str | None, explain) -> None:
    """Before any inference, from the checkpoints' classes: models of two and of more
    classes are not scored together (their figures differ), and a model of more classes
    takes no threshold or heat maps."""
    kinds = {len(classes) > 2 for classes in class_lists}
    if len(kinds) > 1:
        raise FedctError("the checkpoints mix two-class and multi-class models: evaluate them "
                         "apart")
    if kinds == {True}:
        classes = class_lists[0]
        if threshold is not None:
            refuse_binary_only(f"--threshold {threshold}", classes)
        if explain is not None:
            raise FedctError(f"--explain: Grad-CAM explains two-class models so far; this one "
                             f"has {len(classes)} classes")
