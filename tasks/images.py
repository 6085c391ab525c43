"""Image grids as PNG: what people look at instead of reading numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] (N, C, H, W) -> uint8 array."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def grid(images: np.ndarray, ncols: int, pad: int = 1, min_cell: int = 48) -> np.ndarray:
    """uint8 (N, C, H, W) -> one (H', W', C) image, cells upscaled (nearest) to at least min_cell px."""
    images = np.asarray(images)
    n, channels, height, width = images.shape
    scale = max(1, -(-min_cell // max(height, width)))
    images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    height, width = height * scale, width * scale
    nrows = -(-n // ncols)
    canvas = np.full((channels, nrows * (height + pad) + pad, ncols * (width + pad) + pad), 255, np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        top, left = pad + row * (height + pad), pad + col * (width + pad)
        canvas[:, top : top + height, left : left + width] = image
    return canvas.transpose(1, 2, 0)


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def class_grid(images: np.ndarray, labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """A row per class, `per_class` random examples each (uint8 in, grid out)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        picked = rng.choice(members, size=min(per_class, len(members)), replace=False)
        row = images[picked]
        if len(row) < per_class:
            row = np.concatenate([row, np.full((per_class - len(row), *images.shape[1:]), 255, np.uint8)])
        rows.append(row)
    return grid(np.concatenate(rows), ncols=per_class)
