"""Federated cross-site evaluation: checkpoints scored on every node's own rows, no image moved.

`fedct evaluate CKPT... --engine flower` submits a Flower run whose ServerApp sends each
checkpoint to every node that answers; each node scores its validation, test or training
rows (`--on`) and returns only an `Evaluation` (loss sum, correct count, per-label score
histograms). The coordinator writes the `fedct evaluate` report: a row per hospital and the
pooled rows, each with bootstrap intervals computed from the histograms' rows (resampled by
image: the coordinator does not know the patients).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedct.errors import FedctError
from fedct.evaluation import checkpoint_names, score_checkpoint, write_evaluation
from fedct.federated.protocol import Evaluation, RoundSpec, RunExtras, Status
from fedct.federated.validation import histogram_of
from fedct.metrics import positive_class
from fedct.operating_point import ScoreHistogram
from fedct.runs import checkpoint_paths, read_sidecar

ON = {"val": "val", "local_val": "val", "test": "test", "train": "train", "all": "all"}


def spec_of(meta: dict) -> RoundSpec:
    """What a node needs to rebuild a checkpoint's model and read its rows."""
    classes = list(meta["classes"])
    return RoundSpec(round=0, planned_rounds=0, architecture=meta["architecture"],
                     classes=tuple(classes),
                     positive=positive_class(classes, meta.get("positive")),
                     mean=tuple(float(v) for v in meta["mean"]),
                     std=tuple(float(v) for v in meta["std"]),
                     groupnorm=bool(meta.get("dp_safe")))


def report_of(checkpoints: list[str], replies: dict[str, list[Evaluation]], extras: RunExtras,
              *, tta: bool) -> dict:
    """The `fedct evaluate` report of the nodes' evaluations of each checkpoint."""
    results, curves, negative, images = [], {}, "negative", 0
    for checkpoint, name in zip(checkpoints, checkpoint_names(checkpoints), strict=True):
        meta = read_sidecar(checkpoint)  # the weights were read and sent by the ServerApp
        spec = spec_of(meta)
        answered = [e for e in replies[checkpoint] if e.status is Status.EVALUATED and e.examples]
        if not answered:
            raise FedctError(f"{checkpoint}: no node has {ON[extras.eval_rows]} rows to score "
                             f"({_statuses(replies[checkpoint])})")
        # the pooled rows are the clients' rows side by side: each client's are a slice
        histograms = {f"client {e.client_id}": histogram_of(e) for e in answered}
        parts = {name: h.rows() for name, h in histograms.items()}
        truth = np.concatenate([t for t, _ in parts.values()])
        score = np.concatenate([s for _, s in parts.values()])
        scopes, start = {"all": np.arange(len(truth))}, 0
        for name, (client_truth, _) in parts.items():
            scopes[name] = np.arange(start, start + len(client_truth))
            start += len(client_truth)
        pooled = sum(histograms.values(), ScoreHistogram.empty())
        results += score_checkpoint(name,
                                    str(checkpoint_paths(checkpoint)[0]), meta, spec.positive,
                                    truth, score, None, scopes,
                                    threshold=extras.eval_threshold or None,
                                    n_boot=extras.eval_bootstrap, seed=extras.eval_seed)
        results[-len(scopes)].update(auc_bin_error=pooled.tie_bound(),  # the "all" row
                                     nodes=_statuses(replies[checkpoint]))
        curves[name] = (truth, score)
        negative = next((c for c in spec.classes if c != spec.positive), negative)
        images = max(images, len(truth))
    report = {"data": f"federation, each node's {ON[extras.eval_rows]} rows", "images": images,
              "bootstrap": extras.eval_bootstrap, "seed": extras.eval_seed, "tta": tta,
              "grouped_bootstrap": False, "results": results}
    return write_evaluation(Path(extras.out), report, curves, negative)


def _statuses(evaluations: list[Evaluation]) -> str:
    return ", ".join(f"client {e.client_id}: {e.status.value}"
                     + (f" {e.examples} rows" if e.examples else "")
                     + (f" ({e.detail})" if e.detail else "") for e in evaluations)


def checkpoints_of(extras: RunExtras) -> list[str]:
    return list(json.loads(extras.evaluate))
