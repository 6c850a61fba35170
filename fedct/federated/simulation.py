"""The embedded engine: federated rounds in one process, one model in memory.

It builds the run's setup (`prepare_setup`, as the Flower ServerApp does), gives each client
its rows of the split, and hands the run driver (`engine.run_rounds`) an `InProcess`
transport, which calls `run_client_round` (the function the Flower ClientApp calls) for
each sampled client and `client_evaluate` (the ClientApp's too) for each client asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from fedct import privacy
from fedct.config import FederateConfig
from fedct.errors import FedctError
from fedct.federated.client import (
    ClientData,
    client_data,
    client_evaluate,
    new_client_state,
    run_client_round,
)
from fedct.federated.engine import Accept, run_rounds
from fedct.federated.protocol import Evaluation, RoundResult, Weights
from fedct.federated.setup import (
    RunSetup,
    eval_schedule,
    planned_rounds,
    prepare_setup,
    resolve_input_size,
    sample_schedule,
)
from fedct.federated.view import RoundView
from fedct.models import place_model
from fedct.training import pick_device, seed_everything, set_threads


@dataclass
class InProcess:
    """Every client in this process, trained one after another on the one shared model;
    the clients' own states (accountant, FedBN norms, SCAFFOLD control) stay here between
    rounds and go into the run's resume state."""

    setup: RunSetup
    clients: list[ClientData]
    schedule: list[list[int]]
    planned: dict[int, int]
    device: torch.device
    view: RoundView
    states: dict[int, dict] = field(default_factory=dict)
    engine: str = "embedded"

    def __post_init__(self) -> None:
        self.states = self.states or {d.client_id: new_client_state(self.setup.config)
                                      for d in self.clients}

    def train(self, round_number: int, weights: Weights, message: Weights,
              accept: Accept) -> RoundResult:
        setup, replies = self.setup, []
        for k in self.schedule[round_number - 1]:
            self.view.client_started(k)
            reply, self.states[k] = run_client_round(
                setup.model, weights, self.clients[k], setup.config, self.states[k],
                round_number=round_number, planned_rounds=self.planned[k], device=self.device,
                num_classes=len(setup.classes), control=message)
            replies.append(accept(reply))
        return RoundResult(replies)

    def evaluate(self, round_number: int, weights: Weights, asked: list[int],
                 next_message: Weights | None = None) -> list[Evaluation]:
        setup = self.setup
        return [client_evaluate(setup.model, weights, self.clients[k].val, setup.config,
                                self.states[k], client_id=k, device=self.device,
                                positive_index=setup.positive_index) for k in asked]

    def state_dict(self) -> dict:
        return {"client_states": dict(self.states)}

    def load_state_dict(self, state: dict) -> None:
        self.states = dict(state["client_states"])


def run_federate(split_dir, out, config: FederateConfig, *, init: str, resume: bool = False,
                 force: bool = False, quiet: bool = False, console: Console | None = None,
                 stop_after: int | None = None) -> dict:
    """Run (or resume) federated rounds; `stop_after` ends early after that round (for tests)."""
    console = Console(quiet=True) if quiet else (console or Console())
    if config.secure_aggregation:
        raise FedctError("secure_aggregation needs --engine flower: in one process the server "
                         "holds every update anyway")
    config, note = resolve_input_size(config, init)
    if note:
        console.print(f"note: {note}", highlight=False)
    set_threads()
    seed_everything(config.seed)  # a fresh head or a model from scratch starts the same
    device = pick_device(config.device)
    setup = prepare_setup(config, init=init, split_dir=split_dir)
    split = setup.split
    clients = [client_data(k, setup.images, split.select(clients=[k]),
                           train_transform=setup.transform(train=True),
                           eval_transform=setup.transform(train=False))
               for k in range(split.num_clients)]
    config = setup.config  # with the monitor resolved
    if config.val == "federated" and not any(d.val is not None for d in clients):
        raise FedctError(f"val federated: no client of {split.directory} has local validation "
                         "rows (make the split with --local-val)")
    schedule = sample_schedule(len(clients), config)
    evaluators = eval_schedule(len(clients), config)
    planned = planned_rounds(schedule, len(clients))
    place_model(setup.model, config, device)
    view = RoundView(console, rounds=config.rounds, dp=config.dp,
                     federated=config.monitor.startswith("fed_"), classes=len(setup.classes),
                     scored=config.objective != "byol")
    for data in clients:
        warning = privacy.delta_warning(len(data.train), config)
        if warning:
            view.message(f"warning: client {data.client_id}: {warning}")
    transport = InProcess(setup, clients, schedule, planned, device, view)
    return run_rounds(setup, Path(out), transport, num_clients=len(clients), schedule=schedule,
                      eval_plan=evaluators, device=device, view=view, resume=resume, force=force,
                      stop_after=stop_after)
