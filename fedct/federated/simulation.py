"""The embedded engine: federated rounds in one process, one model in memory.

Each round samples clients with a seeded generator, calls `client_update` for each, and
`aggregate` on the server: the very functions the Flower app calls.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from fedct import privacy
from fedct.config import FederateConfig, to_dict
from fedct.data.loading import SplitImages, make_loader, make_transform
from fedct.data.manifest import LOCAL_VAL, Split, load_split
from fedct.errors import FedctError
from fedct.federated.client import ClientData, client_update, load_global, new_client_state
from fedct.federated.strategies import Update, aggregate, check_update
from fedct.metrics import summary_metrics
from fedct.models import apply_freeze, create_model, data_config, make_dp_safe
from fedct.pretrain import checkpoint_meta, monitor_value
from fedct.runs import (
    append_summary,
    atomic_write,
    checkpoint_paths,
    load_resume,
    prepare_run_dir,
    read_checkpoint,
    save_checkpoint,
    save_resume,
    truncate_summary,
    write_config,
    write_report,
)
from fedct.training import mean_loss, pick_device, predict, seed_everything, set_threads

PRIVACY_CSV = "privacy.csv"


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
    noise: dict[int, float] = field(default_factory=dict)


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
    if config.dp and config.dp_train == "full" and not getattr(model, "_fedct_dp_safe", False):
        make_dp_safe(model)
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


def evaluate_global(fed: Federation, dataset, device, config) -> dict:
    probs, truth = predict(fed.model, make_loader(dataset, batch_size=64, train=False, seed=0),
                           device=device, channels_last=config.channels_last, amp=config.amp)
    metrics = summary_metrics(probs, truth, fed.positive_index)
    metrics["loss"] = mean_loss(probs, truth)
    return metrics


def calibrate(fed: Federation, schedule: list[list[int]], config: FederateConfig) -> dict[int, float]:
    """Each client's noise multiplier for all the steps it will take in the rounds it is sampled."""
    noise = {}
    for data in fed.clients:
        rounds = sum(data.client_id in chosen for chosen in schedule)
        total = rounds * privacy.steps_per_round(len(data.train), config)
        noise[data.client_id] = privacy.calibrate_noise(n_examples=len(data.train),
                                                        total_steps=total, config=config)
    return noise


def _append_privacy(out: Path, rows: list[dict]) -> None:
    path = out / PRIVACY_CSV
    exists = path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["round", "client", "epsilon", "steps",
                                                    "noise_multiplier", "status"])
        if not exists:
            writer.writeheader()
        writer.writerows(rows)


def run_federate(split_dir, out, config: FederateConfig, *, init: str, resume: bool = False,
                 force: bool = False, quiet: bool = False, console: Console | None = None,
                 stop_after: int | None = None) -> dict:
    """Run (or resume) federated rounds; `stop_after` ends early after that round (for tests)."""
    console = Console(quiet=True) if quiet else (console or Console())
    out = Path(out)
    set_threads()
    seed_everything(config.seed)  # a fresh head or a model from scratch starts the same
    device = pick_device(config.device)
    fed, architecture = prepare(split_dir, init, config)
    schedule = sample_schedule(len(fed.clients), config)
    out = prepare_run_dir(out, resume=resume, force=force)
    fed.model.to(device)
    if config.channels_last:
        fed.model.to(memory_format=torch.channels_last)
    if config.dp:
        fed.noise = calibrate(fed, schedule, config)
    global_weights = {k: v.detach().cpu().clone() for k, v in fed.model.state_dict().items()}
    client_states = {d.client_id: new_client_state(config) for d in fed.clients}
    server_state: dict = {}
    progress = {"round": 0, "best": float("-inf"), "best_round": 0}
    if resume:
        saved = load_resume(out)
        global_weights, _ = read_checkpoint(out / "last")
        server_state, client_states = saved["server_state"], saved["client_states"]
        progress = {k: saved[k] for k in progress}
        truncate_summary(out, "round", progress["round"])
        _truncate_privacy(out, progress["round"])
        console.print(f"resuming {out} after round {progress['round']}")
    else:
        write_config(out, to_dict(config), command="federate",
                     extra={"split": str(Path(split_dir).resolve()), "init": str(init),
                            "architecture": architecture, "device": str(device),
                            "clients": len(fed.clients), "schedule": schedule,
                            "noise_multipliers": fed.noise or None})
    meta_base = {"fedbn": config.fedbn, "dp": config.dp,
                 "dp_safe": bool(getattr(fed.model, "_fedct_dp_safe", False))}
    history = []
    for round_number in range(progress["round"] + 1, config.rounds + 1):
        tick = time.perf_counter()
        accepted: list[Update] = []
        privacy_rows = []
        for k in schedule[round_number - 1]:
            data = fed.clients[k]
            state = client_states[k]
            if config.dp:
                steps = privacy.steps_per_round(len(data.train), config)
                rate = privacy.sample_rate(len(data.train), config.batch_size)
                projected = privacy.epsilon_of(state["accountant"], config, extra_steps=steps,
                                               noise=fed.noise[k], rate=rate)
                if projected > config.target_epsilon * (1 + 1e-6):
                    console.print(f"round {round_number}: client {k} sits out (epsilon would "
                                  f"reach {projected:.2f} > target {config.target_epsilon})")
                    privacy_rows.append({"round": round_number, "client": k,
                                         "epsilon": round(state["epsilon"], 4),
                                         "steps": state["steps"],
                                         "noise_multiplier": round(fed.noise[k], 4),
                                         "status": "sat out"})
                    continue
            update, new_state = client_update(fed.model, global_weights, data, config, state,
                                              round_number=round_number, device=device,
                                              num_classes=len(fed.split.classes),
                                              noise=fed.noise.get(k))
            problem = check_update(update, global_weights)
            if problem:
                console.print(f"round {round_number}: update of client {k} rejected: {problem}")
                continue
            client_states[k] = new_state
            accepted.append(update)
            if config.dp:
                privacy_rows.append({"round": round_number, "client": k,
                                     "epsilon": round(new_state["epsilon"], 4),
                                     "steps": new_state["steps"],
                                     "noise_multiplier": round(fed.noise[k], 4),
                                     "status": "trained"})
        if len(accepted) < config.min_clients:
            console.print(f"round {round_number}: {len(accepted)} updates, fewer than "
                          f"min_clients {config.min_clients}; global model unchanged")
            accepted = []
        global_weights, server_state = aggregate(global_weights, accepted,
                                                 strategy=config.strategy, config=config,
                                                 server_state=server_state,
                                                 trainable=fed.trainable)
        fed.model.load_state_dict(global_weights)
        metrics = evaluate_global(fed, fed.pooled_val, device, config)
        local = _local_metrics(fed, global_weights, client_states, device, config)
        seconds = time.perf_counter() - tick
        examples = sum(u.examples for u in accepted)
        row = {"round": round_number, "clients": len(accepted),
               "train_loss": (sum(u.metrics["train_loss"] * u.examples for u in accepted) / examples
                              if examples else float("nan")),
               "val_loss": metrics["loss"], "val_acc": metrics["acc"], "val_auc": metrics["auc"],
               "val_sensitivity": metrics["sensitivity"],
               "val_specificity": metrics["specificity"],
               "local_val_acc": local, "max_epsilon": _max_epsilon(client_states),
               "seconds": round(seconds, 2)}
        append_summary(out, row)
        if privacy_rows:
            _append_privacy(out, privacy_rows)
        history.append(row)
        console.print(f"round {round_number}/{config.rounds}: {len(accepted)} clients, "
                      f"train loss {row['train_loss']:.3f}, val acc {row['val_acc']:.3f}, "
                      f"AUC {row['val_auc']:.3f}"
                      + (f", max epsilon {row['max_epsilon']:.2f}" if config.dp else "")
                      + f" ({seconds:.1f}s)")
        meta = checkpoint_meta(config, fed.split, fed.dcfg, stage="federate",
                               extra={**meta_base, "architecture": architecture,
                                      "round": round_number, "metrics": row})
        save_checkpoint(out / f"round-{round_number:04d}", global_weights, meta)
        _drop_old_rounds(out, round_number, config.keep_last)
        save_checkpoint(out / "last", global_weights, meta)
        score = monitor_value(metrics, config.monitor)
        if score > progress["best"]:
            progress.update(best=score, best_round=round_number)
            save_checkpoint(out / "best", global_weights, meta)
        progress["round"] = round_number
        save_resume(out, {"server_state": server_state, "client_states": client_states,
                          **progress})
        if stop_after is not None and round_number >= stop_after:
            return {"stopped_after": round_number}
    _, last_meta = read_checkpoint(out / "last")
    save_checkpoint(out / "final", global_weights, {**last_meta, "stage": "federate"})
    _, best_meta = read_checkpoint(out / "best")
    report = {"stage": "federate", "run": str(out), "rounds": config.rounds,
              "strategy": config.strategy, "best_round": progress["best_round"],
              "monitor": config.monitor, "best": best_meta["metrics"], "final": last_meta["metrics"],
              "dp": config.dp,
              "epsilon": {str(k): s.get("epsilon") for k, s in client_states.items()}
              if config.dp else None,
              "max_epsilon": _max_epsilon(client_states) if config.dp else None}
    write_report(out, report)
    return report


def _local_metrics(fed, global_weights, client_states, device, config) -> float:
    """Mean accuracy on the clients' local validation sets (FedBN: each with its own norms)."""
    scores = []
    for data in fed.clients:
        if data.val is None or len(data.val) == 0:
            continue
        if config.fedbn:
            load_global(fed.model, global_weights, client_states[data.client_id], fedbn=True)
        scores.append(evaluate_global(fed, data.val, device, config)["acc"])
    if config.fedbn:
        fed.model.load_state_dict(global_weights)
    return float(np.mean(scores)) if scores else float("nan")


def _max_epsilon(client_states: dict) -> float:
    values = [s.get("epsilon", 0.0) for s in client_states.values()]
    return float(max(values)) if values else 0.0


def _drop_old_rounds(out: Path, current: int, keep: int) -> None:
    for path in out.glob("round-*.safetensors"):
        number = int(path.stem.split("-")[1])
        if number <= current - max(1, keep):
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)


def _truncate_privacy(out: Path, keep_through: int) -> None:
    path = out / PRIVACY_CSV
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["round"]) <= keep_through]

    def write(p: Path) -> None:
        with p.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["round", "client", "epsilon", "steps",
                                                        "noise_multiplier", "status"])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
