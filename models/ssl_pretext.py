"""Hand-designed pretext tasks beside rotation, whose targets come from the image itself: jigsaw
puzzles, inpainting a hidden block, denoising a corrupted image, colorization from lightness. Each
is one objective over the shared base; the dense ones decode the backbone's feature map back to
pixels."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_lab
from torch import nn

from models.augment import TwoViews
from models.ssl import SSLObjective, _gather_across_ranks, feature_std


def hamming_permutations(tiles: int, count: int) -> torch.Tensor:
    """A maximin variant of Noroozi & Favaro's permutation set (count, tiles): from the identity,
    greedily add the permutation whose *minimum* Hamming distance to those chosen is largest (the
    paper's Algorithm 1 maximises the summed distance from a random start), the first in
    lexicographic order on ties. It guarantees the closest pair of classes stays far apart."""
    if tiles > 9:
        raise ValueError(f"jigsaw: {tiles} tiles have too many permutations to search (at most 9 tiles, a 3x3 grid)")
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
        grid: int,
        num_permutations: int,
        tile_fraction: float,
        hidden_dim: int,
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


# -- dense tasks: a decoder from the backbone's feature map to every pixel ------------------


def pixel_decoder(in_dim: int, hidden_dim: int, out_channels: int, image_size: int) -> nn.Sequential:
    """Feature map (N, in_dim, h, w) -> (N, out_channels, image_size, image_size): a 1x1 projection,
    bilinear upsampling, two 3x3 convolutions. Light, so the backbone does the work."""
    return nn.Sequential(
        nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True),
        nn.Upsample(size=(image_size, image_size), mode="bilinear", align_corners=False),
        nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(hidden_dim, out_channels, 3, padding=1),
    )


def random_block_masks(batch: int, image_size: int, block: int, device: torch.device) -> torch.Tensor:
    """(N, 1, S, S) float masks, 1 on a block x block square at a random place per image."""
    top = torch.randint(0, image_size - block + 1, (batch, 1, 1, 1), device=device)
    left = torch.randint(0, image_size - block + 1, (batch, 1, 1, 1), device=device)
    steps = torch.arange(image_size, device=device)
    rows = (steps[:, None] >= top) & (steps[:, None] < top + block)
    cols = (steps[None, :] >= left) & (steps[None, :] < left + block)
    return (rows & cols).float()


def masked_region_loss(reconstructed: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The context encoder's L2 loss: the mean squared error over the hidden pixels only."""
    squared = (reconstructed - images).pow(2) * masks
    return squared.sum() / (masks.sum() * images.shape[1])


class Inpainting(SSLObjective):
    """Pathak et al., 2016 (context encoders): hide a square block of each view (filled with 0, the
    data's middle grey), encode what is left, decode the whole image, and pay an L2 loss on the
    hidden block only. The random-block variant of the paper; its adversarial term is left out."""

    colour_augmented = False

    def __init__(self, backbone: nn.Module, augment: TwoViews, block_fraction: float, decoder_dim: int):
        config = backbone.config
        super().__init__(backbone, augment, pixel_decoder(backbone.out_dim, decoder_dim, config["in_channels"], config["image_size"]))
        self.image_size = config["image_size"]
        self.block = max(1, round(block_fraction * self.image_size))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.inpainting_loss(self.augment.view(images))

    def inpainting_loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        masks = random_block_masks(len(images), self.image_size, self.block, images.device)
        features = self.backbone.feature_map(images * (1 - masks))
        reconstructed = self.head(features)
        return {"loss": masked_region_loss(reconstructed, images, masks), "feature_std": feature_std(features.mean(dim=(2, 3)))}


class DenoisingAutoencoder(SSLObjective):
    """Vincent et al., 2008 and 2010 (denoising autoencoders): corrupt each view, with additive
    Gaussian noise or by masking a fixed fraction of its pixels to 0 (the data's middle grey, all
    channels of a pixel at once), encode the corrupted image, decode the whole image, and pay an L2
    loss against the clean view on every pixel. The backbone never sees the clean view."""

    colour_augmented = False

    def __init__(self, backbone: nn.Module, augment: TwoViews, corruption: str, sigma: float, mask_fraction: float, decoder_dim: int):
        config = backbone.config
        super().__init__(backbone, augment, pixel_decoder(backbone.out_dim, decoder_dim, config["in_channels"], config["image_size"]))
        self.corruption = corruption
        self.sigma = sigma
        self.mask_fraction = mask_fraction

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.denoising_loss(self.augment.view(images))

    def corrupt(self, images: torch.Tensor) -> torch.Tensor:
        """The noisy input: x + N(0, sigma^2 I), or x with round(mask_fraction * H * W) pixels of
        each image, chosen at random, set to 0."""
        if self.corruption == "gaussian":
            return images + self.sigma * torch.randn_like(images)
        batch, _, height, width = images.shape
        hidden = torch.rand(batch, height * width, device=images.device).argsort(dim=1) < round(self.mask_fraction * height * width)
        return images * ~hidden.view(batch, 1, height, width)

    def denoising_loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone.feature_map(self.corrupt(images))
        return {"loss": F.mse_loss(self.head(features), images), "feature_std": feature_std(features.mean(dim=(2, 3)))}


AB_RANGE = 110.0  # CIE Lab's a and b of sRGB colours lie within +-110


def ab_bins(ab: torch.Tensor, bin_size: float) -> torch.Tensor:
    """(N, 2, H, W) a, b -> (N, H, W) the index of the bin_size x bin_size cell on the ab plane."""
    per_side = math.ceil(2 * AB_RANGE / bin_size)
    cells = ((ab + AB_RANGE) / bin_size).floor().long().clamp(0, per_side - 1)
    return cells[:, 0] * per_side + cells[:, 1]


class Colorization(SSLObjective):
    """Zhang et al., 2016: from the lightness L of a colour view, classify each pixel's colour
    among quantised ab bins, each bin's loss weighted by the inverse of its (smoothed) frequency so
    rare saturated colours count. Documented simplifications: the whole square grid of bins (not
    the 313 in gamut), hard targets (not soft-encoded), and bin frequencies estimated as a running
    average over training batches (not beforehand on the dataset). The backbone keeps its RGB
    input: it sees the lightness as a grey RGB image."""

    colour_augmented = False

    def __init__(
        self,
        backbone: nn.Module,
        augment: TwoViews,
        bin_size: float,
        rebalance: float,
        frequency_momentum: float,
        decoder_dim: int,
    ):
        config = backbone.config
        if config["in_channels"] != 3:
            raise ValueError("colorization needs colour (3-channel) images")
        bins = math.ceil(2 * AB_RANGE / bin_size) ** 2
        super().__init__(backbone, augment, pixel_decoder(backbone.out_dim, decoder_dim, bins, config["image_size"]))
        self.bin_size = bin_size
        self.rebalance = rebalance
        self.frequency_momentum = frequency_momentum
        self.register_buffer("bin_frequency", torch.full((bins,), 1 / bins))  # saved: resumes where it was

    def class_weights(self) -> torch.Tensor:
        """Zhang's w proportional to ((1 - lambda) p + lambda / Q)^-1, scaled so that E_p[w] = 1."""
        weights = 1 / ((1 - self.rebalance) * self.bin_frequency + self.rebalance / len(self.bin_frequency))
        return weights / (self.bin_frequency * weights).sum()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        lab = rgb_to_lab((self.augment.view(images) + 1) / 2)
        lightness = (lab[:, :1] / 50 - 1).expand(-1, 3, -1, -1)  # [0, 100] -> [-1, 1], as grey RGB
        targets = ab_bins(lab[:, 1:], self.bin_size)
        if self.training:
            self._count(targets)
        features = self.backbone.feature_map(lightness)
        logits = self.head(features)
        per_pixel = F.cross_entropy(logits, targets, reduction="none")
        return {
            "loss": (self.class_weights()[targets] * per_pixel).mean(),
            "accuracy": (logits.argmax(dim=1) == targets).float().mean(),
            "feature_std": feature_std(features.mean(dim=(2, 3))),
        }

    @torch.no_grad()
    def _count(self, targets: torch.Tensor) -> None:
        flat = targets.flatten()
        counts = torch.zeros_like(self.bin_frequency).scatter_add_(0, flat, torch.ones_like(flat, dtype=self.bin_frequency.dtype))
        batch_frequency = _gather_across_ranks((counts / flat.numel())[None]).mean(dim=0)  # every rank's pixels
        self.bin_frequency.lerp_(batch_frequency, 1 - self.frequency_momentum)
