"""One federated run's setup, built the same way by the embedded engine and the Flower ServerApp.

From (config, init, data) it decides, once: the model and how it is built (architecture,
freeze policy, DP layers), its preprocessing, the classes and the positive class, the
trainable set, the pooled validation data (when the coordinator has a split), the
checkpoint metadata and the client schedule. A Flower node rebuilds the same model from the
`RoundSpec` the server derives here, through the same `model_spec` rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from fedct.config import FederateConfig
from fedct.data.loading import ImageTensorDataset, SplitImages, make_transform
from fedct.data.manifest import Split, load_split
from fedct.errors import FedctError
from fedct.federated.protocol import RoundSpec
from fedct.federated.run_model import model_spec
from fedct.metrics import positive_class, positive_index
from fedct.models import ModelSpec, build_model, data_config
from fedct.multiclass import check_settings
from fedct.runs import checkpoint_meta, checkpoint_paths, read_sidecar

UNLABELLED = ("scan",)  # the classes of a BYOL run whose coordinator has no split


def resolve_input_size(config: FederateConfig, init: str) -> tuple[FederateConfig, str | None]:
    """The config with its image size fixed: as given, else the init checkpoint's (stage 1's),
    else 224; and a note when a given size differs from the checkpoint's."""
    _, sidecar = checkpoint_paths(init)
    recorded = read_sidecar(init).get("input_size") if sidecar.is_file() else None
    trained = int(recorded[-1]) if recorded else None
    size = config.image_size or trained or 224
    note = None
    if config.image_size and trained and config.image_size != trained:
        note = (f"image_size {config.image_size} differs from {trained}, the size {init} was "
                "trained at")
    return dataclasses.replace(config, image_size=size), note


def run_inputs(split: Split | None, init: str) -> dict:
    """What a federated run reads, as `prepare_run_dir`'s keyword arguments: its output must
    stay apart from them."""
    return {"inputs": {"split": split.directory if split else None,
                       "init checkpoint": checkpoint_paths(init)[0]},
            "roots": {"dataset folder": split.root if split else None}}


def sample_schedule(num_clients: int, config: FederateConfig) -> list[list[int]]:
    """Which clients train in each round, drawn up front from the run seed (resume-safe)."""
    per_round = config.clients_per_round or max(1, round(config.fraction * num_clients))
    if per_round > num_clients:
        raise FedctError(f"clients_per_round {per_round}: the federation has {num_clients} clients")
    if config.secure_aggregation and per_round < 3:
        raise FedctError(f"secure_aggregation with {per_round} clients a round: needs at least "
                         "3 (with two, each learns the other's update from the sum)")
    if per_round < config.min_clients:
        raise FedctError(f"{per_round} clients per round is below min_clients {config.min_clients}")
    rng = np.random.default_rng([config.seed, 7919])
    return [sorted(int(k) for k in rng.choice(num_clients, per_round, replace=False))
            for _ in range(config.rounds)]


def eval_schedule(num_clients: int, config: FederateConfig) -> list[list[int]]:
    """Which clients score the global model after each round (`eval_fraction` of them), drawn
    up front from the run seed like the training schedule; none when val is pooled only."""
    if config.val == "pooled" or config.objective == "byol":  # BYOL reads no labels
        return [[] for _ in range(config.rounds)]
    per_round = max(1, round(config.eval_fraction * num_clients))
    rng = np.random.default_rng([config.seed, 7927])
    return [sorted(int(k) for k in rng.choice(num_clients, per_round, replace=False))
            for _ in range(config.rounds)]


def resolve_monitor(config: FederateConfig, *, pooled: bool) -> FederateConfig:
    """`monitor: auto` made concrete: pooled AUC when the coordinator has val rows and uses
    them, else the federated AUC; a pooled monitor without pooled rows is an error."""
    monitor = config.monitor
    if config.objective == "byol":  # no labels are read: the round's mean BYOL loss
        return dataclasses.replace(config, monitor="train_loss")
    if monitor == "auto":
        federated = "fed_balanced_acc" if config.eval_release == "counts" else "fed_auc"
        monitor = "val_auc" if pooled and config.val != "federated" else federated
    if monitor.startswith("val_") and not pooled:
        raise FedctError(f"monitor {monitor}: the coordinator has no val rows (give a split "
                         "with val rows, or monitor fed_auc on the clients' own val rows)")
    return dataclasses.replace(config, monitor=monitor)


def planned_rounds(schedule: list[list[int]], num_clients: int) -> dict[int, int]:
    """How many rounds each client is sampled for: what its privacy budget must last."""
    return {k: sum(k in chosen for chosen in schedule) for k in range(num_clients)}


@dataclass(frozen=True)
class RunSetup:
    """Everything a federated run's server decides before round 1."""

    config: FederateConfig
    init: str
    spec: ModelSpec
    model: nn.Module
    data_cfg: dict
    classes: list[str]
    positive: str | None  # None: more than two classes, decided by argmax
    split: Split | None  # the coordinator's split, when it has one
    images: SplitImages | None  # its images, decoded once
    pooled_val: ImageTensorDataset | None

    @property
    def positive_index(self) -> int | None:
        return positive_index(self.classes, self.positive)

    @property
    def trainable(self) -> set[str]:
        return {n for n, p in self.model.named_parameters() if p.requires_grad}

    def checkpoint_meta(self, *, engine: str) -> dict:
        config = self.config
        return checkpoint_meta(architecture=self.spec.architecture, classes=self.classes,
                               positive=self.positive, data_cfg=self.data_cfg, stage="federate",
                               engine=engine, fedbn=config.fedbn, dp=config.dp, tta=config.tta,
                               dp_safe=self.spec.groupnorm,
                               **({"objective": "byol"} if config.objective == "byol" else {}),
                               **({"volumes": self.split.meta["volumes"]}
                                  if self.split is not None and self.split.meta.get("volumes")
                                  else {}))

    def inputs(self) -> dict:
        return run_inputs(self.split, self.init)

    def round_spec(self, round_number: int, planned: int, run: str = "") -> RoundSpec:
        return RoundSpec(round=round_number, planned_rounds=planned, run=run,
                         architecture=self.spec.architecture, classes=tuple(self.classes),
                         positive=self.positive,
                         mean=tuple(float(v) for v in self.data_cfg["mean"]),
                         std=tuple(float(v) for v in self.data_cfg["std"]),
                         groupnorm=self.spec.groupnorm)

    def transform(self, *, train: bool):
        return make_transform(data_cfg=self.data_cfg, train=train, config=self.config)


def prepare_setup(config: FederateConfig, *, init: str,
                  split_dir: str | Path | None = None) -> RunSetup:
    """The run's setup from a starting point and, when the coordinator has one, a split.

    `init` is a fedct checkpoint (architecture and classes from its sidecar) or a pretrained
    source (hub, none, a weights file) for `config.model`; without a split, the classes
    come from the checkpoint.
    """
    if config.image_size < 1:
        raise FedctError("image_size is not resolved: call resolve_input_size first")
    split = load_split(split_dir) if split_dir else None
    weights, sidecar = checkpoint_paths(init)
    init_meta = read_sidecar(init) if sidecar.is_file() else {}
    if split is not None and init_meta and list(init_meta["classes"]) != list(split.classes):
        raise FedctError(f"{weights}: trained for classes {init_meta['classes']}, the split has "
                         f"{split.classes}")
    byol = config.objective == "byol"
    if split is None and not init_meta and not byol:
        raise FedctError(f"--init {init}: without a split the classes must come from a fedct "
                         "checkpoint")
    if split is None and byol:  # the nodes' rows are unlabelled: one class stands for all
        classes, positive = list(UNLABELLED), None
    else:
        classes = list(split.classes if split is not None else init_meta["classes"])
        positive = positive_class(classes, split.positive if split is not None
                                  else init_meta.get("positive"))
    check_settings(config, classes)
    spec = model_spec(config, init_meta.get("architecture", config.model), len(classes),
                      groupnorm=bool(init_meta.get("dp_safe")))
    model = build_model(spec, pretrained=init)
    data_cfg = data_config(model, config.image_size)
    images = pooled_val = None
    if split is not None:
        if split.num_clients < 1:
            raise FedctError(f"{split.directory}: the split has no clients")
        images = SplitImages(split, config.image_size)
        val_rows = (split.select(split="val")
                    if config.val != "federated" and config.objective != "byol" else [])
        if val_rows:
            pooled_val = images.dataset(val_rows, make_transform(data_cfg=data_cfg, train=False,
                                                                 config=config))
    if config.val == "pooled" and pooled_val is None and config.objective != "byol":
        raise FedctError(f"val pooled: the coordinator has no val rows ("
                         f"{split.directory if split else 'no split'}); use val federated or both")
    config = resolve_monitor(config, pooled=pooled_val is not None)
    return RunSetup(config=config, init=str(init), spec=spec, model=model, data_cfg=data_cfg,
                    classes=classes, positive=positive, split=split, images=images,
                    pooled_val=pooled_val)
