"""The server side of a round, shared by both engines: check, aggregate, score, record.

The embedded engine and the Flower ServerApp differ only in how client updates arrive;
from there on both call `RoundServer.finish_round`, so both write the same run directory.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from fedct.federated.strategies import Update, Weights, aggregate, check_update
from fedct.federated.view import RoundView
from fedct.metrics import summary_metrics
from fedct.pretrain import monitor_value
from fedct.runs import (
    SUMMARY,
    append_summary,
    load_resume,
    read_checkpoint,
    save_checkpoint,
    save_resume,
    truncate_csv,
    write_report,
)
from fedct.training import mean_loss, predict

PRIVACY_CSV = "privacy.csv"
PRIVACY_FIELDS = ["round", "client", "epsilon", "steps", "noise_multiplier", "status"]


@dataclass
class ClientReply:
    """One client's answer in a round: an update, or why there is none."""

    client_id: int
    update: Update | None
    status: str = "trained"  # trained | sat out | failed
    epsilon: float | None = None
    steps: int = 0
    noise: float | None = None
    detail: str = ""


@dataclass
class RoundServer:
    out: Path
    config: object
    checkpoint_meta: dict
    console: Console
    trainable: set[str]
    model: torch.nn.Module | None = None
    pooled_val: object = None
    positive_index: int = 1
    device: torch.device = torch.device("cpu")
    server_state: dict = field(default_factory=dict)
    epsilon: dict[int, float] = field(default_factory=dict)
    progress: dict = field(default_factory=lambda: {"round": 0, "best": float("-inf"),
                                                    "best_round": 0})
    view: RoundView | None = None  # default: a line per round on `console`

    def __post_init__(self) -> None:
        if self.view is None:
            self.view = RoundView(self.console, rounds=self.config.rounds, dp=self.config.dp,
                                  live=False)

    def resume(self) -> tuple[Weights, dict]:
        """Global weights and the saved extra state (the embedded engine's client states)."""
        saved = load_resume(self.out)
        weights, _ = read_checkpoint(self.out / "last")
        self.server_state = saved["server_state"]
        self.epsilon = {int(k): v for k, v in saved.get("epsilon", {}).items()}
        self.progress = {k: saved[k] for k in self.progress}
        truncate_csv(self.out / SUMMARY, "round", self.progress["round"])
        truncate_csv(self.out / PRIVACY_CSV, "round", self.progress["round"])
        self.view.message(f"resuming {self.out} after round {self.progress['round']}")
        return weights, saved.get("extra", {})

    def evaluate(self, weights: Weights) -> dict:
        if self.model is None or self.pooled_val is None:
            nan = float("nan")
            return {"acc": nan, "auc": nan, "sensitivity": nan, "specificity": nan, "loss": nan}
        self.model.load_state_dict(weights)
        return score_model(self.model, self.pooled_val, device=self.device, config=self.config,
                           positive_index=self.positive_index)

    def finish_round(self, round_number: int, global_weights: Weights, replies: list[ClientReply],
                     *, started: float, local_val_acc: float = float("nan"),
                     extra_state: dict | None = None) -> Weights:
        config = self.config
        accepted: list[Update] = []
        privacy_rows = []
        for reply in replies:
            if reply.status == "trained" and reply.update is not None:
                problem = check_update(reply.update, global_weights)
                if problem:
                    reply.status, reply.detail = "rejected", problem
            if reply.status == "trained":
                accepted.append(reply.update)
                if reply.epsilon is not None:
                    self.epsilon[reply.client_id] = reply.epsilon
            else:
                self.view.message(f"round {round_number}: client {reply.client_id} "
                                  f"{reply.status}: {reply.detail}")
            if config.dp and reply.status in ("trained", "sat out"):
                privacy_rows.append({"round": round_number, "client": reply.client_id,
                                     "epsilon": round(self.epsilon.get(reply.client_id, 0.0), 4),
                                     "steps": reply.steps,
                                     "noise_multiplier": round(reply.noise or 0.0, 4),
                                     "status": reply.status})
        if len(accepted) < config.min_clients:
            self.view.message(f"round {round_number}: {len(accepted)} updates, fewer than "
                              f"min_clients {config.min_clients}; global model unchanged")
            accepted = []
        global_weights, self.server_state = aggregate(
            global_weights, accepted, strategy=config.strategy, config=config,
            server_state=self.server_state, trainable=self.trainable)
        metrics = self.evaluate(global_weights)
        seconds = time.perf_counter() - started
        examples = sum(u.examples for u in accepted)
        row = {"round": round_number, "clients": len(accepted),
               "train_loss": (sum(u.metrics["train_loss"] * u.examples for u in accepted) / examples
                              if examples else float("nan")),
               "val_loss": metrics["loss"], "val_acc": metrics["acc"], "val_auc": metrics["auc"],
               "val_sensitivity": metrics["sensitivity"],
               "val_specificity": metrics["specificity"],
               "local_val_acc": local_val_acc, "max_epsilon": self.max_epsilon(),
               "seconds": round(seconds, 2)}
        append_summary(self.out, row)
        if privacy_rows:
            self._append_privacy(privacy_rows)
        meta = {**self.checkpoint_meta, "round": round_number, "metrics": row}
        save_checkpoint(self.out / f"round-{round_number:04d}", global_weights, meta)
        self._drop_old_rounds(round_number)
        save_checkpoint(self.out / "last", global_weights, meta)
        score = monitor_value(metrics, config.monitor)
        if score > self.progress["best"] or self.progress["best_round"] == 0:
            self.progress.update(best=score, best_round=round_number)
            save_checkpoint(self.out / "best", global_weights, meta)
        self.view.round_finished(row, best_round=self.progress["best_round"])
        self.progress["round"] = round_number
        save_resume(self.out, {"server_state": self.server_state, "epsilon": self.epsilon,
                               "extra": extra_state or {}, **self.progress})
        return global_weights

    def finish(self, global_weights: Weights) -> dict:
        _, last_meta = read_checkpoint(self.out / "last")
        save_checkpoint(self.out / "final", global_weights, last_meta)
        _, best_meta = read_checkpoint(self.out / "best")
        report = {"stage": "federate", "run": str(self.out), "rounds": self.config.rounds,
                  "strategy": self.config.strategy, "best_round": self.progress["best_round"],
                  "monitor": self.config.monitor, "best": best_meta["metrics"],
                  "final": last_meta["metrics"], "dp": self.config.dp,
                  "epsilon": {str(k): v for k, v in sorted(self.epsilon.items())}
                  if self.config.dp else None,
                  "max_epsilon": self.max_epsilon() if self.config.dp else None}
        write_report(self.out, report)
        return report

    def max_epsilon(self) -> float:
        return float(max(self.epsilon.values())) if self.epsilon else 0.0

    def _append_privacy(self, rows: list[dict]) -> None:
        path = self.out / PRIVACY_CSV
        exists = path.is_file()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=PRIVACY_FIELDS)
            if not exists:
                writer.writeheader()
            writer.writerows(rows)

    def _drop_old_rounds(self, current: int) -> None:
        for path in self.out.glob("round-*.safetensors"):
            number = int(path.stem.split("-")[1])
            if number <= current - max(1, self.config.keep_last):
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)


def score_model(model: torch.nn.Module, dataset, *, device: torch.device, config,
                positive_index: int) -> dict:
    """The per-round numbers (accuracy, AUC, sensitivity, specificity, loss) on one dataset."""
    from fedct.data.loading import make_loader

    probs, truth = predict(model, make_loader(dataset, batch_size=64, train=False, seed=0),
                           device=device, channels_last=config.channels_last, amp=config.amp,
                           tta=config.tta)
    metrics = summary_metrics(probs, truth, positive_index)
    metrics["loss"] = mean_loss(probs, truth)
    return metrics
