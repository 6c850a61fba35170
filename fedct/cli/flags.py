"""Command-line flags generated from the config dataclasses: a flag for every field, its
type, its choices and its `[default: ...]` taken from the dataclass, so a new config field
is a new flag with nothing else to write but its help line here.

`config_flags(Config, command)` adds the flags to a command; the command receives them as
one `overrides` mapping (None where a flag was not given), which `resolve_config` lays over
the defaults and the YAML file. The flags appear in `--help` in panels by topic.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import Annotated

import click
import typer

from fedct.config import CHOICES, FED_MONITORS, MONITORS, FederateConfig
from fedct.federated import strategies
from fedct.operating_point import RULES

# What each field does, in a line; the default and the choices are added from the config.
HELP = {
    "model": "timm architecture.",
    "pretrained": "Starting weights: hub, none, or a weights file / fedct checkpoint.",
    "image_size": "Input side in pixels.",
    "batch_size": "Batch size.",
    "lr": "Peak learning rate (cosine, warm-up).",
    "optimizer": "Optimiser.",
    "momentum": "SGD momentum.",
    "weight_decay": "Weight decay.",
    "layer_decay": "Below 1: layer-wise lr decay, earlier blocks learn slower.",
    "label_smoothing": "Label smoothing of the loss.",
    "balance": "Class balance: none, a class-weighted loss, or a balanced sampler.",
    "grad_clip": "Gradient norm clip (0: off).",
    "freeze": "Which layers train: full, head, or last-N blocks.",
    "freeze_bn": "Keep BatchNorm statistics frozen (eval mode).",
    "drop_rate": "Dropout before the head.",
    "augment": "Augment training images.",
    "tta": "Score each image and its mirror, averaged.",
    "threshold": f"Operating point chosen on val: {RULES}.",
    "aug_scale_min": "Random crops keep at least this share of the image.",
    "aug_rotation": "Random rotation, degrees.",
    "aug_flip": "Random horizontal flips.",
    "aug_brightness": "Random brightness change (share).",
    "aug_contrast": "Random contrast change (share).",
    "erase_prob": "Chance that a rectangle of a training image is blanked.",
    "channels_last": "Channels-last memory format.",
    "amp": "bfloat16 autocast (CUDA only).",
    "device": "auto, cpu or cuda.",
    "seed": "Random seed (data order, sampling, noise).",
    "tensorboard": "Also write TensorBoard event files to RUN/tensorboard.",
    "epochs": "Epochs.",
    "warmup_epochs": "Epochs of linear lr warm-up.",
    "min_lr": "The lr at the end of the cosine schedule.",
    "patience": "Stop after this many epochs without improvement (0: off).",
    "ema_decay": "Above 0: validate and checkpoint an EMA of the weights.",
    "mixup_alpha": "Above 0: mixup of each batch, Beta(alpha, alpha).",
    "cutmix_alpha": "Above 0: CutMix (with mixup: one of them per batch).",
    "mix_prob": "Share of batches mixed.",
    "average_last": "Above 0: also write RUN/averaged, the mean of the last K epochs.",
    "monitor": "The best epoch or round by this.",
    "clients": "Train on these clients' rows only, e.g. 0,2.",
    "rows": "Train on rows whose site, split or client equals this.",
    "rounds": "Federated rounds.",
    "local_epochs": "Local epochs per round.",
    "local_steps": "Above 0: local steps per round, in place of --local-epochs.",
    "lr_schedule": "Client lr: constant, or cosine decay over the rounds.",
    "fraction": "Share of clients sampled each round (seeded).",
    "clients_per_round": "Above 0: clients sampled each round, in place of --fraction.",
    "min_clients": "Fewer updates than this leave the global model unchanged.",
    "strategy": "How the server combines the updates (README: Strategies).",
    "local_loss": "Client loss that corrects for its own label mix.",
    "fedlc_tau": "FedLC: strength of the logit calibration.",
    "fedrs_alpha": "FedRS: scale of the logits of classes a client lacks.",
    "mu": "FedProx: weight of the proximal term.",
    "server_lr": "Server learning rate (FedAvgM, FedAdam, FedYogi, SCAFFOLD).",
    "server_momentum": "FedAvgM: server momentum.",
    "beta1": "FedAdam, FedYogi: first-moment decay.",
    "beta2": "FedAdam, FedYogi: second-moment decay.",
    "tau": "FedAdam, FedYogi: adaptivity (epsilon).",
    "trim_beta": "FedTrimmedAvg: share of values cut from each end.",
    "fedbn": "Keep normalisation layers local to each client (FedBN).",
    "val": "Validate on the coordinator's val rows, the clients' own, or both.",
    "eval_fraction": "Share of clients that score the global model each round.",
    "eval_release": "What a client sends of its val rows: histograms, or counts.",
    "keep_last": "Numbered round checkpoints kept.",
    "dp": "Differentially private client training (Opacus DP-SGD).",
    "target_epsilon": "Per-client epsilon for the whole run.",
    "delta": "DP delta.",
    "max_grad_norm": "Per-sample gradient clipping norm.",
    "noise_multiplier": "Above 0: fixed noise in place of --target-epsilon.",
    "dp_train": "DP trains the head, the head and norms, or all (GroupNorm).",
    "cache_features": "Head-only training on features computed once per run.",
    "feature_views": "Head-only training: augmented views per image in the cache.",
    "physical_batch_size": "DP: examples per forward pass (memory, not maths).",
    "grad_sample_mode": "Opacus per-sample gradients: hooks or functorch.",
    "accountant": "Privacy accountant.",
    "secure_aggregation": "Flower: SecAgg+, the coordinator sees only each round's sum.",
    "secagg_shares": "SecAgg+: key shares per node (0: every node of the round).",
    "secagg_threshold": "SecAgg+: shares that rebuild a key, a share (<= 1) or a count.",
    "secagg_clip": "SecAgg+: each example-weighted update value is clipped to +-this.",
    "secagg_max_weight": "SecAgg+: the most examples a node may weigh in with.",
    "target_decay": "BYOL: the target network's EMA decay, raised to 1 over the run.",
    "projection_dim": "BYOL: projection size.",
    "hidden_dim": "BYOL: hidden size of the projector and predictor.",
    "crop_scale_min": "BYOL: views are crops of at least this share of the image.",
    "objective": "supervised, or byol: stage 0 on the clients' images, labels unread.",
}
# A command's own wording of a field, and default texts a value alone would not explain.
COMMAND_HELP = {
    "federate": {"lr": "Client learning rate.", "batch_size": "Client batch size, or all "
                 "(full-batch DP).", "model": "timm architecture when --init is not a "
                 "checkpoint.", "pretrained": "Starting weights when --init is hub.",
                 "image_size": "Input side in pixels (0: the --init checkpoint's)."},
    "selfsup": {"batch_size": "Batch size (pairs of views)."},
}
DEFAULT_TEXT = {"federate": {"image_size": "the --init checkpoint's, else 224",
                             "monitor": "val_auc with pooled val, else fed_auc"}}
PANELS = {
    "Model and data": ("objective", "model", "pretrained", "image_size", "freeze", "freeze_bn", "drop_rate",
                       "clients", "rows", "augment", "aug_scale_min", "aug_rotation", "aug_flip",
                       "aug_brightness", "aug_contrast", "erase_prob", "crop_scale_min"),
    "Training": ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay",
                 "layer_decay", "label_smoothing", "balance", "grad_clip", "warmup_epochs",
                 "min_lr", "patience", "ema_decay", "mixup_alpha", "cutmix_alpha", "mix_prob",
                 "average_last", "target_decay", "projection_dim", "hidden_dim", "local_epochs",
                 "local_steps", "lr_schedule", "local_loss", "fedlc_tau", "fedrs_alpha"),
    "Rounds and strategy": ("rounds", "fraction", "clients_per_round", "min_clients",
                            "strategy", "mu", "server_lr", "server_momentum", "beta1", "beta2",
                            "tau", "trim_beta", "fedbn"),
    "Validation": ("monitor", "threshold", "tta", "val", "eval_fraction", "eval_release"),
    "Differential privacy": ("dp", "target_epsilon", "delta", "max_grad_norm",
                             "noise_multiplier", "dp_train", "cache_features", "feature_views",
                             "physical_batch_size", "grad_sample_mode", "accountant"),
    "Secure aggregation (Flower)": ("secure_aggregation", "secagg_shares", "secagg_threshold",
                                    "secagg_clip", "secagg_max_weight"),
    "Run": ("seed", "device", "channels_last", "amp", "tensorboard", "keep_last"),
}
PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}


def choices(cls, name: str) -> tuple[str, ...] | None:
    if name == "strategy":
        return strategies.names()
    if name == "monitor":
        return FED_MONITORS if cls is FederateConfig else MONITORS
    return CHOICES.get(name)


def shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def flag(cls, command: str, field: dataclasses.Field, hint):
    """The Annotated type of one field's option: None unless given."""
    name = field.name
    dashed = name.replace("_", "-")
    text = COMMAND_HELP.get(command, {}).get(name) or HELP[name]
    default = DEFAULT_TEXT.get(command, {}).get(name)
    if default is None and field.default not in (None, ""):
        default = shown(field.default)
    if name == "strategy":
        text += " " + strategies.help_text()
    allowed = choices(cls, name)
    if allowed:  # in the help, not as a metavar: a long list squeezes the help column
        text += f" One of: {', '.join(allowed)}."
    help_text = text + (f" \\[default: {default}]" if default is not None else "")
    options = {"help": help_text, "rich_help_panel": PANEL_OF.get(name, "Other")}
    if hint is bool:
        return Annotated[bool | None, typer.Option(f"--{dashed}/--no-{dashed}", **options)]
    if allowed:
        return Annotated[str | None, typer.Option(f"--{dashed}", click_type=click.Choice(allowed),
                                                  metavar="TEXT", **options)]
    base = {int: int, float: float}.get(hint, str)  # lists and int | str go as text
    return Annotated[base | None, typer.Option(f"--{dashed}", **options)]


def config_flags(cls, command: str, *, skip: tuple[str, ...] = ()):
    """Add a flag for every field of `cls` (but `skip`) to a command, after its own
    parameters; the command gets them as `overrides`."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]

    def decorate(func):
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "overrides"]
        taken = {p.name for p in own}
        clash = taken & {f.name for f in fields}
        if clash:
            raise TypeError(f"{func.__name__}: {sorted(clash)} are config fields")
        generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                       annotation=flag(cls, command, f, _plain(hints[f.name])))
                     for f in fields]

        @functools.wraps(func)
        def command_with_flags(**kwargs):
            overrides = {f.name: kwargs.pop(f.name, None) for f in fields}
            return func(**kwargs, overrides=overrides)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated
        command_with_flags.__signature__ = signature.replace(parameters=parameters)
        command_with_flags.__annotations__ = {p.name: p.annotation for p in parameters}
        return command_with_flags

    return decorate


def _plain(hint):
    """int | None -> int; list[int] | None -> list; int | str -> str."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _plain(args[0]) if len(args) == 1 else str
    return typing.get_origin(hint) or hint


def defaults_yaml(cls, command: str) -> str:
    """Every setting of a command with its default, as YAML a user can edit and pass as
    --config; each key's help line above it, grouped as in --help."""
    import yaml

    values = {f.name: f.default for f in dataclasses.fields(cls)}
    lines = [f"# fedct {command}: every setting with its default (fedct config {command}).",
             f"# Edit and pass as `fedct {command} --config FILE`; flags override the file."]
    for panel, names in [*PANELS.items(), ("Other", tuple(values))]:
        keys = [n for n in names if n in values]
        if not keys:
            continue
        lines += ["", f"# -- {panel}"]
        for key in keys:
            text = COMMAND_HELP.get(command, {}).get(key) or HELP.get(key, "")
            allowed = choices(cls, key)
            lines.append(f"# {text}" + (f" One of: {', '.join(allowed)}." if allowed else ""))
            lines.append(yaml.safe_dump({key: values.pop(key)}, default_flow_style=True,
                                        width=1000).strip().removeprefix("{").removesuffix("}"))
    return "\n".join(lines) + "\n"
