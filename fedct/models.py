"""timm backbones: creation from a pretrained source, head replacement, freezing, DP-safety."""

from __future__ import annotations

import difflib
import functools
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from safetensors import SafetensorError
from torch import nn

from fedct.errors import FedctError


@functools.cache
def _all_models() -> tuple[str, ...]:
    return tuple(timm.list_models())


def check_architecture(name: str) -> None:
    if name not in _all_models():
        close = difflib.get_close_matches(name, _all_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FedctError(f"--model {name!r}: not a timm architecture{hint}")


def _timm_model(name: str, *, pretrained: bool, image_size: int | None, **kwargs) -> nn.Module:
    """timm.create_model, built for `image_size` where the architecture takes one (ViTs: their
    position embeddings are resampled); other architectures take any size as they are."""
    if image_size:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=image_size, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def create_model(name: str, num_classes: int, *, pretrained: str = "hub",
                 drop_rate: float = 0.0, image_size: int | None = None) -> nn.Module:
    """A timm model with a fresh `num_classes` head, started from `hub`, `none` or a file.

    A fedct checkpoint keeps its head when it was trained for the same number of classes.
    """
    check_architecture(name)
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate}
    if pretrained == "none":
        return reset_head(_timm_model(name, pretrained=False, image_size=image_size, **kwargs))
    if pretrained == "hub":
        if _hub_reachable():
            try:
                return reset_head(_timm_model(name, pretrained=True, image_size=image_size,
                                              **kwargs))
            except Exception as exc:  # network errors surface as many types (OSError, HF errors)
                raise FedctError(
                    f"could not fetch pretrained weights for {name} from the hub "
                    f"({exc.__class__.__name__}); pass --pretrained FILE with local weights, "
                    "or --pretrained none"
                ) from None
        pretrained = _hub_cached_file(name)  # offline: the cached file, without retries
        if pretrained is None:
            raise FedctError(f"pretrained weights for {name}: the hub is out of reach and they are "
                             "not in its local cache; pass --pretrained FILE with local weights, "
                             "or --pretrained none")
    from fedct.runs import checkpoint_paths, read_checkpoint

    weights, sidecar = checkpoint_paths(pretrained)
    if sidecar.is_file():
        state, meta = read_checkpoint(pretrained)
        if meta.get("architecture") != name:
            raise FedctError(f"{weights}: checkpoint is a {meta.get('architecture')}, not {name}")
        model = _timm_model(name, pretrained=False, image_size=image_size, **kwargs)
        if meta.get("dp_safe"):
            make_dp_safe(model)
        head = {k for k in state if k.startswith(_head_prefix(model))}
        if len(meta.get("classes", [])) != num_classes:
            state = {k: v for k, v in state.items() if k not in head}
            reset_head(model)
        load_weights(model, state, source=weights, allow_missing_head=True)
        return model
    if Path(pretrained).is_file():
        weights = Path(pretrained)  # a plain state dict (.pth, .bin, .safetensors) in timm's names
    if not weights.is_file():
        raise FedctError(f"--pretrained {pretrained}: no such file (use hub, none or a path)")
    try:
        return reset_head(_timm_model(name, pretrained=True, image_size=image_size, **kwargs,
                                      pretrained_cfg_overlay={"file": str(weights)}))
    except (RuntimeError, KeyError, ValueError, OSError, SafetensorError,
            pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise FedctError(f"{weights}: not weights for {name} ({first})") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the hub's host, instead of huggingface_hub's minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_cached_file(name: str) -> str | None:
    """The architecture's hub weights in the local Hugging Face cache, if they are there."""
    from huggingface_hub import try_to_load_from_cache

    repo = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def reset_head(model: nn.Module) -> nn.Module:
    """Small initial head weights: timm's EfficientNet init scales by fan-out, which for two
    classes gives logits so large that fine-tuning starts with a loss near 3 and wrecks the
    pretrained features in its first steps."""
    for module in model.get_classifier().modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def _head_prefix(model: nn.Module) -> str:
    classifier = model.get_classifier()
    for module_name, module in model.named_modules():
        if module is classifier:
            return module_name + "."
    return "classifier."


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str | Path,
                 allow_missing_head: bool = False) -> None:
    """Strict load with a one-line error naming the file and the first mismatch."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if allow_missing_head:
        missing = [k for k in missing if not k.startswith(_head_prefix(model))]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if unexpected or missing or wrong:
        what = (f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, model has "
                f"{tuple(own[wrong[0]].shape)}" if wrong else
                f"unexpected key {unexpected[0]}" if unexpected else f"missing key {missing[0]}")
        raise FedctError(f"{source}: weights do not fit the model ({what})")
    model.load_state_dict(state, strict=False)


def data_config(model: nn.Module, image_size: int) -> dict:
    """timm's preprocessing for this model, at our image size."""
    cfg = timm.data.resolve_data_config(model=model)
    return {"input_size": [3, image_size, image_size], "mean": list(cfg["mean"]),
            "std": list(cfg["std"]), "interpolation": cfg.get("interpolation", "bicubic")}


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped from stem to head, by timm's coarse group matcher."""
    try:
        grouped = timm.models.group_parameters(model, model.group_matcher(coarse=True))
        groups = [grouped[k] for k in sorted(grouped)]
    except (AttributeError, NotImplementedError):
        groups = [[n] for n, _ in model.named_parameters()]
    head = _head_prefix(model)
    body = [[n for n in g if not n.startswith(head)] for g in groups]
    body = [g for g in body if g]
    body.append([n for n, _ in model.named_parameters() if n.startswith(head)])
    return body


def apply_freeze(model: nn.Module, policy: str, *, freeze_bn: bool = False) -> int:
    """Set requires_grad by policy (full, head, norms, last-N); returns the trainable count.

    `norms`: the head and the scale and shift of every normalisation layer (Tobaben et al.
    2023), whose statistics stay as they are.
    """
    groups = layer_groups(model)
    if policy == "norms":
        trainable = set(groups[-1]) | {
            f"{name}.{p}" for name, module in model.named_modules()
            if isinstance(module, NORM_LAYERS) for p in ("weight", "bias")
            if getattr(module, p, None) is not None}
    elif policy == "full":
        trainable = {n for g in groups for n in g}
    elif policy == "head":
        trainable = set(groups[-1])
    else:
        count = int(policy.split("-", 1)[1])
        trainable = {n for g in groups[-(count + 1):] for n in g}
    for name, param in model.named_parameters():
        param.requires_grad = name in trainable
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for param in module.parameters(recurse=False):
                    param.requires_grad = False
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class FrozenStatsNorm(nn.Module):
    """BatchNorm in eval mode with a trainable scale and shift: what `norms` DP training trains.

    Its statistics are parameters that never train (not buffers), so Opacus accepts the layer
    (it refuses trainable layers with buffers, and every BatchNorm) and computes its
    per-example gradients with functorch; the state-dict keys are BatchNorm's, so checkpoints
    load into the plain model, whose eval-mode output is the same. timm's fused activation
    and drop of BatchNormAct2d are kept.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.bias = nn.Parameter(norm.bias.detach().clone())
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(norm, name).detach().clone().float()
            setattr(self, name, nn.Parameter(value, requires_grad=False))
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        # detached statistics: functorch differentiates with respect to every parameter
        scale = self.weight * torch.rsqrt(self.running_var.detach() + self.eps)
        shift = self.bias - self.running_mean.detach() * scale
        x = x * scale.view(shape) + shift.view(shape)
        return self.act(self.drop(x))


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, FrozenStatsNorm)


def norm_keys(model: nn.Module) -> set[str]:
    """State-dict keys of normalisation layers: what FedBN keeps local."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            keys.update(f"{name}.{k}" for k in module.state_dict())
    return keys


def freeze_statistics(model: nn.Module) -> nn.Module:
    """Replace every affine BatchNorm (timm's BatchNormAct2d too) by a FrozenStatsNorm."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.affine \
                    and child.track_running_stats:
                setattr(parent, child_name, FrozenStatsNorm(child))
    return model


def frozen_norms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers none of whose own parameters train: they keep their statistics.

    Derived from requires_grad, which `apply_freeze` sets, so no flag rides on the model.
    """
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters(recurse=False))]


def train_mode(model: nn.Module) -> None:
    """model.train(), but frozen BatchNorm layers stay in eval mode with their statistics."""
    model.train()
    for module in frozen_norms(model):
        module.eval()


class CloneOutput(nn.Module):
    """A parameter-free copy, so that an in-place residual add does not modify the output of
    a module Opacus hooks (timm's ResNet blocks do `x += shortcut`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _clone_before_residual_add(model: nn.Module) -> None:
    from timm.models.resnet import BasicBlock, Bottleneck

    for module in model.modules():
        if isinstance(module, (BasicBlock, Bottleneck)) and not isinstance(module.drop_path, CloneOutput):
            module.drop_path = (CloneOutput() if module.drop_path is None
                                else nn.Sequential(module.drop_path, CloneOutput()))


def _keep_affine(old: nn.Module, new: nn.Module) -> nn.Module:
    """Carry the learnt scale and shift over; the running statistics have no GroupNorm analogue."""
    if getattr(old, "affine", False):
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(old.bias)
        new.weight.requires_grad = old.weight.requires_grad
        new.bias.requires_grad = old.bias.requires_grad
    return new


def make_dp_safe(model: nn.Module, *, keep_batchnorm: bool = False) -> nn.Module:
    """Replace every BatchNorm (timm's BatchNormAct2d too) with GroupNorm, activations not in place.

    Opacus's ModuleValidator.fix misses timm's BatchNormAct2d; in-place activations break
    its backward hooks. The fused activation of BatchNormAct2d is kept. `keep_batchnorm`
    leaves BatchNorm in place for models whose norms are all frozen in eval mode
    (`freeze_bn`): they then mix no examples and keep their pretrained statistics.
    Calling it again changes nothing.
    """
    from timm.layers.norm_act import BatchNormAct2d, GroupNormAct

    def groups_for(channels: int) -> int:
        for g in (32, 16, 8, 4, 2, 1):
            if channels % g == 0:
                return g
        return 1

    def replace(parent: nn.Module) -> None:
        for child_name, child in parent.named_children():
            if isinstance(child, BatchNormAct2d):
                act = child.act if not isinstance(child.act, nn.Identity) else None
                new = GroupNormAct(child.num_features, groups_for(child.num_features),
                                   eps=child.eps, affine=child.affine, apply_act=act is not None)
                if act is not None:
                    new.act = act
                new.drop = child.drop
                setattr(parent, child_name, _keep_affine(child, new))
            elif isinstance(child, nn.modules.batchnorm._BatchNorm):
                new = nn.GroupNorm(groups_for(child.num_features), child.num_features,
                                   eps=child.eps, affine=child.affine)
                setattr(parent, child_name, _keep_affine(child, new))
            else:
                replace(child)

    if not keep_batchnorm:
        replace(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    _clone_before_residual_add(model)
    return model


@dataclass(frozen=True)
class ModelSpec:
    """How a run's model is built, the same on the server, on every node and in evaluation."""

    architecture: str
    num_classes: int
    freeze: str = "full"  # full | head | norms | last-N
    freeze_bn: bool = False
    groupnorm: bool = False  # BatchNorm replaced by GroupNorm (DP full); checkpoints say so
    dp_layers: bool = False  # activations not in place, clones before in-place residual adds
    drop_rate: float = 0.0
    image_size: int | None = None  # for architectures built for one input size (ViTs)
    objective: str = "supervised"  # byol: the backbone with BYOL's projector and predictor
    projection_dim: int = 128
    hidden_dim: int = 1024


def build_model(spec: ModelSpec, *, pretrained: str = "none") -> nn.Module:
    """The model of `spec`, started from `pretrained` (hub, none, a file or a checkpoint)."""
    if spec.objective == "byol":  # no head; the configuration refuses freezing and DP
        from fedct.byol import ByolOnline

        backbone = create_model(spec.architecture, 0, pretrained=pretrained,
                                image_size=spec.image_size)
        return ByolOnline(backbone, hidden=spec.hidden_dim, width=spec.projection_dim)
    model = create_model(spec.architecture, spec.num_classes, pretrained=pretrained,
                         drop_rate=spec.drop_rate, image_size=spec.image_size)
    if spec.groupnorm or spec.dp_layers:
        make_dp_safe(model, keep_batchnorm=not spec.groupnorm)
    if spec.freeze == "norms" and not spec.groupnorm:
        freeze_statistics(model)
    apply_freeze(model, spec.freeze, freeze_bn=spec.freeze_bn)
    return model


def place_model(model: nn.Module, config, device) -> nn.Module:
    """The model on its device in the run's memory format: the server and every node alike,
    so a score computed on either is the same to the last bit."""
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model
