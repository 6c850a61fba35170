"""Federated validation: the clients score the aggregated model on their own validation rows,
and the server pools their aggregates, the same on both engines.

A client's `Evaluation` holds a loss sum, an argmax-correct count and per-label histograms
of the positive-class score; summed over clients they give the pooled accuracy, sensitivity,
specificity, AUC and the operating point as if the server had every client's rows, without
one score leaving a hospital. `clients.csv` keeps each client's own figures per round.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedct.federated.protocol import Evaluation, Status, Weights
from fedct.operating_point import BINS, ScoreHistogram

CLIENTS_CSV = "clients.csv"
CLIENT_FIELDS = ["round", "client", "status", "examples", "positives", "loss", "acc",
                 "sensitivity", "specificity", "auc", "detail"]

# A round's evaluations of the aggregated weights by the clients asked, in client order.
EvaluateRound = Callable[[int, Weights, list[int]], Iterable[Evaluation]]


def histogram_of(evaluation: Evaluation) -> ScoreHistogram:
    if not evaluation.examples:
        return ScoreHistogram.empty()
    positives = np.asarray(evaluation.positives, dtype=np.int64)
    negatives = np.asarray(evaluation.negatives, dtype=np.int64)
    if positives.shape != (BINS,) or negatives.shape != (BINS,) \
            or positives.sum() + negatives.sum() != evaluation.examples:
        raise ValueError(f"client {evaluation.client_id}: malformed evaluation histograms")
    return ScoreHistogram(positives, negatives)


@dataclass
class Pooled:
    """The round's evaluations summed over the clients that scored any rows."""

    histogram: ScoreHistogram
    examples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    clients: int = 0

    def metrics(self, counts: float | None = None) -> dict:
        """Loss, argmax accuracy and, at 0.5, sensitivity, specificity, balanced accuracy; AUC.
        `counts`: the clients sent only confusion counts at this threshold (no loss, no AUC;
        the figures are taken there)."""
        nan = float("nan")
        if not self.examples:
            return {"loss": nan, "acc": nan, "auc": nan, "sensitivity": nan,
                    "specificity": nan, "balanced_acc": nan}
        if counts is not None:
            return {**self.histogram.metrics(counts), "loss": nan, "auc": nan}
        at_half = self.histogram.metrics(0.5)
        return {**at_half, "loss": self.loss_sum / self.examples,
                "acc": self.correct / self.examples}


def pool(evaluations: Iterable[Evaluation]) -> tuple[Pooled, list[Evaluation]]:
    """The pooled aggregates, and the evaluations with malformed ones marked failed."""
    pooled, checked = Pooled(ScoreHistogram.empty()), []
    for evaluation in evaluations:
        if evaluation.status is Status.EVALUATED and evaluation.examples:
            try:
                histogram = histogram_of(evaluation)
            except ValueError as exc:
                evaluation = Evaluation(evaluation.client_id, status=Status.REJECTED,
                                        detail=str(exc))
            else:
                pooled.histogram = pooled.histogram + histogram
                pooled.examples += evaluation.examples
                pooled.loss_sum += evaluation.loss_sum
                pooled.correct += evaluation.correct
                pooled.clients += 1
        checked.append(evaluation)
    return pooled, checked


def client_rows(round_number: int, evaluations: list[Evaluation],
                counts: float | None = None) -> list[dict]:
    """clients.csv rows: each client's own figures on its own rows (at 0.5, or at the
    threshold of `counts`); a client with no validation rows has none."""
    rows = []
    for e in evaluations:
        if e.status is Status.EVALUATED and not e.examples:
            continue
        row = {"round": round_number, "client": e.client_id, "status": e.status.value,
               "examples": e.examples, "detail": e.detail}
        if e.status is Status.EVALUATED and e.examples:
            one = Pooled(histogram_of(e), e.examples, e.loss_sum, e.correct, 1).metrics(counts)
            row.update(positives=int(np.sum(e.positives)),
                       **{k: round(one[k], 6) for k in ("loss", "acc", "sensitivity",
                                                        "specificity", "auc")})
        rows.append(row)
    return rows


def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append CSV rows, with the header when the file is new."""
    if not rows:
        return
    exists = path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        if not exists:
            writer.writeheader()
        writer.writerows(rows)
