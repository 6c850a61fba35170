"""The run driver: one sequence of rounds for every transport.

A transport moves a round's messages: in process (`simulation.InProcess`), over Flower
(`flower_app.FlowerTransport`) or over Flower with SecAgg+
(`flower_app.SecureFlowerTransport`).
It sends the global weights (and the strategy's message) to the round's clients, hands
each reply to `accept` as it arrives, and returns the round's `RoundResult`; it has the
asked clients score the aggregated model. Everything else (opening or resuming the run
directory, the strategy, scoring, records) happens here and in `server.RoundServer`, so
the engines differ only in how messages travel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from fedct.config import to_dict
from fedct.data.manifest import split_digest
from fedct.federated.protocol import ClientReply, Evaluation, RoundResult, Status, Weights
from fedct.federated.server import RoundServer
from fedct.federated.setup import RunSetup
from fedct.federated.view import RoundView
from fedct.locks import exclusive
from fedct.runs import check_resume_inputs, prepare_run_dir, write_config

Accept = Callable[[ClientReply], ClientReply]


class Transport(Protocol):
    engine: str  # recorded in config.yaml and the checkpoints: embedded | flower

    def train(self, round_number: int, weights: Weights, message: Weights,
              accept: Accept) -> RoundResult:
        """Send a round to its scheduled clients; each reply goes through `accept` as it
        arrives, in client order (bit-identical sums on every transport)."""

    def evaluate(self, round_number: int, weights: Weights, asked: list[int],
                 next_message: Weights | None = None) -> list[Evaluation]:
        """The asked clients' evaluations of the aggregated weights, in client order.
        `next_message`, the strategy's message for the next round (None after the last):
        a transport may send that round's train messages in the same exchange (the next
        round trains on these weights) and hand their replies to the next `train`."""

    def state_dict(self) -> dict:
        """What the transport keeps on the server's machine between rounds (saved with
        every round: the embedded engine's client states)."""

    def load_state_dict(self, state: dict) -> None: ...


def run_rounds(setup: RunSetup, out: Path, transport: Transport, *, num_clients: int,
               schedule: list[list[int]], eval_plan: list[list[int]], device: torch.device,
               view: RoundView, resume: bool = False, force: bool = False,
               stop_after: int | None = None) -> dict:
    """Run (or resume) a federated run's rounds; returns the final report.

    `eval_plan` lists the clients that score the aggregated model after each round.
    `stop_after` ends the run after that round without finishing it (for tests).
    The run directory is locked against a second writer while the rounds run.
    """
    with exclusive(out):
        out = prepare_run_dir(Path(out), resume=resume, force=force, **setup.inputs())
        server = RoundServer(out=out, setup=setup, view=view, device=device,
                             engine=transport.engine, num_clients=num_clients)
        weights = open_run(setup, out, server, transport, resume=resume, schedule=schedule,
                           eval_plan=eval_plan, device=device)
        with view:
            for round_number in range(server.round + 1, setup.config.rounds + 1):
                weights = run_round(server, transport, round_number, weights,
                                    schedule=schedule[round_number - 1],
                                    asked=eval_plan[round_number - 1])
                if stop_after is not None and round_number >= stop_after:
                    return {"stopped_after": round_number}
        return server.finish(weights)


def open_run(setup: RunSetup, out: Path, server: RoundServer, transport: Transport, *,
             resume: bool, schedule, eval_plan, device) -> Weights:
    """The starting global weights: the model's, or the committed round's on resume (the
    transport's state restored too); a new run writes its config.yaml."""
    config = setup.config
    inputs = {"init": setup.init,
              "split": str(setup.split.directory.resolve()) if setup.split else None,
              "split_digest": split_digest(setup.split) if setup.split else None}
    weights = {k: v.detach().cpu().clone() for k, v in setup.model.state_dict().items()}
    if resume:  # the clients' states live with the engine that trained them
        check_resume_inputs(out, **inputs, engine=transport.engine)
        weights, kept = server.resume()
        transport.load_state_dict(kept)
    else:
        # `model` names what trains (the --init checkpoint's architecture), so this file
        # starts a new run of the same model as --config
        write_config(out, {**to_dict(config), "model": setup.spec.architecture},
                     command="federate",
                     extra={"engine": transport.engine, **inputs,
                            "architecture": setup.spec.architecture, "device": str(device),
                            "clients": server.num_clients, "schedule": schedule,
                            "eval_schedule": eval_plan})
    if config.dp and any(eval_plan):
        server.view.message("note: epsilon covers the clients' training rows; federated "
                            "validation releases aggregates of their validation rows outside "
                            "it (README: What epsilon covers)")
    if config.dp and (config.local_loss != "ce" or config.balance == "loss"):
        server.view.message("note: the clients' loss reads their class counts (local_loss "
                            f"{config.local_loss}, balance {config.balance}); epsilon covers "
                            "the training rows' gradients given those counts, not the counts "
                            "(README: What epsilon covers)")
    return weights


def run_round(server: RoundServer, transport: Transport, round_number: int, weights: Weights,
              *, schedule: list[int], asked: list[int]) -> Weights:
    """One round: train, accept, aggregate, evaluate, record; returns the new weights."""
    started = time.perf_counter()
    server.view.start_round(round_number, schedule)
    collected = server.collector(weights)

    def accept(reply: ClientReply) -> ClientReply:
        accepted = server.accept(round_number, weights, reply, collected)
        server.view.client_finished(accepted)
        return accepted

    result = transport.train(round_number, weights, server.message(), accept)
    new = server.aggregate(round_number, weights, collected, result.secure_sum)
    failed = {r.client_id for r in result.replies if r.status is Status.FAILED}
    asked = [k for k in asked if k not in failed]  # a failed client would only time out
    upcoming = server.message() if round_number < server.setup.config.rounds else None
    evaluations = transport.evaluate(round_number, new, asked, upcoming) if asked else []
    server.record(round_number, new, result.replies, evaluations,
                  updated=collected.count >= server.setup.config.min_clients, started=started,
                  extra_state=transport.state_dict())
    return new
