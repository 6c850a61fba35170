"""Decoded-image cache, tensor datasets and CT-suited augmentation.

Images are decoded and resized once per (image list, size) and kept as one uint8 tensor on
disk, so no epoch or round after the first touches Pillow.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from fedct.data.decode import decode_image
from fedct.data.volumes import WINDOWS, decode_slices, parse_rescale
from fedct.errors import FedctError


def cache_dir() -> Path:
    """$FEDCT_CACHE (unset or empty: ~/.cache/fedct), a folder for decoded images and features."""
    configured = os.environ.get("FEDCT_CACHE", "")
    if not configured:
        return Path.home() / ".cache" / "fedct"
    if Path(configured).exists() and not Path(configured).is_dir():
        raise FedctError(f"FEDCT_CACHE={configured}: is a file, not a folder; set it to a "
                         "writable folder")
    return Path(configured)


def write_cache(target: Path, value) -> None:
    """Keep `value` in the cache; a cache that cannot be written is named as such."""
    from fedct.files import atomic_write, save_tensors

    try:
        atomic_write(target, lambda p: save_tensors(value, p))
    except OSError as exc:
        raise FedctError(f"FEDCT_CACHE {target.parent}: cannot write the cache "
                         f"({exc.strerror or exc}); set FEDCT_CACHE to a writable folder") from None


def file_stamp(stat: os.stat_result) -> str:
    """What changes whenever a file's content may have: size, mtime, and the ctime and inode
    that a user cannot set back (restoring the mtime with `touch -d` moves the ctime)."""
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"


def path_stamp(path: Path) -> str:
    """`file_stamp` of a file, or of every file in a folder (a DICOM series)."""
    if not path.is_dir():
        return file_stamp(path.stat())
    return ";".join(f"{p.name}:{file_stamp(p.stat())}" for p in sorted(path.iterdir())
                    if p.is_file())


def _cache_key(paths: list[Path], size: int, slices: list[int | None] | None,
               level_width: tuple[float, float] | None,
               rescale: tuple[float, float] | None = None) -> str:
    digest = hashlib.sha256(f"v2:{size}".encode())
    if rescale is not None or (slices is not None and any(s is not None for s in slices)):
        digest.update(f"slices {level_width} {rescale}\n".encode())  # 2-D keys as they were
    stamps = {path: path_stamp(path) for path in set(paths)}  # a volume's slices share one
    for k, path in enumerate(paths):
        where = "" if slices is None or slices[k] is None else f"#{slices[k]}"
        digest.update(f"{path}{where}\0{stamps[path]}\n".encode())
    return digest.hexdigest()[:32]


def decode_resized(path: Path, size: int, window: tuple[float, float] = WINDOWS["lung"],
                   rescale: tuple[float, float] | None = None) -> np.ndarray:
    return resized(decode_image(path, window=window, rescale=rescale), size)


def resized(pixels: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0))


def load_images(paths: list[Path], size: int, *, use_cache: bool = True,
                slices: list[int | None] | None = None,
                level_width: tuple[float, float] | None = None,
                rescale: tuple[float, float] | None = None) -> torch.Tensor:
    """All images as one uint8 tensor [N, 1, size, size], from the cache when it is there.
    `slices`: for each path, the slice of its volume (None: a 2-D image), windowed at
    `level_width` (as DICOM and, with `rescale` to HU, 16-bit images are); each volume is
    read once, one at a time."""
    if not paths:
        return torch.zeros((0, 1, size, size), dtype=torch.uint8)
    target = cache_dir() / f"images-{_cache_key(paths, size, slices, level_width, rescale)}.pt"
    level_width = level_width or WINDOWS["lung"]
    if use_cache and target.is_file():
        try:
            return torch.load(target, weights_only=True)
        except (RuntimeError, OSError, EOFError):
            target.unlink(missing_ok=True)
    slices = slices or [None] * len(paths)
    flat = [k for k, s in enumerate(slices) if s is None]
    arrays: list[np.ndarray | None] = [None] * len(paths)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for k, array in zip(flat, pool.map(
                lambda k: decode_resized(paths[k], size, level_width, rescale), flat), strict=True):
            arrays[k] = array
    volumes: dict[Path, list[int]] = {}
    for k, s in enumerate(slices):
        if s is not None:
            volumes.setdefault(paths[k], []).append(k)
    for path, rows in volumes.items():
        for k, pixels in zip(rows, decode_slices(path, [slices[k] for k in rows],
                                                 level_width), strict=True):
            arrays[k] = resized(pixels, size)
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(1).contiguous()
    if use_cache:
        write_cache(target, images)
    return images


def make_transform(*, data_cfg: dict, train: bool, config) -> v2.Compose:
    """uint8 [1,H,W] -> normalised float [3,S,S]; augmentation only for training (with
    objective byol, two BYOL views stacked: [2,3,S,S])."""
    if train and getattr(config, "objective", "supervised") == "byol":
        from fedct.byol import TwoViews, view_transform

        return TwoViews(view_transform(data_cfg, config))
    size = data_cfg["input_size"][-1]
    steps: list = []
    if train and config.augment:
        steps.append(v2.RandomResizedCrop(size, scale=(config.aug_scale_min, 1.0),
                                          ratio=(0.85, 1.18), antialias=True))
        if config.aug_rotation > 0:
            steps.append(v2.RandomRotation(config.aug_rotation))
        if config.aug_flip:
            steps.append(v2.RandomHorizontalFlip())
        if config.aug_brightness > 0 or config.aug_contrast > 0:
            steps.append(v2.ColorJitter(brightness=config.aug_brightness,
                                        contrast=config.aug_contrast))
    else:
        steps.append(v2.Resize((size, size), antialias=True))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Lambda(lambda x: x.expand(3, -1, -1)),
        v2.Normalize(mean=data_cfg["mean"], std=data_cfg["std"]),
    ]
    if train and config.augment and config.erase_prob > 0:
        # after normalising, so 0 is the mean grey and all three channels stay equal
        steps.append(v2.RandomErasing(p=config.erase_prob, value=0))
    return v2.Compose(steps)


class ImageTensorDataset(Dataset):
    """Cached uint8 images with integer labels, a per-sample transform and, where known,
    each image's patient group (for patient-level validation)."""

    def __init__(self, images: torch.Tensor, labels: list[int], transform,
                 groups: list[str] | None = None):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.groups = groups

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index]


def make_loader(dataset: ImageTensorDataset, *, batch_size: int, train: bool, seed: int,
                balance: str = "none", num_classes: int = 2,
                drop_last: bool | None = None) -> DataLoader:
    """Seeded loader: the same seed gives the same batches; `sampler` balances classes."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if train and balance == "sampler" and len(dataset):
        counts = torch.bincount(dataset.labels, minlength=num_classes).clamp(min=1).float()
        weights = (1.0 / counts)[dataset.labels]
        sampler = WeightedRandomSampler(weights, len(dataset), replacement=True,
                                        generator=generator)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None,
                      sampler=sampler, generator=generator, num_workers=0,
                      drop_last=(train and len(dataset) > batch_size) if drop_last is None
                      else drop_last)


class SplitImages:
    """Every image of a split directory decoded once at one size; subsets are views by index.

    `classes` gives the label order when it is not the split's own (a model trained for
    classes in another order, a node's data labelled by the server's classes).
    """

    def __init__(self, split, size: int, *, classes: list[str] | None = None):
        self.split = split
        self.index = {e.row.key: i for i, e in enumerate(split.entries)}
        volumes = split.meta.get("volumes")
        self.images = load_images([split.root / e.row.path for e in split.entries], size,
                                  slices=[e.row.slice for e in split.entries],
                                  level_width=(float(volumes["level"]), float(volumes["width"]))
                                  if volumes else None,
                                  rescale=parse_rescale((volumes or {}).get("rescale", "")))
        self.class_index = {name: i for i, name in enumerate(classes or split.classes)}

    def dataset(self, entries, transform) -> ImageTensorDataset:
        rows = torch.as_tensor([self.index[e.row.key] for e in entries], dtype=torch.long)
        labels = [self.class_index[e.row.label] for e in entries]
        return ImageTensorDataset(self.images[rows], labels, transform,
                                  groups=[e.row.group for e in entries])
