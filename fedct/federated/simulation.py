"""The embedded engine: federated rounds in one process, one model in memory.

Each round samples clients with a seeded generator and calls `run_client_round` for each
(the function the Flower ClientApp calls), then `RoundServer.finish_round` (what the Flower
ServerApp calls) to check, aggregate, score and record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from fedct.config import FederateConfig, to_dict
from fedct.data.loading import SplitImages, make_transform
from fedct.data.manifest import LOCAL_VAL, Split, load_split
from fedct.errors import FedctError
from fedct.federated.client import ClientData, load_global, new_client_state, run_client_round
from fedct.federated.server import RoundServer, score_model
from fedct.federated.view import RoundView
from fedct.models import apply_freeze, create_model, data_config
from fedct.pretrain import checkpoint_meta
from fedct.privacy import prepare_model_for_dp
from fedct.runs import checkpoint_paths, prepare_run_dir, read_checkpoint, write_config
from fedct.training import pick_device, seed_everything, set_threads


def sample_schedule(num_clients: int, config: FederateConfig) -> list[list[int]]:
    """Which clients train in each round, drawn up front from the run seed (resume-safe)."""
    per_round = config.clients_per_round or max(1, round(config.fraction * num_clients))
    if per_round > num_clients:
        raise FedctError(f"clients_per_round {per_round}: the split has {num_clients} clients")
    if per_round < config.min_clients:
        raise FedctError(f"{per_round} clients per round is below min_clients {config.min_clients}")
    rng = np.random.default_rng([config.seed, 7919])
    return [sorted(int(k) for k in rng.choice(num_clients, per_round, replace=False))
            for _ in range(config.rounds)]


@dataclass
class Federation:
    """Everything one federated run holds in memory besides the single model."""

    split: Split
    model: torch.nn.Module
    clients: list[ClientData]
    pooled_val: object
    dcfg: dict
    positive_index: int
    trainable: set[str]


def build_model(init: str, split: Split, config: FederateConfig):
    """Stage 1 checkpoint (architecture from its sidecar), or a pretrained source with --model."""
    weights, sidecar = checkpoint_paths(init)
    if sidecar.is_file():
        _, meta = read_checkpoint(init)
        if list(meta["classes"]) != list(split.classes):
            raise FedctError(f"{weights}: trained for classes {meta['classes']}, the split has "
                             f"{split.classes}")
        name = meta["architecture"]
    else:
        name = config.model
    model = create_model(name, len(split.classes), pretrained=init, drop_rate=config.drop_rate)
    prepare_model_for_dp(model, config)
    policy = "head" if config.dp and config.dp_train == "head" else config.freeze
    apply_freeze(model, policy, freeze_bn=config.freeze_bn)
    return model, name


def prepare(split_dir, init: str, config: FederateConfig) -> tuple[Federation, str]:
    split = load_split(split_dir)
    if split.num_clients < 1:
        raise FedctError(f"{split_dir}: the split has no clients")
    val_rows = split.select(split="val")
    if not val_rows:
        raise FedctError(f"{split_dir}: no val rows for the global model")
    model, architecture = build_model(init, split, config)
    dcfg = data_config(model, config.image_size)
    images = SplitImages(split, config.image_size)
    train_tf = make_transform(data_cfg=dcfg, train=True, config=config)
    eval_tf = make_transform(data_cfg=dcfg, train=False, config=config)
    clients = []
    for k in range(split.num_clients):
        train = images.dataset(split.select(split="train", clients=[k]), train_tf)
        local = split.select(split=LOCAL_VAL, clients=[k])
        clients.append(ClientData(k, train, images.dataset(local, eval_tf) if local else None))
    positive_index = split.classes.index(split.positive) if split.positive else 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fed = Federation(split=split, model=model, clients=clients,
                     pooled_val=images.dataset(val_rows, eval_tf), dcfg=dcfg,
                     positive_index=positive_index, trainable=trainable)
    return fed, architecture


def run_federate(split_dir, out, config: FederateConfig, *, init: str, resume: bool = False,
                 force: bool = False, quiet: bool = False, console: Console | None = None,
                 stop_after: int | None = None) -> dict:
    """Run (or resume) federated rounds; `stop_after` ends early after that round (for tests)."""
    console = Console(quiet=True) if quiet else (console or Console())
    set_threads()
    seed_everything(config.seed)  # a fresh head or a model from scratch starts the same
    device = pick_device(config.device)
    fed, architecture = prepare(split_dir, init, config)
    schedule = sample_schedule(len(fed.clients), config)
    out = prepare_run_dir(Path(out), resume=resume, force=force)
    fed.model.to(device)
    if config.channels_last:
        fed.model.to(memory_format=torch.channels_last)
    meta = checkpoint_meta(config, fed.split, fed.dcfg, stage="federate",
                           extra={"architecture": architecture, "fedbn": config.fedbn,
                                  "dp": config.dp,
                                  "dp_safe": bool(getattr(fed.model, "_fedct_dp_safe", False))})
    view = RoundView(console, rounds=config.rounds, dp=config.dp)
    server = RoundServer(out=out, config=config, checkpoint_meta=meta, console=console,
                         trainable=fed.trainable, model=fed.model, pooled_val=fed.pooled_val,
                         positive_index=fed.positive_index, device=device, view=view)
    global_weights = {k: v.detach().cpu().clone() for k, v in fed.model.state_dict().items()}
    client_states = {d.client_id: new_client_state(config) for d in fed.clients}
    if resume:
        global_weights, extra = server.resume()
        client_states = extra["client_states"]
    else:
        write_config(out, to_dict(config), command="federate",
                     extra={"engine": "embedded", "split": str(Path(split_dir).resolve()),
                            "init": str(init), "architecture": architecture,
                            "device": str(device), "clients": len(fed.clients),
                            "schedule": schedule})
    planned = planned_rounds(schedule, len(fed.clients))
    with view:
        for round_number in range(server.progress["round"] + 1, config.rounds + 1):
            started = time.perf_counter()
            view.start_round(round_number, schedule[round_number - 1])
            replies = []
            for k in schedule[round_number - 1]:
                view.client_started(k)
                reply, client_states[k] = run_client_round(
                    fed.model, global_weights, fed.clients[k], config, client_states[k],
                    round_number=round_number, planned_rounds=planned[k], device=device,
                    num_classes=len(fed.split.classes))
                view.client_finished(reply)
                replies.append(reply)
            local = _local_metrics(fed, global_weights, client_states, device, config)
            global_weights = server.finish_round(round_number, global_weights, replies,
                                                 started=started, local_val_acc=local,
                                                 extra_state={"client_states": client_states})
            if stop_after is not None and round_number >= stop_after:
                return {"stopped_after": round_number}
    return server.finish(global_weights)


def planned_rounds(schedule: list[list[int]], num_clients: int) -> dict[int, int]:
    """How many rounds each client is sampled for: what its privacy budget must last."""
    return {k: sum(k in chosen for chosen in schedule) for k in range(num_clients)}


def _local_metrics(fed, global_weights, client_states, device, config) -> float:
    """Mean accuracy on the clients' local validation sets (FedBN: each with its own norms)."""
    scores = []
    for data in fed.clients:
        if data.val is None or len(data.val) == 0:
            continue
        if config.fedbn:
            load_global(fed.model, global_weights, client_states[data.client_id], fedbn=True)
        scores.append(score_model(fed.model, data.val, device=device, config=config,
                                  positive_index=fed.positive_index)["acc"])
    if config.fedbn:
        fed.model.load_state_dict(global_weights)
    return float(np.mean(scores)) if scores else float("nan")
