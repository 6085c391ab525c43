"""Hand-designed pretext tasks beside rotation: jigsaw puzzles (and, in the same shape, the other
tasks whose labels come from the image itself). Each is one objective over the shared base."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.augment import TwoViews
from models.ssl import SSLObjective, feature_std


def hamming_permutations(tiles: int, count: int) -> torch.Tensor:
    """Noroozi & Favaro's permutation set (count, tiles): from the identity, greedily add the
    permutation farthest (in minimum Hamming distance) from those chosen, the first in
    lexicographic order on ties. Far-apart permutations make every class tell the puzzle apart."""
    every = np.array(list(itertools.permutations(range(tiles))), dtype=np.int8)
    if count > len(every):
        raise ValueError(f"jigsaw: {count} permutations asked of {tiles} tiles, which have only {len(every)}")
    positions = np.ascontiguousarray(every.T)  # (tiles, tiles!): one comparison per position
    nearest = np.full(len(every), tiles, dtype=np.int8)  # each candidate's distance to the set
    chosen = [0]
    for _ in range(count - 1):
        distance = np.zeros(len(every), dtype=np.int8)
        for position, value in enumerate(every[chosen[-1]]):
            distance += positions[position] != value
        np.minimum(nearest, distance, out=nearest)
        chosen.append(int(nearest.argmax()))
    return torch.from_numpy(every[chosen].astype(np.int64))


def cut_tiles(images: torch.Tensor, grid: int, tile_fraction: float) -> torch.Tensor:
    """(N, C, H, W) -> (N, grid**2, C, t, t): the image cut into grid x grid cells, row by row, and a
    tile at a random offset in each (the gap between tiles hides edges that would give the
    puzzle away); every tile normalised on its own, against shortcuts from brightness."""
    batch, channels, height, _ = images.shape
    cell = height // grid
    tile = max(1, round(cell * tile_fraction))
    device = images.device
    offsets = torch.randint(0, cell - tile + 1, (batch, grid * grid, 2), device=device)
    cells = torch.arange(grid * grid, device=device)
    steps = torch.arange(tile, device=device)
    rows = (cells // grid * cell)[None, :, None] + offsets[..., :1] + steps  # (N, tiles, t)
    cols = (cells % grid * cell)[None, :, None] + offsets[..., 1:] + steps
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    tiles = images.permute(0, 2, 3, 1)[batch_index, rows[..., :, None], cols[..., None, :]]  # (N, tiles, t, t, C)
    tiles = tiles.permute(0, 1, 4, 2, 3)
    mean = tiles.mean(dim=(2, 3, 4), keepdim=True)
    std = tiles.std(dim=(2, 3, 4), keepdim=True)
    return (tiles - mean) / (std + 1e-3)


def shuffle_tiles(tiles: torch.Tensor, permutations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's tiles (N, T, ...) put in the order of a random permutation of the set: slot i
    holds tile permutations[label][i]. Returns the shuffled tiles and each image's label, the
    permutation's index in the set."""
    labels = torch.randint(0, len(permutations), (len(tiles),), device=tiles.device)
    order = permutations.to(tiles.device)[labels]  # (N, T)
    index = order.view(*order.shape, *[1] * (tiles.ndim - 2)).expand_as(tiles)
    return tiles.gather(1, index), labels


class Jigsaw(SSLObjective):
    """Noroozi & Favaro, 2016: cut a view into a grid of tiles, shuffle them by one of a fixed set
    of far-apart permutations, and classify which one from the shared backbone's per-tile features,
    concatenated in the shuffled order. Tiles are resized to the backbone's input size, so the
    exported backbone takes whole images as before."""

    def __init__(
        self,
        backbone: nn.Module,
        augment: TwoViews,
        grid: int = 3,
        num_permutations: int = 1000,
        tile_fraction: float = 0.85,
        hidden_dim: int = 4096,
    ):
        tiles = grid * grid
        head = nn.Sequential(nn.Linear(tiles * backbone.out_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, num_permutations))
        super().__init__(backbone, augment, head)
        self.register_buffer("permutations", hamming_permutations(tiles, num_permutations), persistent=False)
        self.grid = grid
        self.tile_fraction = tile_fraction
        self.image_size = backbone.config["image_size"]
        if self.image_size // grid < 1:
            raise ValueError(f"jigsaw.grid {grid} is larger than the {self.image_size}-pixel images")

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tiles = cut_tiles(self.augment.view(images), self.grid, self.tile_fraction)
        shuffled, labels = shuffle_tiles(tiles, self.permutations)
        flat = F.interpolate(shuffled.flatten(0, 1), size=self.image_size, mode="bilinear", align_corners=False)
        features = self.backbone(flat)
        logits = self.head(features.view(len(images), -1))
        return {
            "loss": F.cross_entropy(logits, labels),
            "accuracy": (logits.argmax(dim=1) == labels).float().mean(),
            "feature_std": feature_std(features),
        }
