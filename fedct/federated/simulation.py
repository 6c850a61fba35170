"""The embedded engine: federated rounds in one process, one model in memory.

It builds the run's setup (`prepare_setup`, as the Flower ServerApp does), gives each client
its rows of the split, and passes `run_rounds` a round that calls `run_client_round` (the
function the Flower ClientApp calls) for each sampled client, and an evaluation that calls
`client_evaluate` (the ClientApp's too) for each client asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

from fedct import privacy
from fedct.config import FederateConfig
from fedct.errors import FedctError
from fedct.federated.client import (
    client_data,
    client_evaluate,
    new_client_state,
    run_client_round,
)
from fedct.federated.protocol import ClientReply, Evaluation, Weights
from fedct.federated.server import run_rounds
from fedct.federated.setup import (
    eval_schedule,
    place_model,
    planned_rounds,
    prepare_setup,
    resolve_input_size,
    sample_schedule,
)
from fedct.federated.view import RoundView
from fedct.training import pick_device, seed_everything, set_threads


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
                     federated=config.monitor.startswith("fed_"))
    for data in clients:
        warning = privacy.delta_warning(len(data.train), config)
        if warning:
            view.message(f"warning: client {data.client_id}: {warning}")
    kept = {"client_states": {d.client_id: new_client_state(config) for d in clients}}

    def train_round(round_number: int, global_weights: Weights,
                    control: Weights) -> Iterator[ClientReply]:
        states = kept["client_states"]
        for k in schedule[round_number - 1]:
            view.client_started(k)
            reply, states[k] = run_client_round(
                setup.model, global_weights, clients[k], config, states[k],
                round_number=round_number, planned_rounds=planned[k], device=device,
                num_classes=len(setup.classes), control=control)
            yield reply

    def evaluate_round(round_number: int, global_weights: Weights,
                       asked: list[int]) -> Iterator[Evaluation]:
        for k in asked:
            yield client_evaluate(setup.model, global_weights, clients[k].val, config,
                                  kept["client_states"][k], client_id=k, device=device,
                                  positive_index=setup.positive_index)

    return run_rounds(setup, Path(out), num_clients=len(clients), schedule=schedule,
                      train_round=train_round, engine="embedded", device=device, view=view,
                      resume=resume, force=force, kept=kept, evaluate_round=evaluate_round,
                      eval_plan=evaluators, stop_after=stop_after)
