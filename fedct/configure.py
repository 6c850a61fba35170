"""Configuration flows one way: defaults, then a YAML file, then overrides (CLI flags, a
Flower run config), each value type-checked, unknown keys rejected with a close match,
and the whole config checked (`validate`) before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path

import yaml

from fedct.config import (
    CHOICES,
    FED_MONITORS,
    MONITORS,
    FederateConfig,
    PretrainConfig,
    SelfSupConfig,
)
from fedct.errors import FedctError
from fedct.federated import strategies
from fedct.operating_point import parse_rule
from fedct.runs import read_config


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
        sources.append((str(path), settings_of(loaded, cls, path)))
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


def settings_of(loaded: dict, cls, path: Path) -> dict:
    """A YAML file's settings: the mapping itself, or the `config` of a run's own
    config.yaml (which also records the command, inputs and versions), so a run's
    config.yaml starts a new run with the same settings."""
    if not (isinstance(loaded.get("config"), dict) and "command" in loaded):
        return loaded
    if loaded["command"] != COMMANDS[cls]:
        raise FedctError(f"{path}: the config of a `fedct {loaded['command']}` run, not of "
                         f"`fedct {COMMANDS[cls]}`")
    return loaded["config"]


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
    saved = read_config(resume_dir)
    command = COMMANDS[cls]
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise FedctError(f"{saved_path}: not a fedct run's config (no 'config' mapping)")
    if saved.get("command") != command:
        raise FedctError(f"--resume {resume_dir}: a `fedct {saved.get('command')}` run, not a "
                         f"`fedct {command}` one; resume it with `fedct {saved.get('command')}`")
    given = build_config(cls, None, {**saved["config"], **{k: v for k, v in overrides.items()
                                                           if v is not None}})
    defaults = dataclasses.asdict(cls())  # a key added since the run began: it ran as its default
    for key, value in dataclasses.asdict(given).items():
        if key not in RESUME_MAY_CHANGE and saved["config"].get(key, defaults[key]) != value:
            raise FedctError(f"--resume {resume_dir}: {key} was "
                             f"{saved['config'].get(key, defaults[key])!r} when "
                             f"the run started, not {value!r}; a resumed run keeps its settings")
    return given, saved


def validate(config) -> None:
    choices = {**CHOICES, "monitor": FED_MONITORS if isinstance(config, FederateConfig)
               else MONITORS, "strategy": strategies.names()}
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
        strategies.check(config)
        if config.objective == "byol":
            _check_federated_byol(config)
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


def _check_selfsup(config) -> None:
    for key, least in (("epochs", 1), ("batch_size", 2), ("image_size", 8),
                       ("projection_dim", 1), ("hidden_dim", 1)):
        if not hasattr(config, key) or getattr(config, key) == "all":
            continue
        if key == "image_size" and getattr(config, key) == 0:  # federate: the init's size
            continue
        if getattr(config, key) < least:
            raise FedctError(f"{key} {getattr(config, key)}: must be >= {least}")
    _check_ranges(config, {"target_decay": "(0, 1]", "crop_scale_min": "(0, 1]",
                           "lr": "(0, inf)", "min_lr": f"[0, {config.lr}]"})


def _check_federated_byol(config: FederateConfig) -> None:
    """Settings that read labels or train a classifier have no meaning for BYOL: refused,
    never dropped."""
    if config.dp:
        raise FedctError("dp: objective byol has no DP mode (its loss pairs two views of each "
                         "image, so Opacus's per-row clipping does not bound one image's part)")
    if config.fedbn:
        raise FedctError("fedbn: with objective byol the backbone written at the end would keep "
                         "the starting norms; train them together (fedbn false)")
    for key, default in (("freeze", "full"), ("balance", "none"), ("local_loss", "ce"),
                         ("monitor", "auto"), ("tta", False)):
        if getattr(config, key) != default and not (key == "monitor"
                                                     and config.monitor == "train_loss"):
            raise FedctError(f"{key} {getattr(config, key)!r}: objective byol reads no labels "
                             f"and trains no classifier; leave {key} at {default!r}")
    _check_selfsup(config)


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
