"""Score histograms and the decision threshold chosen on validation data.

A client of a federation cannot send its validation scores (they are patient data), but a
histogram of them per label is enough for the server to pool every client's rows into
accuracy, sensitivity, specificity and AUC, and to choose the operating point. The bins are
uniform in logit(score), 2000 of them over [-10, 10] (0.01 logits wide; scores beyond go to
the end bins): softmax scores crowd near 0 and 1, where uniform bins in probability would
merge the very cases that decide an AUC. Binning changes an AUC only through positive /
negative pairs that share a bin (counted half, as ties): `tie_bound` gives that bound for
each histogram, and on COVID-CT models it stays far below 0.005. Every bin edge is a
possible threshold, and 0.5 (logit 0) is one of them, so the pooled numbers at a threshold
are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedct.errors import FedctError

RULES = "0.5 (or any number in (0, 1)), youden, eer, sens:X or spec:X"

BINS = 2000
LOGIT_RANGE = 10.0
# The bins' lower edges as scores: edge j is where bin j starts; bin 0 starts at 0.
EDGES = np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-np.linspace(-LOGIT_RANGE, LOGIT_RANGE,
                                                               BINS + 1)[1:-1]))])

MIDPOINTS = 1.0 / (1.0 + np.exp(-np.linspace(-LOGIT_RANGE, LOGIT_RANGE, BINS + 1)[:-1]
                                 - LOGIT_RANGE / BINS))


def score_bins(score: np.ndarray) -> np.ndarray:
    """The bin of each score: bin j holds EDGES[j] <= score < EDGES[j + 1]."""
    return np.searchsorted(EDGES, np.asarray(score, dtype=float), side="right") - 1


@dataclass
class ScoreHistogram:
    """Counts of the positive-class score per bin, for positive and for negative rows."""

    positives: np.ndarray
    negatives: np.ndarray

    @classmethod
    def empty(cls) -> ScoreHistogram:
        return cls(np.zeros(BINS, dtype=np.int64), np.zeros(BINS, dtype=np.int64))

    @classmethod
    def of(cls, is_positive: np.ndarray, score: np.ndarray) -> ScoreHistogram:
        truth = np.asarray(is_positive, dtype=bool)
        bins = score_bins(score)
        return cls(np.bincount(bins[truth], minlength=BINS).astype(np.int64),
                   np.bincount(bins[~truth], minlength=BINS).astype(np.int64))

    def __add__(self, other: ScoreHistogram) -> ScoreHistogram:
        return ScoreHistogram(self.positives + other.positives, self.negatives + other.negatives)

    def flat(self, prefix: str = "") -> dict:
        """The two histograms as tuples of ints, as a message carries them."""
        return {f"{prefix}positives": tuple(int(v) for v in self.positives),
                f"{prefix}negatives": tuple(int(v) for v in self.negatives)}

    @property
    def n_pos(self) -> int:
        return int(self.positives.sum())

    @property
    def n_neg(self) -> int:
        return int(self.negatives.sum())

    def auc(self) -> float:
        """AUC with rows in one bin counted as ties (Mann-Whitney with half credit)."""
        if not self.n_pos or not self.n_neg:
            return float("nan")
        below = np.concatenate([[0], np.cumsum(self.negatives)[:-1]])
        wins = float(np.sum(self.positives * (below + 0.5 * self.negatives)))
        return wins / (self.n_pos * self.n_neg)

    def tie_bound(self) -> float:
        """How far `auc` can be from the AUC of the unbinned scores."""
        if not self.n_pos or not self.n_neg:
            return float("nan")
        return 0.5 * float(np.sum(self.positives * self.negatives)) / (self.n_pos * self.n_neg)

    def collapsed(self, threshold: float) -> ScoreHistogram:
        """The same rows in two bins, just below and at `threshold`: the confusion counts
        there and nothing else (exact metrics at that threshold, no AUC worth the name)."""
        at = max(1, int(score_bins([threshold])[0]))
        out = ScoreHistogram.empty()
        for mine, theirs in ((self.positives, out.positives), (self.negatives, out.negatives)):
            theirs[at - 1], theirs[at] = mine[:at].sum(), mine[at:].sum()
        return out

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(is positive, score) with one row per count at its bin's logit midpoint: what a
        bootstrap or a plot needs of rows it may not see. Metrics at bin edges are exact;
        the AUC is `auc()`."""
        counts = np.concatenate([self.positives, self.negatives])
        truth = np.repeat(np.r_[np.ones(BINS, bool), np.zeros(BINS, bool)], counts)
        return truth, np.repeat(np.r_[MIDPOINTS, MIDPOINTS], counts)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Sensitivity and specificity of 'positive if score >= EDGES[j]', for every j."""
        tp = np.cumsum(self.positives[::-1])[::-1]  # rows at or above edge j
        fp = np.cumsum(self.negatives[::-1])[::-1]
        sens = tp / self.n_pos if self.n_pos else np.full(BINS, np.nan)
        spec = 1 - fp / self.n_neg if self.n_neg else np.full(BINS, np.nan)
        return sens, spec

    def confusion(self, threshold: float) -> dict:
        """tp, fp, tn, fn of 'positive if score >= threshold' (exact at a bin edge)."""
        j = int(score_bins([threshold])[0])
        tp, fp = int(self.positives[j:].sum()), int(self.negatives[j:].sum())
        return {"tp": tp, "fp": fp, "tn": self.n_neg - fp, "fn": self.n_pos - tp}

    def metrics(self, threshold: float = 0.5) -> dict:
        c = self.confusion(threshold)
        n = self.n_pos + self.n_neg
        sens = c["tp"] / self.n_pos if self.n_pos else float("nan")
        spec = c["tn"] / self.n_neg if self.n_neg else float("nan")
        return {"acc": (c["tp"] + c["tn"]) / n if n else float("nan"), "auc": self.auc(),
                "sensitivity": sens, "specificity": spec,
                "balanced_acc": float(np.nanmean([sens, spec])) if n else float("nan")}


def parse_rule(text: str) -> tuple[str, float]:
    """('fixed', t), ('youden', 0), ('eer', 0), ('sens', X) or ('spec', X) from a threshold
    option."""
    text = str(text).strip().lower()
    if text in ("youden", "eer"):
        return text, 0.0
    kind, _, value = text.partition(":")
    try:
        number = float(value if kind in ("sens", "spec") else text)
    except ValueError:
        raise FedctError(f"threshold {text!r}: choose {RULES}") from None
    if not 0 < number < 1:
        raise FedctError(f"threshold {text!r}: the number must lie in (0, 1)")
    return (kind if kind in ("sens", "spec") else "fixed"), number


def choose_threshold(rule: str, histogram: ScoreHistogram) -> float:
    """The threshold `rule` picks on validation rows: a fixed one as given; Youden's J at its
    maximum (the middle of equal maxima); `eer` where sensitivity and specificity are
    closest (the equal error rate; of equals, the best J); `sens:X` the highest with
    sensitivity >= X (the most specific); `spec:X` the lowest with specificity >= X. 0.5
    when val has one class."""
    kind, value = parse_rule(rule)
    if kind == "fixed":
        return value
    if not histogram.n_pos or not histogram.n_neg:
        return 0.5
    sens, spec = histogram.curve()
    if kind == "youden":
        j_stat = sens + spec
        best = np.flatnonzero(j_stat >= j_stat.max() - 1e-12)
        index = int(best[len(best) // 2])
    elif kind == "eer":
        gap = np.abs(sens - spec)
        closest = np.flatnonzero(gap <= gap.min() + 1e-12)
        index = int(closest[np.argmax((sens + spec)[closest])])
    elif kind == "sens":
        ok = np.flatnonzero(sens >= value - 1e-12)
        index = int(ok.max())
    else:
        ok = np.flatnonzero(spec >= value - 1e-12)
        index = int(ok.min()) if len(ok) else BINS - 1
    return float(EDGES[index]) if index > 0 else float(EDGES[1])


def operating_point(rule: str, histogram, source: str) -> dict:
    """The chosen threshold and what it gives on the rows it was chosen on; for more than
    two classes (per-class histograms), the argmax rule and what it gives."""
    if not isinstance(histogram, ScoreHistogram):
        return histogram.point(source)
    threshold = choose_threshold(rule, histogram)
    metrics = histogram.metrics(threshold)
    return {"threshold": threshold, "rule": str(rule), "source": source,
            "acc": metrics["acc"], "sensitivity": metrics["sensitivity"],
            "specificity": metrics["specificity"]}


def expected_calibration_error(is_positive: np.ndarray, score: np.ndarray,
                               bins: int = 10) -> tuple[float, list[dict]]:
    """ECE of the positive-class score over `bins` equal-width bins, and the bins (mean score,
    observed positive rate, count) for a reliability plot."""
    truth = np.asarray(is_positive, dtype=float)
    score = np.asarray(score, dtype=float)
    which = np.minimum((score * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        confidence, observed = float(score[mask].mean()), float(truth[mask].mean())
        ece += mask.mean() * abs(confidence - observed)
        rows.append({"bin": b, "mean_score": confidence, "observed": observed,
                     "count": int(mask.sum())})
    return float(ece), rows


def threshold_story(scope: str, row: dict) -> str:
    """A step's val figures saying which threshold each is at: AUC (none), accuracy at 0.5,
    then accuracy, sensitivity and specificity at the threshold chosen on `scope`; for more
    than two classes (no threshold), macro AUC, accuracy and balanced accuracy of argmax."""
    prefix = "fed" if scope.startswith("fed") else "val"
    if row["threshold"] != row["threshold"]:
        return (f"{scope} macro AUC {row[f'{prefix}_auc']:.3f}; argmax: acc "
                f"{row[f'{prefix}_acc']:.3f}, balanced acc {row[f'{prefix}_balanced_acc']:.3f}")
    return (f"{scope} AUC {row[f'{prefix}_auc']:.3f}, acc {row[f'{prefix}_acc']:.3f} at 0.5; "
            f"at threshold {row['threshold']:.3f}: acc {row['thr_acc']:.3f}, sens "
            f"{row['thr_sensitivity']:.3f}, spec {row['thr_specificity']:.3f}")
