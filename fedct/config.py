"""Typed configuration: YAML file -> dataclass -> CLI overrides, unknown keys rejected.

One flat dataclass per command, so a YAML file, a CLI flag and a Flower run-config key
(`local-epochs`) all name the same field (`local_epochs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedct.errors import FedctError


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
class FederateConfig(TrainConfig):
    """Stage 2: federated rounds over the clients of a split."""

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
    strategy: str = "fedavg"  # fedavg | fedprox | fedavgm | fedadam | fedyogi | scaffold
    local_loss: str = "ce"  # ce | balanced-softmax | fedlc | fedrs: the client's own label prior
    fedlc_tau: float = 1.0
    fedrs_alpha: float = 0.5
    mu: float = 0.01
    server_lr: float = 1.0
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
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
class SelfSupConfig:
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
    target_decay: float = 0.99  # the target network's EMA decay, raised to 1 over the run
    projection_dim: int = 128
    hidden_dim: int = 1024
    crop_scale_min: float = 0.25  # views are crops of at least this share of the image
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0


THRESHOLD_RULES = "0.5 (or any number in (0, 1)), youden, eer, sens:X or spec:X"
MONITORS = ("val_auc", "val_acc", "val_loss", "val_balanced_acc")
FED_MONITORS = ("auto", *MONITORS, "fed_auc", "fed_acc", "fed_loss", "fed_balanced_acc")
CHOICES = {
    "optimizer": ("adamw", "sgd"),
    "balance": ("none", "loss", "sampler"),
    "val": ("pooled", "federated", "both"),
    "eval_release": ("histograms", "counts"),
    "lr_schedule": ("constant", "cosine"),
    "strategy": ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "scaffold"),
    "local_loss": ("ce", "balanced-softmax", "fedlc", "fedrs"),
    "dp_train": ("head", "norms", "full"),
    "grad_sample_mode": ("hooks", "functorch"),
    "accountant": ("rdp", "prv", "gdp"),
}


def _coerce(name: str, value, hint, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # the first type that takes the value; str comes last
            try:
                return _coerce(name, value, option, where)
            except FedctError:
                continue
        hint = options[-1]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [_coerce(name, v, args[0], where) for v in items]
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            number = float(value)
            if not math.isfinite(number):
                raise FedctError(f"{where}: key '{name}' has value {value!r}, expected a finite "
                                 "number")
            return number
        return str(value)
    except (TypeError, ValueError):
        raise FedctError(f"{where}: key '{name}' has value {value!r}, expected {hint.__name__}") from None


def build_config(cls, path: str | Path | None = None, overrides: dict | None = None, *,
                 source: str = "command line"):
    """Defaults, then the YAML file, then the non-None overrides (named `source` in errors);
    every value type-checked."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    sources = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FedctError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise FedctError(f"{path}: invalid YAML ({exc.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise FedctError(f"{path}: expected a mapping of option: value")
        sources.append((str(path), loaded))
    sources.append((source, {k: v for k, v in (overrides or {}).items() if v is not None}))
    for where, mapping in sources:
        for raw_key, value in mapping.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise FedctError(f"{where}: unknown key '{raw_key}'{hint}")
            values[key] = _coerce(key, value, hints[key], where)
    config = cls(**values)
    validate(config)
    return config


RESUME_MAY_CHANGE = ("device",)  # where it runs, not what it computes
COMMANDS = {PretrainConfig: "pretrain", FederateConfig: "federate", SelfSupConfig: "selfsup"}


def resolve_config(cls, *, path: str | Path | None, overrides: dict,
                   resume_dir: str | Path | None = None):
    """A command's config: defaults, the YAML file at `path`, then the flags; or a resumed
    run's saved config, which flags may not change (but for the device). Returns (config,
    the resumed run's config.yaml or None)."""
    if resume_dir is None:
        return build_config(cls, path, overrides), None
    if path is not None:
        raise FedctError("--config and --resume: a resumed run keeps its own config")
    saved_path = Path(resume_dir) / "config.yaml"
    if not saved_path.is_file():
        raise FedctError(f"{saved_path}: not found (is {resume_dir} a fedct run directory?)")
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FedctError(f"{saved_path}: unreadable ({exc.__class__.__name__})") from None
    command = COMMANDS[cls]
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise FedctError(f"{saved_path}: not a fedct run's config (no 'config' mapping)")
    if saved.get("command") != command:
        raise FedctError(f"--resume {resume_dir}: a `fedct {saved.get('command')}` run, not a "
                         f"`fedct {command}` one; resume it with `fedct {saved.get('command')}`")
    given = build_config(cls, None, {**saved["config"], **{k: v for k, v in overrides.items()
                                                           if v is not None}})
    for key, value in dataclasses.asdict(given).items():
        if key not in RESUME_MAY_CHANGE and saved["config"].get(key) != value:
            raise FedctError(f"--resume {resume_dir}: {key} was {saved['config'].get(key)!r} when "
                             f"the run started, not {value!r}; a resumed run keeps its settings")
    return given, saved


def validate(config) -> None:
    from fedct.operating_point import parse_rule

    choices = {**CHOICES, "monitor": FED_MONITORS if isinstance(config, FederateConfig)
               else MONITORS}
    for key, allowed in choices.items():
        value = getattr(config, key, None)
        if value is not None and value not in allowed:
            raise FedctError(f"{key} {value!r}: choose from {', '.join(allowed)}")
    if isinstance(config, SelfSupConfig):
        _check_selfsup(config)
        return
    parse_rule(config.threshold)
    freeze = config.freeze
    if freeze not in ("full", "head") and not (
        freeze.startswith("last-") and freeze[5:].isdigit() and int(freeze[5:]) > 0
    ):
        raise FedctError(f"freeze {freeze!r}: choose full, head or last-N (e.g. last-2)")
    if isinstance(config.batch_size, str) and config.batch_size != "all":
        raise FedctError(f"batch_size {config.batch_size!r}: a number >= 1, or all (stage 2)")
    for key in ("image_size", "batch_size"):
        if getattr(config, key) == "all":
            continue
        least = 0 if key == "image_size" and isinstance(config, FederateConfig) else 1
        if getattr(config, key) < least:
            raise FedctError(f"{key} {getattr(config, key)}: must be >= {least}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise FedctError(f"lr {config.lr}: must be a number > 0")
    _check_ranges(config, {"erase_prob": "[0, 1]", "layer_decay": "(0, 1]"})
    if isinstance(config, FederateConfig):
        if config.rounds < 1:
            raise FedctError(f"rounds {config.rounds}: must be >= 1")
        if not 0 <= config.min_lr <= config.lr:
            raise FedctError(f"min_lr {config.min_lr}: must be in [0, lr {config.lr}]")
        _check_ranges(config, {"fraction": "(0, 1]", "eval_fraction": "(0, 1]",
                               "fedrs_alpha": "(0, 1]", "fedlc_tau": "(0, inf)"})
        if config.val == "pooled" and config.monitor.startswith("fed_"):
            raise FedctError(f"monitor {config.monitor}: needs federated val (val: federated "
                             "or both)")
        if config.eval_release == "counts" and parse_rule(config.threshold)[0] != "fixed":
            raise FedctError(f"threshold {config.threshold}: with eval_release counts a client "
                             "sends only its confusion counts, at a fixed threshold (e.g. 0.5)")
        if config.eval_release == "counts" and config.monitor in ("fed_auc", "fed_loss"):
            raise FedctError(f"monitor {config.monitor}: eval_release counts sends no scores "
                             "or loss; monitor fed_acc or fed_balanced_acc")
        if config.val == "federated" and config.monitor.startswith("val_"):
            raise FedctError(f"monitor {config.monitor}: needs pooled val (val: pooled or both)")
        if config.local_steps < 0:
            raise FedctError(f"local_steps {config.local_steps}: must be >= 0 (0: use local_epochs)")
        if config.local_steps == 0 and config.local_epochs < 1:
            raise FedctError(f"local_epochs {config.local_epochs}: must be >= 1 (or local_steps > 0)")
        if config.dp and config.noise_multiplier <= 0 and config.target_epsilon <= 0:
            raise FedctError(f"target_epsilon {config.target_epsilon}: must be > 0")
        if config.dp and not 0 < config.delta < 1:
            raise FedctError(f"delta {config.delta}: must be in (0, 1), far below 1/n of a "
                             "client's examples (e.g. 1e-5)")
        if config.dp and not (config.max_grad_norm > 0 and math.isfinite(config.max_grad_norm)):
            raise FedctError(f"max_grad_norm {config.max_grad_norm}: must be a number > 0")
        if config.noise_multiplier < 0:
            raise FedctError(f"noise_multiplier {config.noise_multiplier}: must be >= 0")
        if config.dp and config.dp_train == "norms" and config.freeze_bn:
            raise FedctError("freeze_bn: dp_train norms trains the norms' scale and shift (their "
                             "statistics stay frozen); set freeze_bn false")
        if config.feature_views < 1:
            raise FedctError(f"feature_views {config.feature_views}: must be >= 1")
        _check_secure(config)
        if config.strategy == "scaffold" and not config.server_lr > 0:
            raise FedctError(f"server_lr {config.server_lr}: must be > 0")
    if isinstance(config, PretrainConfig):
        if config.epochs < 1:
            raise FedctError(f"epochs {config.epochs}: must be >= 1")
        _check_ranges(config, {"ema_decay": "[0, 1)", "mixup_alpha": "[0, inf)",
                               "cutmix_alpha": "[0, inf)", "mix_prob": "(0, 1]"})
        if config.balance == "loss" and (config.mixup_alpha or config.cutmix_alpha):
            raise FedctError("balance loss: class-weighted loss and mixup/cutmix's soft targets "
                             "do not combine; use balance sampler")
        if config.average_last < 0 or config.average_last > config.epochs:
            raise FedctError(f"average_last {config.average_last}: must be in 0..epochs "
                             f"({config.epochs})")


def _check_ranges(config, ranges: dict[str, str]) -> None:
    """Each key's value inside its interval, written as in the error: "(0, 1]", "[0, inf)"."""
    for key, interval in ranges.items():
        value = getattr(config, key)
        low, high = (float(end) for end in interval[1:-1].split(","))
        if not ((low < value if interval[0] == "(" else low <= value)
                and (value < high if interval[-1] == ")" else value <= high)):
            raise FedctError(f"{key} {value}: must be in {interval}")


def _check_selfsup(config: SelfSupConfig) -> None:
    for key, least in (("epochs", 1), ("batch_size", 2), ("image_size", 8),
                       ("projection_dim", 1), ("hidden_dim", 1)):
        if getattr(config, key) < least:
            raise FedctError(f"{key} {getattr(config, key)}: must be >= {least}")
    _check_ranges(config, {"target_decay": "(0, 1]", "crop_scale_min": "(0, 1]",
                           "lr": "(0, inf)", "min_lr": f"[0, {config.lr}]"})


def _check_secure(config) -> None:
    if config.secagg_shares != 0 and config.secagg_shares < 3:
        raise FedctError(f"secagg_shares {config.secagg_shares}: 0 (every node of the round) "
                         "or at least 3")
    threshold = config.secagg_threshold
    if not (0 < threshold <= 1 or (threshold >= 2 and threshold == int(threshold))):
        raise FedctError(f"secagg_threshold {threshold}: a share of the shares in (0, 1], or a "
                         "whole count >= 2")
    if config.secagg_shares and threshold >= config.secagg_shares:
        raise FedctError(f"secagg_threshold {threshold}: must be below secagg_shares "
                         f"{config.secagg_shares}")
    if not (config.secagg_clip > 0 and math.isfinite(config.secagg_clip)):
        raise FedctError(f"secagg_clip {config.secagg_clip}: must be a number > 0")
    if config.secagg_max_weight < 1:
        raise FedctError(f"secagg_max_weight {config.secagg_max_weight}: must be >= 1")


def batch_for(n_examples: int, batch_size: int | str) -> int:
    """A client's batch size: the number given, or all its examples (at least 1)."""
    return max(1, n_examples) if batch_size == "all" else int(batch_size)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)

