"""The typed configuration: one flat dataclass per command, so a YAML file, a CLI flag and
a Flower run-config key (`local-epochs`) all name the same field (`local_epochs`).

`fedct.configure` builds one from defaults, YAML and overrides, and checks it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Options shared by both stages: model, input pipeline and the local training loop."""

    model: str = "tf_efficientnet_lite0"
    pretrained: str = "hub"  # hub | none | path to weights or a fedct checkpoint
    image_size: int = 224
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9
    weight_decay: float = 0.01
    layer_decay: float = 1.0  # < 1: layer-wise lr decay, earlier blocks learn slower
    label_smoothing: float = 0.1
    balance: str = "none"  # none | loss | sampler
    grad_clip: float = 0.0
    freeze: str = "full"  # full | head | last-N
    freeze_bn: bool = False
    drop_rate: float = 0.2
    augment: bool = True
    tta: bool = False  # validate on the mean of each image and its mirror
    threshold: str = "0.5"  # the operating point, chosen on val: 0.5 | youden | eer | sens:X | spec:X
    aug_scale_min: float = 0.6
    aug_rotation: float = 10.0
    aug_flip: bool = True
    aug_brightness: float = 0.2
    aug_contrast: float = 0.2
    erase_prob: float = 0.0  # random erasing: chance that a rectangle of a training image is blanked
    channels_last: bool = True
    amp: bool = True  # bfloat16 autocast, only on CUDA
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    tensorboard: bool = False  # also write TensorBoard event files (summary.csv and curves.png always)


@dataclass
class PretrainConfig(TrainConfig):
    """Stage 1: central transfer learning."""

    epochs: int = 10
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    patience: int = 0  # early stopping; 0 = off
    ema_decay: float = 0.0  # > 0: validate and checkpoint an EMA of the weights (timm ModelEmaV3)
    mixup_alpha: float = 0.0  # > 0: timm Mixup of each batch with its reverse, Beta(alpha, alpha)
    cutmix_alpha: float = 0.0  # > 0: timm CutMix (with mixup too: one of them per batch)
    mix_prob: float = 1.0  # share of batches mixed
    average_last: int = 0  # > 0: also write RUN/averaged, the mean of the last K epochs' weights
    monitor: str = "val_auc"  # val_auc | val_acc | val_loss | val_balanced_acc
    clients: list[int] | None = None  # pretrain on these clients' training rows only
    rows: str | None = None  # or on rows whose site/client equals this value


@dataclass
class ByolOptions:
    """BYOL's own options, shared by stage 0 central (`fedct selfsup`) and federated
    (`fedct federate --objective byol`)."""

    target_decay: float = 0.99  # the target network's EMA decay, raised to 1 over the run
    projection_dim: int = 128
    hidden_dim: int = 1024
    crop_scale_min: float = 0.25  # views are crops of at least this share of the image


@dataclass
class FederateConfig(ByolOptions, TrainConfig):
    """Stage 2: federated rounds over the clients of a split (or stage 0, objective byol)."""

    objective: str = "supervised"  # supervised | byol: self-supervised on the clients' images
    pretrained: str = "none"
    image_size: int = 0  # 0: the init checkpoint's input size (224 for other sources)
    batch_size: int | str = 32  # or "all": every example in every step (full-batch DP)
    rounds: int = 10
    local_epochs: int = 1
    local_steps: int = 0  # if > 0, replaces local_epochs
    lr_schedule: str = "constant"  # constant | cosine: client lr decays over the rounds
    min_lr: float = 1e-6
    fraction: float = 1.0
    clients_per_round: int = 0  # if > 0, replaces fraction
    min_clients: int = 1
    strategy: str = "fedavg"  # fedct.federated.strategies: fedct federate --help lists them
    local_loss: str = "ce"  # ce | balanced-softmax | fedlc | fedrs: the client's own label prior
    fedlc_tau: float = 1.0
    fedrs_alpha: float = 0.5
    mu: float = 0.01
    server_lr: float = 1.0
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2  # fedtrimmedavg: the share of values cut from each end
    fedbn: bool = False
    monitor: str = "auto"  # auto: val_auc with a pooled val set, else fed_auc
    val: str = "both"  # pooled (coordinator's val rows) | federated (clients' own) | both
    eval_fraction: float = 1.0  # share of clients that score the global model each round
    eval_release: str = "histograms"  # histograms | counts (confusion counts at a fixed threshold)
    keep_last: int = 2
    dp: bool = False
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0  # if > 0, fixed noise instead of calibrating to the target
    dp_train: str = "head"  # head | norms | full
    cache_features: bool = True  # head-only training on features computed once per run
    feature_views: int = 1  # augmented views per image in the feature cache (K)
    physical_batch_size: int = 32
    grad_sample_mode: str = "functorch"  # hooks | functorch
    accountant: str = "rdp"
    # Flower only: SecAgg+ (the coordinator sees only the sum of the round's updates)
    secure_aggregation: bool = False
    secagg_shares: int = 0  # key shares per node; 0: one for every node of the round
    secagg_threshold: float = 0.5  # shares to rebuild a key: a share of them (<= 1) or a count
    secagg_clip: float = 1.0  # each example-weighted update value is clipped to +-this (measured)
    secagg_max_weight: int = 1000  # the most examples a node may weigh in with


@dataclass
class SelfSupConfig(ByolOptions):
    """Stage 0: self-supervised pretraining (BYOL) of a backbone on unlabelled images."""

    model: str = "tf_efficientnet_lite0"
    pretrained: str = "hub"  # hub | none | path to weights or a fedct checkpoint
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 40
    lr: float = 3e-4
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_epochs: float = 2.0
    min_lr: float = 1e-6
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0


MONITORS = ("val_auc", "val_acc", "val_loss", "val_balanced_acc")
FED_MONITORS = ("auto", *MONITORS, "fed_auc", "fed_acc", "fed_loss", "fed_balanced_acc",
                "train_loss")
CHOICES = {
    "optimizer": ("adamw", "sgd"),
    "balance": ("none", "loss", "sampler"),
    "val": ("pooled", "federated", "both"),
    "eval_release": ("histograms", "counts"),
    "lr_schedule": ("constant", "cosine"),
    "local_loss": ("ce", "balanced-softmax", "fedlc", "fedrs"),
    "dp_train": ("head", "norms", "full"),
    "grad_sample_mode": ("hooks", "functorch"),
    "accountant": ("rdp", "prv", "gdp"),
    "objective": ("supervised", "byol"),
}


def batch_for(n_examples: int, batch_size: int | str) -> int:
    """A client's batch size: the number given, or all its examples (at least 1)."""
    return max(1, n_examples) if batch_size == "all" else int(batch_size)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)

