"""Head-only training on cached features: the frozen backbone runs once per run, not every step.

When only the classifier trains (`freeze: head`, or DP `dp_train: head`), a client passes its
images through the backbone once, in eval mode (a frozen backbone is a fixed feature
extractor), as K augmented views each (`feature_views`), and the head trains on the stored
pre-logit features. Each example's loss is the mean over its K views, so under DP its
per-example gradient is averaged over its views before clipping (augmentation multiplicity,
De et al. 2022): one example is still one contribution and the accounting is unchanged.

The features sit in the client's own cache folder beside its decoded images, named by a
digest of the backbone's weights, the images, their labels and the views' seed and recipe, so
a changed backbone or changed data never reuses stale features.
"""

from __future__ import annotations

import hashlib
import zlib

import torch
from torch import nn
from torch.utils.data import Dataset

from fedct.data.loading import ImageTensorDataset, cache_dir, write_cache
from fedct.federated.run_model import freeze_policy
from fedct.training import seed_everything

VIEW_RECIPE = ("augment", "aug_scale_min", "aug_rotation", "aug_flip", "aug_brightness",
               "aug_contrast", "erase_prob", "image_size")


class FeatureDataset(Dataset):
    """Cached features [N, K, D] with their labels [N]."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.features[index], self.labels[index]


class FeatureHead(nn.Module):
    """The model's own classifier (shared parameters) on features [B, K, D] -> logits [B*K, C],
    with the dropout the model applies before it."""

    def __init__(self, classifier: nn.Module, drop_rate: float):
        super().__init__()
        self.classifier = classifier
        self.drop_rate = drop_rate

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = nn.functional.dropout(features, self.drop_rate, self.training)
        return self.classifier(features).flatten(0, 1)


class ViewsLoss(nn.Module):
    """A loss over K views per example: every view carries its example's label, and the mean
    over all B*K views is the mean over examples of each example's mean over its views."""

    def __init__(self, loss_fn: nn.Module, views: int):
        super().__init__()
        self.loss_fn = loss_fn
        self.views = views

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, labels.repeat_interleave(self.views))


def applies(model: nn.Module, config) -> bool:
    """Whether this run's local training can use cached features: only a linear head trains."""
    return (config.cache_features and freeze_policy(config) == "head"
            and isinstance(model.get_classifier(), nn.Linear))


def backbone_digest(model: nn.Module) -> str:
    """A digest of every weight and statistic that does not train: what the features depend on.

    A CRC-32 per tensor (taken every round, so it must cost little next to a round) folded
    into SHA-256 with the tensors' names and shapes: it tells a changed backbone from the
    same one; the cache is the client's own, not a boundary against an adversary.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.removeprefix("_module.") not in trainable:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{zlib.crc32(data)}\n"
                          .encode())
    return digest.hexdigest()


@torch.no_grad()
def compute_features(model: nn.Module, dataset: ImageTensorDataset, *, views: int, seed: int,
                     device: torch.device, channels_last: bool) -> torch.Tensor:
    """Pre-logit features [N, K, D] of K draws of the dataset's transform per image."""
    model.eval()
    seed_everything(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    per_view = []
    for _ in range(views):
        chunks = []
        for start in range(0, len(dataset), 64):
            indices = range(start, min(len(dataset), start + 64))
            batch = torch.stack([dataset.transform(dataset.images[i]) for i in indices])
            batch = batch.to(device).contiguous(memory_format=memory_format)
            chunks.append(model.forward_head(model.forward_features(batch), pre_logits=True)
                          .float().cpu())
        per_view.append(torch.cat(chunks) if chunks else torch.zeros(0, model.num_features))
    return torch.stack(per_view, dim=1)


def cached_features(model: nn.Module, dataset: ImageTensorDataset, config, *, seed: int,
                    device: torch.device) -> FeatureDataset:
    """The client's features for this backbone: from its cache folder, else computed once."""
    digest = hashlib.sha256(backbone_digest(model).encode())
    digest.update(repr((config.feature_views, seed, [getattr(config, k) for k in VIEW_RECIPE]))
                  .encode())
    digest.update(dataset.images.contiguous().numpy().tobytes())
    digest.update(dataset.labels.numpy().tobytes())
    target = cache_dir() / f"features-{digest.hexdigest()[:32]}.pt"
    if target.is_file():
        try:
            return FeatureDataset(torch.load(target, weights_only=True), dataset.labels)
        except (RuntimeError, OSError, EOFError):
            target.unlink(missing_ok=True)
    features = compute_features(model, dataset, views=config.feature_views, seed=seed,
                                device=device, channels_last=config.channels_last)
    write_cache(target, features)
    return FeatureDataset(features, dataset.labels)
