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
from fedct.multiclass import ClassHistograms
from fedct.operating_point import BINS, ScoreHistogram

CLIENTS_CSV = "clients.csv"
CLIENT_FIELDS = ["round", "client", "status", "examples", "positives", "loss", "acc",
                 "sensitivity", "specificity", "auc", "detail"]

# A round's evaluations of the aggregated weights by the clients asked, in client order.
EvaluateRound = Callable[[int, Weights, list[int]], Iterable[Evaluation]]


def empty_histogram(classes: int) -> ScoreHistogram | ClassHistograms:
    return ClassHistograms.empty(classes) if classes > 2 else ScoreHistogram.empty()


def histogram_of(evaluation: Evaluation, classes: int = 2) -> ScoreHistogram | ClassHistograms:
    """The evaluation's histograms, checked against its shape and row count (per class for
    more than two classes)."""
    if not evaluation.examples:
        return empty_histogram(classes)
    if classes > 2:
        histograms = ClassHistograms.from_flat(evaluation.positives, evaluation.negatives,
                                               evaluation.confusion, classes)
        if histograms.n != evaluation.examples:
            raise ValueError(f"client {evaluation.client_id}: malformed evaluation histograms")
        return histograms
    positives = np.asarray(evaluation.positives, dtype=np.int64)
    negatives = np.asarray(evaluation.negatives, dtype=np.int64)
    if positives.shape != (BINS,) or negatives.shape != (BINS,) \
            or positives.sum() + negatives.sum() != evaluation.examples:
        raise ValueError(f"client {evaluation.client_id}: malformed evaluation histograms")
    return ScoreHistogram(positives, negatives)


def patients_of(evaluation: Evaluation) -> ScoreHistogram | None:
    """The evaluation's patient histograms (None when it sent none), checked: one bin
    array per label, at least one patient and no more patients than rows."""
    if not evaluation.patient_positives and not evaluation.patient_negatives:
        return None
    positives = np.asarray(evaluation.patient_positives, dtype=np.int64)
    negatives = np.asarray(evaluation.patient_negatives, dtype=np.int64)
    if positives.shape != (BINS,) or negatives.shape != (BINS,) or positives.min() < 0 \
            or negatives.min() < 0 or not 0 < positives.sum() + negatives.sum() <= evaluation.examples:
        raise ValueError(f"client {evaluation.client_id}: malformed patient histograms")
    return ScoreHistogram(positives, negatives)


@dataclass
class Pooled:
    """The round's evaluations summed over the clients that scored any rows; `patients`,
    the sum of their patient histograms (`without_patients`: how many sent none)."""

    histogram: ScoreHistogram | ClassHistograms
    examples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    clients: int = 0
    patients: ScoreHistogram | None = None
    without_patients: int = 0

    def patient_histogram(self) -> ScoreHistogram | None:
        """The val patients' histogram, for the patient-level operating point: only when
        every client sent one (else it would cover some clients' patients) and the rows
        share patients somewhere (else patients are slices)."""
        if self.patients is None or self.without_patients \
                or self.patients.n_pos + self.patients.n_neg >= self.examples:
            return None
        return self.patients

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
        at_half = self.histogram.metrics() if isinstance(self.histogram, ClassHistograms) \
            else self.histogram.metrics(0.5)
        return {**at_half, "loss": self.loss_sum / self.examples,
                "acc": self.correct / self.examples}


def pool(evaluations: Iterable[Evaluation],
         classes: int = 2) -> tuple[Pooled, list[Evaluation]]:
    """The pooled aggregates, and the evaluations with malformed ones marked failed."""
    pooled, checked = Pooled(empty_histogram(classes)), []
    for evaluation in evaluations:
        if evaluation.status is Status.EVALUATED and evaluation.examples:
            try:
                histogram = histogram_of(evaluation, classes)
                patients = patients_of(evaluation)
            except ValueError as exc:
                evaluation = Evaluation(evaluation.client_id, status=Status.REJECTED,
                                        detail=str(exc))
            else:
                pooled.histogram = pooled.histogram + histogram
                if patients is None:
                    pooled.without_patients += 1
                else:
                    pooled.patients = patients if pooled.patients is None \
                        else pooled.patients + patients
                pooled.examples += evaluation.examples
                pooled.loss_sum += evaluation.loss_sum
                pooled.correct += evaluation.correct
                pooled.clients += 1
        checked.append(evaluation)
    return pooled, checked


def client_rows(round_number: int, evaluations: list[Evaluation],
                counts: float | None = None, classes: int = 2) -> list[dict]:
    """clients.csv rows: each client's own figures on its own rows (at 0.5, or at the
    threshold of `counts`; argmax and macro AUC for more than two classes, with no
    positives count); a client with no validation rows has none."""
    rows = []
    for e in evaluations:
        if e.status is Status.EVALUATED and not e.examples:
            continue
        row = {"round": round_number, "client": e.client_id, "status": e.status.value,
               "examples": e.examples, "detail": e.detail}
        if e.status is Status.EVALUATED and e.examples:
            one = Pooled(histogram_of(e, classes), e.examples, e.loss_sum, e.correct,
                         1).metrics(counts)
            row.update(positives=int(np.sum(e.positives)) if classes == 2 else "",
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
