"""What both stages write of a run, step by step (an epoch or a round), and how they score
a step on val.

`RunRecorder` owns a run directory's records: the summary.csv row and any extra CSV rows
of the step, TensorBoard, the checkpoints (numbered, `last`, `best` by the monitor), the
resume state written last of all (a step is committed only once resume.pt names it), and
the finished run's report, curves and model card. On resume it restores the checkpoint
tracker and drops CSV rows written after the committed step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedct.metrics import summary_metrics
from fedct.multiclass import ClassHistograms
from fedct.operating_point import ScoreHistogram, operating_point
from fedct.patients import PATIENT_AGGREGATE, patient_histogram
from fedct.runs import (
    SUMMARY,
    CheckpointTracker,
    append_summary,
    load_resume,
    save_resume,
    truncate_csv,
)
from fedct.tracking import TensorBoardLog, finish_run
from fedct.training import mean_loss, predict


def score(model: torch.nn.Module, loader, *, device: torch.device, config,
          positive_index: int | None, groups=None) -> tuple[dict, ScoreHistogram | ClassHistograms,
                                                             ScoreHistogram | None]:
    """A step's numbers on one loader (loss, accuracy, AUC, sensitivity, specificity,
    balanced accuracy at 0.5), its score histogram, for the operating point (per class for
    more than two classes), and, for two classes when the rows' `groups` share patients,
    the histogram of the patients' mean scores, for the patient-level operating point (none
    when a patient's slices carry two labels: such groups are not patients to diagnose)."""
    probs, truth = predict(model, loader, device=device, channels_last=config.channels_last,
                           amp=config.amp, tta=config.tta)
    metrics = summary_metrics(probs, truth, positive_index)
    metrics["loss"] = mean_loss(probs, truth)
    if probs.shape[1] > 2:
        return metrics, ClassHistograms.of(truth, probs), None
    return (metrics, ScoreHistogram.of(truth == positive_index, probs[:, positive_index]),
            patient_histogram(groups, truth, probs, positive_index))


def patient_point(rule: str, patients: ScoreHistogram | None, source: str) -> dict | None:
    """The patient-level operating point chosen by `rule` on val patients, with its aggregate."""
    if patients is None:
        return None
    return {**operating_point(rule, patients, f"{source}, per patient"), "auc": patients.auc(),
            "aggregate": PATIENT_AGGREGATE, "patients": patients.n_pos + patients.n_neg}


class RunRecorder:
    """One run directory's records; `step_column` is "epoch" or "round"."""

    def __init__(self, out: Path, *, monitor: str, keep_last: int, prefix: str,
                 tensorboard: bool, csvs: tuple[str, ...] = ()):
        self.out = Path(out)
        self.step_column = prefix
        self.csvs = (SUMMARY, *csvs)
        self.tracker = CheckpointTracker(self.out, monitor, keep_last=keep_last, prefix=prefix)
        self.board = TensorBoardLog(self.out, enabled=tensorboard)

    def resume(self, required: tuple[str, ...]) -> dict:
        """The committed resume state; the tracker restored, later CSV rows dropped."""
        saved = load_resume(self.out, (*required, "tracker"))
        self.tracker.load_state_dict(saved["tracker"])
        step = int(saved[self.step_column])
        for name in self.csvs:
            truncate_csv(self.out / name, self.step_column, step)
        return saved

    def record(self, step: int, row: dict, *, weights: dict[str, torch.Tensor], meta: dict,
               metrics: dict | None = None, epsilon: dict | None = None) -> bool:
        """Append the step's summary row, log it, write its checkpoints; True when the step
        is the new best by `metrics` (the row's own values unless given)."""
        append_summary(self.out, row)
        self.board.log(step, row, epsilon)
        return self.tracker.save(step, weights, meta, row if metrics is None else metrics)

    def commit(self, state: dict) -> None:
        """Write the resume state (the tracker's with it): the step is now done."""
        save_resume(self.out, {**state, "tracker": self.tracker.state_dict()})

    @property
    def best_step(self) -> int:
        return self.tracker.best_step

    def finish(self, report: dict) -> None:
        finish_run(self.out, report, self.board)
