"""Patient-level diagnosis: slice scores aggregated per patient (or volume), and the
patient-level decision.

A patient's score is the mean of its slices' positive-class probabilities (`mean`), their
maximum (`max`), or the mean of its K highest (`top:K`); with more than two classes, the
mean of each class's probability, decided by the highest. A patient's label is its
slices' label; slices of one patient labelled differently are refused (a per-patient label
column must agree). `fedct evaluate --level patient` scores patients; a training run
with patients among its val rows stores the patient-level threshold, chosen on val like
the slice one, and `fedct predict` decides each group with it.
"""

from __future__ import annotations

import numpy as np

from fedct.errors import FedctError
from fedct.operating_point import ScoreHistogram

RULES = "mean, max or top:K"
# What training stores its patient-level threshold for. On COVID-CT's val, max and top:K
# score higher AUCs than mean, but there COVID patients have 6.7 slices each and the others
# 1.5 (30 of 38 a single slice): the maximum of more draws is higher with no signal at all,
# so those gains are confounded with the slice count. The mean is not.
PATIENT_AGGREGATE = "mean"


def parse_aggregate(text: str) -> tuple[str, int]:
    """('mean', 0), ('max', 0) or ('top', K) from an aggregate option."""
    kind, _, value = str(text).strip().lower().partition(":")
    if kind in ("mean", "max") and not value:
        return kind, 0
    if kind == "top" and value.isdigit() and int(value) >= 1:
        return "top", int(value)
    raise FedctError(f"aggregate {text!r}: choose {RULES}")


def aggregate_scores(scores: np.ndarray, rule: str) -> float:
    """One patient's score from its slices' positive-class probabilities."""
    kind, k = parse_aggregate(rule)
    if kind == "mean":
        return float(np.mean(scores))
    if kind == "max":
        return float(np.max(scores))
    return float(np.mean(np.sort(scores)[-k:]))


def by_patient(groups, labels: np.ndarray, probs: np.ndarray, rule: str, *,
               positive: int | None, where: str = "") -> dict:
    """Per patient (in order of first appearance): its id, label, slice count and score
    (`positive`'s aggregated probability; for more than two classes, `probs` holds the mean
    probability of every class). A patient whose slices carry two labels is an error."""
    groups = np.asarray(groups)
    ids, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first)
    patient_labels, counts, scores = [], [], []
    for g in order:
        members = np.flatnonzero(inverse == g)
        found = np.unique(labels[members])
        if len(found) > 1:
            raise FedctError(f"{where}patient {str(ids[g])!r}: its slices carry {len(found)} labels; "
                             "a patient-level diagnosis needs one label per patient")
        patient_labels.append(int(found[0]))
        counts.append(len(members))
        if positive is None:
            if parse_aggregate(rule)[0] != "mean":
                raise FedctError(f"aggregate {rule}: a model of more than two classes has no "
                                 "positive class to take the max of (use mean)")
            scores.append(probs[members].mean(axis=0))
        else:
            scores.append(aggregate_scores(probs[members, positive], rule))
    return {"ids": [str(ids[g]) for g in order], "labels": np.array(patient_labels),
            "slices": np.array(counts), "scores": np.array(scores)}


def one_label_each(groups, labels) -> bool:
    """Whether every group's rows carry one label."""
    seen: dict = {}
    return all(seen.setdefault(g, y) == y for g, y in zip(groups, np.asarray(labels).tolist(),
                                                          strict=True))


def has_patients(groups) -> bool:
    """Whether rows share patients at all (else a patient level is the slice level)."""
    groups = list(groups)
    return len(set(groups)) < len(groups)


def patient_histogram(groups, labels: np.ndarray, probs: np.ndarray, positive: int | None,
                      *, shared: bool = True) -> ScoreHistogram | None:
    """The histogram of the patients' mean positive-class scores, for a patient-level
    operating point: two classes only, and only when each patient carries one label (else
    the groups are not patients to diagnose) and, with `shared`, the rows share patients (a
    client sends its histogram either way: the server decides over all of them)."""
    if positive is None or groups is None or not one_label_each(groups, labels) \
            or (shared and not has_patients(groups)):
        return None
    found = by_patient(groups, labels, probs, PATIENT_AGGREGATE, positive=positive)
    return ScoreHistogram.of(found["labels"] == positive, found["scores"])


def patient_rows(labels: np.ndarray, probs: np.ndarray, groups, scopes: dict, rule: str, *,
                 positive: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The scored rows as patients: one label and one row of probabilities per patient (the
    aggregated score for the positive class, its complement for the other; the mean of
    each class for more), and each scope's patients (a patient lies in one client)."""
    patients = by_patient(groups, labels, probs, rule, positive=positive)
    if positive is None:
        patient_probs = np.stack(patients["scores"])
    else:
        patient_probs = np.zeros((len(patients["ids"]), probs.shape[1]))
        patient_probs[:, positive] = patients["scores"]
        patient_probs[:, 1 - positive] = 1 - patients["scores"]
    index = {pid: k for k, pid in enumerate(patients["ids"])}
    groups = np.asarray(groups)
    patient_scopes = {scope: np.array(sorted({index[str(g)] for g in groups[idx]}), dtype=int)
                      for scope, idx in scopes.items()}
    return patients["labels"], patient_probs, patient_scopes


def patient_meta(meta: dict, rule: str) -> tuple[dict, str | None]:
    """The sidecar as patient-level scoring reads it: its patient-level operating point when
    it stored one for this aggregate, else its slice threshold, with a note saying so."""
    point = meta.get("patient_operating_point")
    if point and point.get("aggregate") == rule:
        return {**meta, "operating_point": point}, None
    if meta.get("operating_point", {}).get("rule") == "argmax":
        return meta, None
    stored = f" (it stored one for {point['aggregate']})" if point else ""
    return meta, (f"no patient-level threshold for aggregate {rule} in the checkpoint{stored}: "
                  "patients are decided at its slice threshold")
