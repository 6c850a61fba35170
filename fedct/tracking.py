"""Following a run: TensorBoard event files (with `tensorboard: true`) and `curves.png`.

Both stages log the row they append to summary.csv, one step per epoch or round; stage 2
adds each client's epsilon. A resumed run purges the events after its resume point, as it
truncates summary.csv, so the curves never show a step twice.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from fedct.errors import FedctError
from fedct.files import atomic_write
from fedct.runs import write_report

BOARD_DIR = "tensorboard"
CURVES = "curves.png"
LOSS_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "fed_loss": "loss/federated_val"}


def scalar_tag(key: str) -> str | None:
    """Where a summary.csv column goes in TensorBoard; None for bookkeeping columns."""
    if key in ("epoch", "round", "seconds", "clients", "fed_clients", "fed_examples",
               "fed_auc_bin_error"):
        return None
    if key in LOSS_TAGS:
        return LOSS_TAGS[key]
    for prefix, group in (("val_", "val"), ("fed_", "federated_val"), ("thr_", "operating_point")):
        if key.startswith(prefix):
            return f"{group}/{key[len(prefix):]}"
    return {"threshold": "operating_point/threshold", "max_epsilon": "privacy/max_epsilon"}.get(key, key)


@dataclass
class TensorBoardLog:
    """Scalars per step into `out/tensorboard`; does nothing unless enabled. The writer opens
    at the first step this process logs and purges any older events from that step on."""

    out: Path
    enabled: bool
    writer: object = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.enabled:
            try:
                import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
            except ImportError:
                raise FedctError("tensorboard: true needs the tensorboard package: pip install "
                                 "'fedct[track]'") from None

    def log(self, step: int, row: dict, epsilon: dict[int, float] | None = None) -> None:
        if not self.enabled:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out / BOARD_DIR), purge_step=step)
        for key, value in row.items():
            tag = scalar_tag(key)
            if tag and isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), step)
        for client, value in sorted((epsilon or {}).items()):
            self.writer.add_scalar(f"privacy/epsilon_client_{client}", float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _series(rows: list[dict], step: str, key: str) -> tuple[list[int], list[float]] | None:
    points = [(int(r[step]), float(r[key])) for r in rows
              if r.get(key) not in (None, "", "nan") and math.isfinite(float(r[key]))]
    return (list(zip(*points, strict=True))) if points else None


LEGEND = {"train_loss": "train loss", "val_loss": "val loss", "fed_loss": "federated val loss",
          "val_acc": "val accuracy at 0.5", "val_auc": "val AUC",
          "fed_acc": "federated val accuracy at 0.5", "fed_auc": "federated val AUC"}


ARGMAX_LEGEND = {"val_acc": "val accuracy (highest probability)", "val_auc": "val macro AUC",
                 "fed_acc": "federated val accuracy (highest probability)",
                 "fed_auc": "federated val macro AUC"}


def plot_curves(out: Path, best: int | None = None, argmax: bool = False,
                byol: bool = False) -> Path | None:
    """Loss, accuracy and AUC per epoch or round from summary.csv, the best step marked,
    and each client's epsilon from privacy.csv when the run was private (`argmax`: more
    than two classes, accuracy of the most probable class and macro AUC; `byol`: a
    stage-0 run, its loss alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = _read_rows(out / "summary.csv")
    if not rows:
        return None
    step = "epoch" if "epoch" in rows[0] else "round"
    privacy = _read_rows(out / "privacy.csv")
    panels = 1 if byol else 3 if privacy else 2
    figure, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    axes = axes[0]
    named = Path(out).resolve()
    figure.suptitle(f"run {named.parent.name}/{named.name}" + (f": best {step} {best}" if best
                                                                else ""), fontsize=10)
    plotted = ((axes[0], ("train_loss",), "BYOL loss, the clients' mean (no labels)"),) if byol \
        else ((axes[0], ("train_loss", "val_loss", "fed_loss"), "loss"),
              (axes[1], ("val_acc", "val_auc", "fed_acc", "fed_auc"), "validation accuracy and AUC"))
    for ax, keys, title in plotted:
        for key in keys:
            series = _series(rows, step, key)
            if series:
                ax.plot(*series, marker="o", markersize=3,
                        label={**LEGEND, **(ARGMAX_LEGEND if argmax else {})}[key])
        if best:
            ax.axvline(best, color="0.5", linestyle=":", linewidth=1, label=f"best {step}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(step)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    if privacy:
        clients = sorted({int(r["client"]) for r in privacy})
        for client in clients:
            series = _series([r for r in privacy if int(r["client"]) == client], "round", "epsilon")
            if series:
                axes[2].plot(*series, marker="o", markersize=3, label=f"client {client}")
        axes[2].set_title("DP epsilon spent per client", fontsize=10)
        axes[2].set_xlabel("round")
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2].legend(fontsize=8)
    figure.tight_layout()
    target = out / CURVES
    atomic_write(target, lambda p: figure.savefig(p, dpi=100, format="png"))
    plt.close(figure)
    return target


def finish_run(out: Path, report: dict, board: TensorBoardLog) -> None:
    """A finished run's last files: report.json, then curves.png and MODEL_CARD.md from it."""
    from fedct.model_card import write_model_card

    write_report(out, report)
    board.close()
    byol = report.get("objective") == "byol"  # stage 0 keeps its last round: no best
    plot_curves(out, best=None if byol else report.get("best_epoch") or report.get("best_round"),
                argmax=(report.get("operating_point") or {}).get("rule") == "argmax",
                byol=byol)
    if not byol:  # a stage-0 backbone is no classifier to describe
        write_model_card(out)
