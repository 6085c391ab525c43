"""Prepared splits kept on the training device as uint8, and the batches drawn from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.artifacts import artifacts_dir, read_array, read_json, unreadable

PREPARED = artifacts_dir("prepare")
SPLITS = ("train", "val", "test")


def load_manifest() -> dict:
    return read_json(PREPARED / "manifest.json", keys=("image_shape", "class_names", "counts"))


def read_labels(path: Path, num_classes: int, source: str) -> np.ndarray:
    """Integer labels, each in [0, num_classes) as `source` (the file it comes from) says: one out of
    range would index past a class table, or be taken for the guidance null class."""
    labels = read_array(path, ndim=1, kinds="iu")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise unreadable(path, f"{len(outside)} label(s) outside [0, {num_classes}), e.g. {outside[0]}; "
                               f"{source} says {num_classes} classes")
    return labels


def read_values(path: Path, shape: tuple[int | None, ...], source: str) -> np.ndarray:
    """A float array of `shape` (None: any length there) as `source` says, every value finite."""
    values = read_array(path, ndim=len(shape), kinds="f")
    if any(want is not None and got != want for got, want in zip(values.shape, shape, strict=True)):
        expected = "(" + ", ".join("*" if want is None else str(want) for want in shape) + ")"
        raise unreadable(path, f"shape {values.shape}, expected {expected} ({source})")
    if bad := values.size - int(np.isfinite(values).sum()):
        raise unreadable(path, f"{bad} of its {values.size} values are NaN or infinite")
    return values


@dataclass
class ImageSplit:
    """One split on a device: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def floats(self, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The selected images as floats in [-1, 1]."""
        return self.images[index].float().div_(127.5).sub_(1.0)


def load_split(split: str, device: torch.device | str = "cpu") -> ImageSplit:
    """A prepared split: uint8 images (N, C, H, W) of the manifest's image_shape and labels (N,)
    within its class_names."""
    manifest = load_manifest()
    path = PREPARED / f"{split}_images.npy"
    images = read_array(path, ndim=4, kinds="u")
    if list(images.shape[1:]) != manifest["image_shape"]:
        raise unreadable(path, f"images of shape {list(images.shape[1:])}, but manifest.json says {manifest['image_shape']} (C, H, W)")
    labels = read_labels(PREPARED / f"{split}_labels.npy", len(manifest["class_names"]), "manifest.json")
    if len(images) != len(labels):
        raise unreadable(PREPARED / f"{split}_labels.npy", f"{len(labels)} labels for {len(images)} images")
    return ImageSplit(torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device))


class EpochBatches:
    """Indices for each step: a seeded permutation per epoch, each rank taking its own shard.

    Stateless in the step, so a resumed run draws the same batches as an uninterrupted one.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, device="cpu"):
        if size < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the {size} training images")
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.local_batch = batch_size // world
        self.steps_per_epoch = size // batch_size
        self.device = device
        self._epoch, self._shard = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            permutation = torch.randperm(self.size, generator=generator)
            self._shard = permutation[self.rank :: self.world].to(self.device)
            self._epoch = epoch
        return self._shard[within * self.local_batch : (within + 1) * self.local_batch]
