"""Image grids as PNG: what people look at instead of reading numbers."""

from __future__ import annotations

import math
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


def steps_caption(steps: int) -> str:
    """'1 step', '4 steps': how a sample grid's caption names its sampler steps."""
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def captioned(panels: dict[str, np.ndarray], ncols: int = 4, pad: int = 12, font_size: int = 14) -> np.ndarray:
    """Several grids (H, W, C) in one labelled image: `ncols` a row, each under its caption
    (e.g. {"guidance 2": grid}); the grids' pixels are kept as they are."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    caption_height = font_size + 8
    grids = list(panels.values())
    channels = max(g.shape[2] for g in grids)
    cell_height = max(g.shape[0] for g in grids) + caption_height
    cell_width = math.ceil(max(*(g.shape[1] for g in grids), *(font.getlength(c) for c in panels))) + pad
    nrows = -(-len(grids) // ncols)
    canvas = np.full((nrows * cell_height + pad, min(ncols, len(grids)) * cell_width + pad, channels), 255, np.uint8)
    captions = []
    for i, (caption, panel) in enumerate(panels.items()):
        row, col = divmod(i, ncols)
        top, left = pad + row * cell_height, pad + col * cell_width
        canvas[top + caption_height : top + caption_height + panel.shape[0], left : left + panel.shape[1]] = panel
        captions.append(((left, top), caption))
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    draw = ImageDraw.Draw(image)
    for position, caption in captions:
        draw.text(position, caption, fill=0 if channels == 1 else (0, 0, 0), font=font)
    array = np.asarray(image)
    return array[..., None] if channels == 1 else array
