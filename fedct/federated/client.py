"""The client update: one function, called by the embedded engine and by the Flower ClientApp."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedct import privacy
from fedct.byol import PairTrainee, pair_loss
from fedct.config import batch_for
from fedct.data.loading import ImageTensorDataset, SplitImages, make_loader
from fedct.data.manifest import LOCAL_VAL, Entry
from fedct.federated import features, strategies
from fedct.federated.local_loss import local_loss
from fedct.federated.protocol import ClientReply, Evaluation, Status, Update, Weights
from fedct.models import norm_keys
from fedct.multiclass import ClassHistograms
from fedct.operating_point import ScoreHistogram
from fedct.patients import patient_histogram
from fedct.training import (
    cosine_between,
    make_optimizer,
    predict,
    round_lr,
    seed_everything,
    train_epoch,
)


@dataclass
class ClientData:
    client_id: int
    train: ImageTensorDataset
    val: ImageTensorDataset | None = None


def client_data(client_id: int, images: SplitImages, entries: list[Entry], *, train_transform,
                eval_transform) -> ClientData:
    """A client's training rows and its local validation rows (if any), from its entries."""
    train = [e for e in entries if e.split == "train"]
    local = [e for e in entries if e.split == LOCAL_VAL]
    return ClientData(client_id, images.dataset(train, train_transform),
                      images.dataset(local, eval_transform) if local else None)


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from (run seed, round, client): resumes replay the same randomness."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def new_client_state(config) -> dict:
    state: dict = {"steps": 0, "rounds": 0}
    if config.dp:
        state["accountant"] = privacy.new_accountant_state(config)
        state["epsilon"] = 0.0
    return state


def load_global(model: nn.Module, global_weights: Weights, state: dict, *, fedbn: bool) -> None:
    weights = dict(global_weights)
    if fedbn and "norms" in state:
        weights.update(state["norms"])
    model.load_state_dict(weights, strict=True)


def client_update(model: nn.Module, global_weights: Weights, data: ClientData, config,
                  state: dict, *, round_number: int, device: torch.device,
                  num_classes: int, noise: float | None = None,
                  control: Weights | None = None) -> tuple[Update, dict]:
    """Train the global weights on one client's data; returns its update and its new state.

    `model` is the one shared model object (with the run's freezing already applied); its
    weights are overwritten here, so memory does not grow with the number of clients.
    `control` is the server's SCAFFOLD control variate; the client's own is in `state`.
    """
    state = dict(state)
    load_global(model, global_weights, state, fedbn=config.fedbn)
    loss_fn = local_loss(config, data.train.labels.tolist(), num_classes)
    train_set, trainee, on_step = data.train, model, None
    byol = config.objective == "byol"
    if byol:  # batches of view pairs, BYOL's loss; the client keeps its target between rounds
        trainee = PairTrainee(model, decay=cosine_between(config.target_decay, 1.0,
                                                          (round_number - 1) / config.rounds),
                              channels_last=config.channels_last,
                              target_state=state.get("byol_target"))
        loss_fn, on_step = pair_loss, trainee.after_step
    cached = features.applies(model, config)
    if cached:  # the frozen backbone runs once per run; only the head trains, on its features
        train_set = features.cached_features(model, data.train, config, device=device,
                                             seed=derive_seed(config.seed, 0, data.client_id))
        trainee = features.FeatureHead(model.get_classifier(), config.drop_rate)
        loss_fn = features.ViewsLoss(loss_fn, config.feature_views)
    seed = derive_seed(config.seed, round_number, data.client_id)
    seed_everything(seed)
    loader = make_loader(train_set, batch_size=batch_for(len(train_set), config.batch_size),
                         train=True, seed=seed, balance="none" if config.dp else config.balance,
                         num_classes=num_classes, drop_last=False if config.dp else None)
    optimizer = make_optimizer(model, config, lr=round_lr(config, round_number))
    hook = strategies.get(config.strategy).client_hook(model, optimizer, config,
                                                       control=control or {}, state=state)
    penalty = hook.penalty if hook else None
    target_steps = privacy.steps_per_round(len(data.train), config)
    loss_sum, seen, steps = 0.0, 0, 0

    def run_epochs(batches, opt) -> None:
        nonlocal loss_sum, seen, steps
        while steps < target_steps:
            result = train_epoch(trainee, batches, opt, loss_fn, device=device,
                                 grad_clip=0.0 if config.dp else config.grad_clip,
                                 amp=config.amp,
                                 channels_last=config.channels_last and not (cached or byol),
                                 max_steps=target_steps - steps, penalty=penalty, on_step=on_step)
            if result["steps"] == 0 and result["examples"] == 0 and len(data.train) == 0:
                break
            loss_sum += result["loss"] * result["examples"]
            seen += result["examples"]
            steps += result["steps"]

    if config.dp:
        with privacy.private_training(trainee, optimizer, loader, noise=noise,
                                      accountant_state=state["accountant"], config=config,
                                      loss_fn=loss_fn) as (dp_loader, dp_optimizer, result):
            run_epochs(dp_loader, dp_optimizer)
        state["accountant"] = result["accountant"]
        state["epsilon"] = privacy.epsilon_of(state["accountant"], config)
    else:
        run_epochs(loader, optimizer)
    weights = privacy.strip_prefix({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    control_change: Weights = {}
    if hook is not None:
        kept, control_change = hook.finish(global_weights, weights, steps)
        state.update(kept)
    if byol:
        state["byol_target"] = {k: v.detach().cpu().clone()
                                for k, v in trainee.target.state_dict().items()}
    if config.fedbn:
        keep = norm_keys(model)
        state["norms"] = {k: v for k, v in weights.items() if k in keep}
    state["steps"] = state.get("steps", 0) + steps
    state["rounds"] = state.get("rounds", 0) + 1
    metrics = {"train_loss": loss_sum / max(1, seen), "examples_seen": seen, "steps": steps}
    if config.dp:
        metrics["epsilon"] = state["epsilon"]
    return Update(weights=weights, examples=len(data.train), metrics=metrics,
                  control=control_change), state


def run_client_round(model: nn.Module, global_weights: Weights, data: ClientData, config,
                     state: dict, *, round_number: int, planned_rounds: int,
                     device: torch.device, num_classes: int, control: Weights | None = None):
    """One client's part of a round, privacy checks included; returns (ClientReply, state).

    The client fixes its own noise multiplier on its first round (for all `planned_rounds`)
    and sits out when its next round would pass the target epsilon: the budget is the
    client's to keep, not the server's.
    """
    if len(data.train) == 0:  # an empty client fails its part; the round goes on without it
        return ClientReply(data.client_id, None, status=Status.FAILED,
                           detail="no training rows"), state
    noise = None
    if config.dp:
        if "noise" not in state:
            total = planned_rounds * privacy.steps_per_round(len(data.train), config)
            state = {**state, "noise": privacy.calibrate_noise(
                n_examples=len(data.train), total_steps=total, config=config)}
        noise = state["noise"]
        projected = privacy.epsilon_of(
            state["accountant"], config, extra_steps=privacy.steps_per_round(len(data.train), config),
            noise=noise, rate=privacy.sample_rate(len(data.train), config.batch_size))
        if projected > config.target_epsilon * (1 + 1e-6):
            return ClientReply(data.client_id, None, status=Status.SAT_OUT, epsilon=state["epsilon"],
                               steps=state["steps"], noise=noise,
                               detail=f"epsilon would reach {projected:.2f} > target "
                                      f"{config.target_epsilon}"), state
    update, state = client_update(model, global_weights, data, config, state,
                                  round_number=round_number, device=device,
                                  num_classes=num_classes, noise=noise, control=control)
    return ClientReply(data.client_id, update, epsilon=state.get("epsilon"), steps=state["steps"],
                       noise=noise), state


def client_evaluate(model: nn.Module, global_weights: Weights,
                    dataset: ImageTensorDataset | None, config, state: dict, *, client_id: int,
                    device: torch.device, positive_index: int | None) -> Evaluation:
    """Score the global model (with this client's own norms under FedBN) on the client's
    rows (its validation rows, or what `fedct evaluate` asks for); only aggregates leave
    the client."""
    if dataset is None or len(dataset) == 0:
        return Evaluation(client_id)
    load_global(model, global_weights, state, fedbn=config.fedbn)
    probs, labels = predict(model, make_loader(dataset, batch_size=64, train=False, seed=0),
                            device=device, channels_last=config.channels_last, amp=config.amp,
                            tta=config.tta)
    picked = probs[np.arange(len(labels)), labels]
    loss_sum = float(-np.log(np.clip(picked, 1e-12, 1.0)).sum())
    correct = int((probs.argmax(axis=1) == labels).sum())
    if positive_index is None:  # more than two classes: per-class histograms, confusion matrix
        return Evaluation(client_id, examples=len(labels), loss_sum=loss_sum, correct=correct,
                          **ClassHistograms.of(labels, probs).flat())
    histogram = ScoreHistogram.of(labels == positive_index, probs[:, positive_index])
    if config.eval_release == "counts":  # only tp, fn, fp, tn leave: 2 bins at the threshold
        histogram, loss_sum, patients = histogram.collapsed(float(config.threshold)), 0.0, None
    else:
        patients = patient_histogram(dataset.groups, labels, probs, positive_index, shared=False)
    return Evaluation(client_id, examples=len(labels), loss_sum=loss_sum,
                      correct=correct, **histogram.flat(),
                      **(patients.flat("patient_") if patients else {}))
