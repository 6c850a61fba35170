"""The server's part of a round, shared by every transport: accept, aggregate, record.

`accept` checks each reply as it comes and hands its update to the strategy's collector
(a running average drops it at once; a robust strategy keeps the round's updates);
`aggregate` applies the strategy's step (quorum first); `record` scores the new global
model (the coordinator's pooled val rows when it has them, the clients' pooled
evaluations), chooses the operating point and has the run's `RunRecorder` write the round
(summary.csv, clients.csv, privacy.csv, checkpoints, and last of all resume.pt), so every
transport writes the same run directory. `fedct.federated.engine` runs the rounds.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedct.byol import BACKBONE, backbone_of, save_backbone
from fedct.data.loading import make_loader
from fedct.federated import strategies
from fedct.federated.protocol import ClientReply, Evaluation, SecureSum, Status, Weights
from fedct.federated.setup import RunSetup
from fedct.federated.strategies.base import RunningAverage, Strategy, check_update
from fedct.federated.validation import (
    CLIENT_FIELDS,
    CLIENTS_CSV,
    append_rows,
    client_rows,
    empty_histogram,
    pool,
)
from fedct.federated.view import RoundView
from fedct.models import norm_keys
from fedct.multiclass import ClassHistograms
from fedct.operating_point import ScoreHistogram, operating_point
from fedct.records import RunRecorder, patient_point, score
from fedct.runs import read_sidecar, save_checkpoint
from fedct.training import round_lr

PRIVACY_CSV = "privacy.csv"
METRICS = ("loss", "acc", "auc", "sensitivity", "specificity", "balanced_acc")
NO_SCORES = {k: float("nan") for k in METRICS}
PRIVACY_FIELDS = ["round", "client", "epsilon", "steps", "noise_multiplier", "status"]


def patient_point_meta(rule: str, patients: ScoreHistogram | None, source: str) -> dict:
    """The sidecar's patient-level operating point, chosen on the val patients the monitor
    uses (pooled, or the clients' federated histograms)."""
    point = patient_point(rule, patients, source)
    return {"patient_operating_point": point} if point else {}


@dataclass
class RoundServer:
    out: Path
    setup: RunSetup
    view: RoundView
    device: torch.device
    engine: str
    num_clients: int
    server_state: dict = field(default_factory=dict)
    epsilon: dict[int, float] = field(default_factory=dict)
    round: int = 0  # the last round recorded
    strategy: Strategy = field(init=False)
    recorder: RunRecorder = field(init=False)
    meta: dict = field(init=False)  # the checkpoints' sidecar, less round and metrics
    local_keys: set[str] = field(init=False)  # FedBN's local norms: the strategy leaves them

    def __post_init__(self) -> None:
        config = self.setup.config
        self.strategy = strategies.get(config.strategy)
        self.recorder = RunRecorder(self.out, monitor=config.monitor,
                                    keep_last=max(1, config.keep_last), prefix="round",
                                    tensorboard=config.tensorboard,
                                    csvs=(PRIVACY_CSV, CLIENTS_CSV))
        self.meta = self.setup.checkpoint_meta(engine=self.engine)
        self.local_keys = norm_keys(self.setup.model) if config.fedbn else set()

    def resume(self) -> tuple[Weights, dict]:
        """The committed round's global weights and the transport's saved state."""
        saved = self.recorder.resume(("weights", "server_state", "epsilon", "round", "extra"))
        self.server_state = saved["server_state"]
        self.epsilon = {int(k): v for k, v in saved["epsilon"].items()}
        self.round = int(saved["round"])
        self.view.message(f"resuming {self.out} after round {self.round}")
        return saved["weights"], saved["extra"]

    def collector(self, global_weights: Weights) -> RunningAverage:
        return self.strategy.collector(global_weights, self.setup.config)

    def accept(self, round_number: int, global_weights: Weights, reply: ClientReply,
               collected: RunningAverage) -> ClientReply:
        """Check one reply as it arrives and hand its update to the round's collector;
        returns the reply without the weights (a failed check marks it rejected)."""
        if reply.status is Status.TRAINED and not reply.summed_securely:
            problem = ("no update" if reply.update is None
                       else check_update(reply.update, global_weights, self.message()))
            if problem:
                reply = dataclasses.replace(reply, status=Status.REJECTED, detail=problem)
        if reply.status is Status.SAT_OUT and reply.epsilon is not None:
            # what the node has spent: more than it last reported when a resumed run
            # replays rounds it had trained
            self.epsilon[reply.client_id] = reply.epsilon
        if reply.status is not Status.TRAINED:
            self.view.message(f"round {round_number}: client {reply.client_id} "
                              f"{reply.status.value}: {reply.detail}")
            return reply
        if not reply.summed_securely:  # a secure round's updates reach the server as a sum
            collected.add(reply.update)
        if reply.epsilon is not None:
            self.epsilon[reply.client_id] = reply.epsilon
        return dataclasses.replace(reply, update=dataclasses.replace(reply.update, weights={},
                                                                     control={}))

    def message(self) -> Weights:
        """What the strategy sends with the global weights (SCAFFOLD's control), else {}."""
        self.server_state = self.strategy.ready_state(self.server_state, self.setup.model,
                                                      local_keys=self.local_keys)
        return self.strategy.message(self.server_state)

    def aggregate(self, round_number: int, global_weights: Weights, collected: RunningAverage,
                  secure_sum: SecureSum | None = None) -> Weights:
        """The strategy's step from the round's updates (none below min_clients)."""
        config = self.setup.config
        if secure_sum is not None:
            collected.add_mean(secure_sum.weights, secure_sum.control,
                               examples=secure_sum.examples, count=secure_sum.count)
        if collected.count < config.min_clients:
            self.view.message(f"round {round_number}: {collected.count} updates, fewer than "
                              f"min_clients {config.min_clients}; global model unchanged")
        if collected.count < max(1, config.min_clients):
            return dict(global_weights)
        self.message()  # the strategy's state is ready before its first step
        weights, self.server_state = self.strategy.step(
            global_weights, collected, self.server_state, config=config,
            trainable=self.setup.trainable, num_clients=self.num_clients)
        return weights

    def evaluate(self, weights: Weights) -> tuple[dict, ScoreHistogram | ClassHistograms,
                                                  ScoreHistogram | None]:
        """The global model on the coordinator's pooled val rows (NaN where it has none),
        and their patients' histogram when they share patients."""
        setup = self.setup
        if setup.pooled_val is None:
            return dict(NO_SCORES), empty_histogram(len(setup.classes)), None
        setup.model.load_state_dict(weights)
        return score(setup.model, make_loader(setup.pooled_val, batch_size=64, train=False, seed=0),
                     device=self.device, config=setup.config, positive_index=setup.positive_index,
                     groups=[e.row.group for e in setup.split.select(split="val")])

    def record(self, round_number: int, weights: Weights, replies: list[ClientReply],
               evaluations: list[Evaluation], *, updated: bool, started: float,
               extra_state: dict) -> None:
        """Score, choose the operating point, append the CSV rows, write checkpoints, and
        commit the round in resume.pt."""
        config = self.setup.config
        pooled, pooled_histogram, patients = self.evaluate(weights)
        federated, evaluations = pool(evaluations, len(self.setup.classes))
        counts = float(config.threshold) if config.eval_release == "counts" else None
        fed = federated.metrics(counts)
        on_federated = config.monitor.startswith("fed_")
        source = "federated val" if on_federated else "pooled val"
        point = operating_point(config.threshold,
                                federated.histogram if on_federated else pooled_histogram, source)
        accepted = [r.update for r in replies if r.status is Status.TRAINED] if updated else []
        examples = sum(u.examples for u in accepted)
        row = {"round": round_number, "clients": len(accepted),
               "train_loss": (sum(u.metrics["train_loss"] * u.examples for u in accepted) / examples
                              if examples else float("nan")),
               **{f"val_{k}": pooled[k] for k in METRICS},
               "fed_clients": federated.clients, "fed_examples": federated.examples,
               **{f"fed_{k}": fed[k] for k in METRICS},
               "fed_auc_bin_error": float("nan") if counts else federated.histogram.tie_bound(),
               "threshold": point["threshold"], "thr_acc": point["acc"],
               "thr_sensitivity": point["sensitivity"], "thr_specificity": point["specificity"],
               "max_epsilon": self.max_epsilon(), "lr": round_lr(config, round_number),
               "seconds": round(time.perf_counter() - started, 2)}
        append_rows(self.out / CLIENTS_CSV, CLIENT_FIELDS,
                    client_rows(round_number, evaluations, counts, len(self.setup.classes)))
        if config.dp:
            self._append_privacy(round_number, replies)
        self.recorder.record(round_number, row, weights=weights,
                             meta={**self.meta, "round": round_number, "metrics": row,
                                   "operating_point": point,
                                   **patient_point_meta(config.threshold,
                                                        federated.patient_histogram()
                                                        if on_federated else patients, source)},
                             epsilon=self.epsilon if config.dp else None)
        self.view.round_finished(row, best_round=self.recorder.best_step)
        self.round = round_number
        self.recorder.commit({"weights": weights, "round": round_number,
                              "server_state": self.server_state, "epsilon": self.epsilon,
                              "extra": extra_state})

    def finish(self, global_weights: Weights) -> dict:
        config = self.setup.config
        last_meta = read_sidecar(self.out / "last")
        save_checkpoint(self.out / "final", global_weights, last_meta)
        best_meta = read_sidecar(self.out / "best")
        report = {"stage": "federate", "run": str(self.out), "rounds": config.rounds,
                  "strategy": config.strategy, "best_round": self.recorder.best_step,
                  "monitor": config.monitor, "best": best_meta["metrics"],
                  "operating_point": best_meta["operating_point"],
                  "patient_operating_point": best_meta.get("patient_operating_point"),
                  "final": last_meta["metrics"], "dp": config.dp,
                  "epsilon": {str(k): v for k, v in sorted(self.epsilon.items())}
                  if config.dp else None,
                  "max_epsilon": self.max_epsilon() if config.dp else None}
        if config.objective == "byol":  # stage 0's product: the final backbone, for stage 1
            save_backbone(self.out, backbone_of(global_weights),
                          architecture=self.setup.spec.architecture, data_cfg=self.setup.data_cfg,
                          rounds=config.rounds, engine=self.engine)
            report.update(objective="byol", backbone=str(self.out / BACKBONE))
        self.recorder.finish(report)
        return report

    def max_epsilon(self) -> float:
        return float(max(self.epsilon.values())) if self.epsilon else 0.0

    def _append_privacy(self, round_number: int, replies: list[ClientReply]) -> None:
        rows = [{"round": round_number, "client": r.client_id,
                 "epsilon": round(self.epsilon.get(r.client_id, 0.0), 4), "steps": r.steps,
                 "noise_multiplier": round(r.noise or 0.0, 4), "status": r.status.value}
                for r in replies if r.status in (Status.TRAINED, Status.SAT_OUT)]
        append_rows(self.out / PRIVACY_CSV, PRIVACY_FIELDS, rows)
