"""The server side of a federated run, shared by both engines.

`run_rounds` opens (or resumes) the run directory and runs the rounds; the engines differ
only in the `train_round` and `evaluate_round` they pass, which yield each round's client
replies and the clients' evaluations of the aggregated model (in-process, or over Flower).
Each round the `RoundServer` accepts every reply as it comes (update checks; the update goes
into a running average and is dropped, so memory does not grow with the clients),
aggregates (quorum, strategy), scores the new global model (pooled val rows when the
coordinator has them, the clients' pooled evaluations), chooses the operating point, and
records the round (summary.csv, clients.csv, privacy.csv, checkpoints, and last of all
resume.pt, which holds everything a resume needs), so both engines write the same run
directory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedct.config import to_dict
from fedct.data.loading import make_loader
from fedct.data.manifest import split_digest
from fedct.federated import scaffold
from fedct.federated.client import norm_keys, round_lr
from fedct.federated.protocol import ClientReply, Evaluation, Status, Weights
from fedct.federated.setup import RunSetup
from fedct.federated.strategies import RunningAverage, apply_strategy, check_update
from fedct.federated.validation import (
    CLIENT_FIELDS,
    CLIENTS_CSV,
    EvaluateRound,
    append_rows,
    client_rows,
    pool,
)
from fedct.federated.view import RoundView
from fedct.locks import exclusive
from fedct.metrics import summary_metrics
from fedct.operating_point import ScoreHistogram, operating_point
from fedct.runs import (
    SUMMARY,
    CheckpointTracker,
    append_summary,
    check_resume_inputs,
    load_resume,
    prepare_run_dir,
    read_sidecar,
    save_checkpoint,
    save_resume,
    truncate_csv,
    write_config,
)
from fedct.tracking import TensorBoardLog, finish_run
from fedct.training import mean_loss, predict

PRIVACY_CSV = "privacy.csv"
METRICS = ("loss", "acc", "auc", "sensitivity", "specificity", "balanced_acc")
NO_SCORES = {k: float("nan") for k in METRICS}
PRIVACY_FIELDS = ["round", "client", "epsilon", "steps", "noise_multiplier", "status"]

# A round's replies to (round, global weights, the server's SCAFFOLD control or {}), yielded
# as they come (in client order, for bit-identical sums on both engines), so the server adds
# each update to a running average and drops it. A secure round (Flower, SecAgg+) yields
# replies without weights and returns the `SecureSum` of their updates instead.
TrainRound = Callable[[int, Weights, Weights], Iterable[ClientReply]]


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
    tracker: CheckpointTracker = field(init=False)
    board: TensorBoardLog = field(init=False)
    meta: dict = field(init=False)  # the checkpoints' sidecar, less round and metrics

    def __post_init__(self) -> None:
        config = self.setup.config
        self.tracker = CheckpointTracker(self.out, config.monitor,
                                         keep_last=max(1, config.keep_last), prefix="round")
        self.meta = self.setup.checkpoint_meta(engine=self.engine)
        self.board = TensorBoardLog(self.out, enabled=config.tensorboard)

    def resume(self) -> tuple[Weights, dict]:
        """The committed round's global weights and the engine's saved state."""
        saved = load_resume(self.out, ("weights", "server_state", "epsilon", "round", "tracker",
                                       "extra"))
        self.server_state = saved["server_state"]
        self.epsilon = {int(k): v for k, v in saved["epsilon"].items()}
        self.round = int(saved["round"])
        self.tracker.load_state_dict(saved["tracker"])
        truncate_csv(self.out / SUMMARY, "round", self.round)
        truncate_csv(self.out / PRIVACY_CSV, "round", self.round)
        truncate_csv(self.out / CLIENTS_CSV, "round", self.round)
        self.view.message(f"resuming {self.out} after round {self.round}")
        return saved["weights"], saved["extra"]

    def accept(self, round_number: int, global_weights: Weights, reply: ClientReply,
               running: RunningAverage) -> ClientReply:
        """Check one reply as it arrives and add its update to the round's running average;
        returns the reply without the weights (a failed check marks it rejected)."""
        if reply.status is Status.TRAINED and not reply.summed_securely:
            problem = ("no update" if reply.update is None
                       else check_update(reply.update, global_weights, self.control()))
            if problem:
                reply = dataclasses.replace(reply, status=Status.REJECTED, detail=problem)
        if reply.status is not Status.TRAINED:
            self.view.message(f"round {round_number}: client {reply.client_id} "
                              f"{reply.status.value}: {reply.detail}")
            return reply
        if not reply.summed_securely:  # a secure round's updates reach the server as a sum
            running.add(reply.update)
        if reply.epsilon is not None:
            self.epsilon[reply.client_id] = reply.epsilon
        return dataclasses.replace(reply, update=dataclasses.replace(reply.update, weights={},
                                                                     control={}))

    def control(self) -> Weights:
        """The server's SCAFFOLD control variate (zero before the first round), else {}.

        It covers the trainable parameters the server aggregates (not FedBN's local norms).
        """
        if self.setup.config.strategy != "scaffold":
            return {}
        if "control" not in self.server_state:  # built once, saved with the server state
            model = self.setup.model
            local = norm_keys(model) if self.setup.config.fedbn else set()
            self.server_state["control"] = scaffold.zero_control(
                model, scaffold.control_keys(model, exclude=local))
        return self.server_state["control"]

    def aggregate(self, round_number: int, global_weights: Weights,
                  running: RunningAverage) -> Weights:
        """The strategy's step from the round's average (none below min_clients updates)."""
        config = self.setup.config
        average = running.result()
        if running.count < config.min_clients:
            self.view.message(f"round {round_number}: {running.count} updates, fewer than "
                              f"min_clients {config.min_clients}; global model unchanged")
            average = None
        control = self.control()
        weights, self.server_state = apply_strategy(
            global_weights, average, strategy=config.strategy, config=config,
            server_state=self.server_state, trainable=self.setup.trainable)
        if control and average is not None:
            self.server_state["control"] = scaffold.server_control(
                control, running.control_sum, examples=running.examples,
                updates=running.count, num_clients=self.num_clients)
        return weights

    def evaluate(self, weights: Weights) -> tuple[dict, ScoreHistogram]:
        """The global model on the coordinator's pooled val rows (NaN where it has none)."""
        setup = self.setup
        if setup.pooled_val is None:
            return dict(NO_SCORES), ScoreHistogram.empty()
        setup.model.load_state_dict(weights)
        return score_model(setup.model, setup.pooled_val, device=self.device, config=setup.config,
                           positive_index=setup.positive_index)

    def record(self, round_number: int, weights: Weights, replies: list[ClientReply],
               evaluations: list[Evaluation], *, updated: bool, started: float,
               extra_state: dict) -> None:
        """Score, choose the operating point, append the CSV rows, write checkpoints, and
        commit the round in resume.pt."""
        config = self.setup.config
        pooled, pooled_histogram = self.evaluate(weights)
        federated, evaluations = pool(evaluations)
        counts = float(config.threshold) if config.eval_release == "counts" else None
        fed = federated.metrics(counts)
        on_federated = config.monitor.startswith("fed_")
        point = operating_point(config.threshold,
                                federated.histogram if on_federated else pooled_histogram,
                                "federated val" if on_federated else "pooled val")
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
        append_summary(self.out, row)
        self.board.log(round_number, row, self.epsilon if config.dp else None)
        append_rows(self.out / CLIENTS_CSV, CLIENT_FIELDS,
                    client_rows(round_number, evaluations, counts))
        if config.dp:
            self._append_privacy(round_number, replies)
        self.tracker.save(round_number, weights,
                          {**self.meta, "round": round_number, "metrics": row,
                           "operating_point": point}, row)
        self.view.round_finished(row, best_round=self.tracker.best_step)
        self.round = round_number
        save_resume(self.out, {"weights": weights, "round": round_number,
                               "server_state": self.server_state, "epsilon": self.epsilon,
                               "tracker": self.tracker.state_dict(), "extra": extra_state})

    def finish_round(self, round_number: int, global_weights: Weights,
                     replies: list[ClientReply], running: RunningAverage, *, started: float,
                     evaluate_round: EvaluateRound | None = None, asked: list[int] = (),
                     extra_state: dict | None = None) -> Weights:
        """Aggregate and record a round whose replies went through `accept`; `evaluate_round`
        has the `asked` clients score the aggregated model on their own validation rows (a
        client whose training failed this round is not asked: it would only time out)."""
        weights = self.aggregate(round_number, global_weights, running)
        failed = {r.client_id for r in replies if r.status is Status.FAILED}
        asked = [k for k in asked if k not in failed]
        evaluations = list(evaluate_round(round_number, weights, asked)) \
            if evaluate_round and asked else []
        self.record(round_number, weights, replies, evaluations,
                    updated=running.count >= self.setup.config.min_clients, started=started,
                    extra_state=extra_state or {})
        return weights

    def finish(self, global_weights: Weights) -> dict:
        config = self.setup.config
        last_meta = read_sidecar(self.out / "last")
        save_checkpoint(self.out / "final", global_weights, last_meta)
        best_meta = read_sidecar(self.out / "best")
        report = {"stage": "federate", "run": str(self.out), "rounds": config.rounds,
                  "strategy": config.strategy, "best_round": self.tracker.best_step,
                  "monitor": config.monitor, "best": best_meta["metrics"],
                  "operating_point": best_meta["operating_point"],
                  "final": last_meta["metrics"], "dp": config.dp,
                  "epsilon": {str(k): v for k, v in sorted(self.epsilon.items())}
                  if config.dp else None,
                  "max_epsilon": self.max_epsilon() if config.dp else None}
        finish_run(self.out, report, self.board)
        return report

    def max_epsilon(self) -> float:
        return float(max(self.epsilon.values())) if self.epsilon else 0.0

    def _append_privacy(self, round_number: int, replies: list[ClientReply]) -> None:
        rows = [{"round": round_number, "client": r.client_id,
                 "epsilon": round(self.epsilon.get(r.client_id, 0.0), 4), "steps": r.steps,
                 "noise_multiplier": round(r.noise or 0.0, 4), "status": r.status.value}
                for r in replies if r.status in (Status.TRAINED, Status.SAT_OUT)]
        append_rows(self.out / PRIVACY_CSV, PRIVACY_FIELDS, rows)


def run_rounds(setup: RunSetup, out: Path, *, num_clients: int, schedule: list[list[int]],
               train_round: TrainRound, engine: str, device: torch.device, view: RoundView, resume: bool = False,
               force: bool = False, kept: dict | None = None,
               evaluate_round: EvaluateRound | None = None, eval_plan: list[list[int]] | None = None,
               config_extra: dict | None = None, stop_after: int | None = None) -> dict:
    """Run (or resume) a federated run's rounds; returns the final report.

    `kept` is state the engine keeps on the server's machine between rounds (the embedded
    engine's client states): saved with every round, restored in place on resume.
    `eval_plan` lists the clients that score the aggregated model after each round.
    `stop_after` ends the run after that round without finishing it (for tests).
    The run directory is locked against a second writer while the rounds run.
    """
    with exclusive(out):
        return _rounds(setup, out, num_clients=num_clients, schedule=schedule,
                       train_round=train_round, engine=engine, device=device, view=view,
                       resume=resume, force=force, kept=kept, evaluate_round=evaluate_round,
                       eval_plan=eval_plan, config_extra=config_extra, stop_after=stop_after)


def _rounds(setup: RunSetup, out: Path, *, num_clients: int, schedule: list[list[int]],
            train_round: TrainRound, engine: str, device: torch.device, view: RoundView,
            resume: bool, force: bool, kept: dict | None, evaluate_round: EvaluateRound | None,
            eval_plan: list[list[int]] | None, config_extra: dict | None,
            stop_after: int | None) -> dict:
    config = setup.config
    out = prepare_run_dir(Path(out), resume=resume, force=force, **setup.inputs())
    server = RoundServer(out=out, setup=setup, view=view, device=device, engine=engine,
                         num_clients=num_clients)
    weights = {k: v.detach().cpu().clone() for k, v in setup.model.state_dict().items()}
    inputs = {"init": setup.init,
              "split": str(setup.split.directory.resolve()) if setup.split else None,
              "split_digest": split_digest(setup.split) if setup.split else None}
    if resume:
        check_resume_inputs(out, **inputs)
        weights, extra = server.resume()
        if kept is not None:
            kept.clear()
            kept.update(extra)
    else:
        write_config(out, to_dict(config), command="federate",
                     extra={"engine": engine, **inputs,
                            "architecture": setup.spec.architecture, "device": str(device),
                            "clients": num_clients, "schedule": schedule,
                            "eval_schedule": eval_plan,
                            **(config_extra or {})})
    if config.dp and any(eval_plan or []):
        view.message("note: epsilon covers the clients' training rows; federated validation "
                     "releases aggregates of their validation rows outside it (README: What "
                     "epsilon covers)")
    if config.dp and (config.local_loss != "ce" or config.balance == "loss"):
        view.message("note: the clients' loss reads their class counts (local_loss "
                     f"{config.local_loss}, balance {config.balance}); epsilon covers the "
                     "training rows' gradients given those counts, not the counts (README: "
                     "What epsilon covers)")
    with view:
        for round_number in range(server.round + 1, config.rounds + 1):
            started = time.perf_counter()
            view.start_round(round_number, schedule[round_number - 1])
            running = RunningAverage(weights)
            replies = []
            arriving = iter(train_round(round_number, weights, server.control()))
            while True:
                try:
                    reply = next(arriving)
                except StopIteration as stop:  # a secure round returns the sum of its updates
                    secure_sum = stop.value
                    break
                replies.append(server.accept(round_number, weights, reply, running))
                view.client_finished(replies[-1])
            if secure_sum is not None:
                running.add_mean(secure_sum.weights, secure_sum.control,
                                 examples=secure_sum.examples, count=secure_sum.count)
            weights = server.finish_round(round_number, weights, replies, running, started=started,
                                          evaluate_round=evaluate_round,
                                          asked=(eval_plan or [[]] * config.rounds)[round_number - 1],
                                          extra_state=dict(kept or {}))
            if stop_after is not None and round_number >= stop_after:
                return {"stopped_after": round_number}
    return server.finish(weights)


def score_model(model: torch.nn.Module, dataset, *, device: torch.device, config,
                positive_index: int) -> tuple[dict, ScoreHistogram]:
    """The per-round numbers (loss, accuracy, AUC, sensitivity, specificity, balanced
    accuracy) on one dataset, and its score histogram for the operating point."""
    probs, truth = predict(model, make_loader(dataset, batch_size=64, train=False, seed=0),
                           device=device, channels_last=config.channels_last, amp=config.amp,
                           tta=config.tta)
    metrics = summary_metrics(probs, truth, positive_index)
    metrics["loss"] = mean_loss(probs, truth)
    return metrics, ScoreHistogram.of(truth == positive_index, probs[:, positive_index])
