"""The one rule for a federated run's model, on the server and on every node: which
parameters train, and which layers DP needs."""

from __future__ import annotations

from fedct.config import FederateConfig
from fedct.models import ModelSpec


def freeze_policy(config: FederateConfig) -> str:
    """Which parameters train: DP `head` freezes all but the head, DP `norms` all but the head
    and the norms' scale and shift."""
    return config.dp_train if config.dp and config.dp_train in ("head", "norms") else config.freeze


def model_spec(config: FederateConfig, architecture: str, num_classes: int, *,
               groupnorm: bool = False) -> ModelSpec:
    """The one rule for a run's model, on the server and on every node.

    DP full training replaces BatchNorm by GroupNorm, unless `freeze_bn` keeps BatchNorm
    frozen in eval mode (then only activations stop being in place); DP norms training keeps
    BatchNorm's pretrained statistics and trains its scale and shift. `groupnorm` is True
    when the starting checkpoint already has GroupNorm, or on a node whose server says so.
    """
    full = config.dp and config.dp_train == "full"
    norms = config.dp and config.dp_train == "norms"
    groupnorm = groupnorm or (full and not config.freeze_bn)
    return ModelSpec(architecture=architecture, num_classes=num_classes,
                     freeze=freeze_policy(config), freeze_bn=config.freeze_bn,
                     groupnorm=groupnorm, dp_layers=full or norms or groupnorm,
                     drop_rate=config.drop_rate, image_size=config.image_size or None,
                     objective=config.objective, projection_dim=config.projection_dim,
                     hidden_dim=config.hidden_dim)
