"""Masked-image objectives on the ViT's patch tokens: MAE (pixels of masked patches) and I-JEPA
(representations of masked blocks). The encoder sees only the tokens it keeps; the exported
encoder is the plain ViT (its cls token, or its mean patch token with `vit.pool: mean`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.augment import TwoViews
from models.backbones import TransformerBlock
from models.ssl import MomentumObjective, SSLObjective, feature_std


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (N, P, D) at index (N, K) -> (N, K, D)."""
    return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def random_masking(batch: int, patches: int, keep: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-image random subset: the kept patches' indices (N, keep) and the mask (N, P), True
    where a patch is hidden. One argsort of uniform noise: batched, no per-image Python."""
    keep_index = torch.rand(batch, patches, device=device).argsort(dim=1)[:, :keep]
    masked = torch.ones(batch, patches, dtype=torch.bool, device=device).scatter(1, keep_index, False)
    return keep_index, masked


def patch_pixels(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, patches, C * patch_size**2), patches row by row as the ViT embeds them."""
    return F.unfold(images, patch_size, stride=patch_size).transpose(1, 2)


def masked_patch_loss(predicted: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """MAE's loss: the mean squared error per patch, averaged over the masked patches only."""
    per_patch = (predicted - target).pow(2).mean(dim=-1)
    return (per_patch * masked).sum() / masked.sum()


class TokenDecoder(nn.Module):
    """A narrow transformer over the encoder's tokens plus a learned mask token at every hidden
    position (MAE's decoder, I-JEPA's predictor): project in, add its own positions, blocks, norm."""

    def __init__(self, encoder_dim: int, patches: int, dim: int, depth: int, heads: int, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.positions = nn.Parameter(torch.randn(1, patches, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, 4) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def positions_at(self, index: torch.Tensor) -> torch.Tensor:
        return gather_tokens(self.positions.expand(len(index), -1, -1), index)


class MAE(SSLObjective):
    """He et al., 2022: hide a high ratio of random patches, encode the visible ones only, and
    reconstruct the hidden patches' per-patch normalised pixels with a light decoder."""

    colour_augmented = False

    def __init__(
        self,
        backbone: nn.Module,
        augment: TwoViews,
        mask_ratio: float,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        norm_pix_loss: bool,
    ):
        if not hasattr(backbone, "embed_patches"):
            raise ValueError("mae masks patch tokens: it needs the vit backbone")
        config = backbone.config
        self.patch_size = config["patch_size"]
        patches = (config["image_size"] // self.patch_size) ** 2
        pixels = config["in_channels"] * self.patch_size**2
        super().__init__(backbone, augment, TokenDecoder(backbone.out_dim, patches, decoder_dim, decoder_depth, decoder_heads, pixels))
        self.patches = patches
        self.keep = max(1, round(patches * (1 - mask_ratio)))
        self.norm_pix_loss = norm_pix_loss

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.reconstruction_loss(self.augment.view(images))

    def reconstruction_loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        keep_index, masked = random_masking(len(images), self.patches, self.keep, images.device)
        encoded = self.backbone.encode(gather_tokens(self.backbone.embed_patches(images), keep_index))
        predicted = self.decode(encoded, keep_index)
        target = patch_pixels(images, self.patch_size)
        if self.norm_pix_loss:
            target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return {"loss": masked_patch_loss(predicted, target, masked), "feature_std": feature_std(encoded[:, 0])}

    def decode(self, encoded: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """The pixels of every patch (N, P, pixels) from the cls token and the kept patches' tokens:
        the kept ones go back to their places, a mask token everywhere else."""
        decoder = self.head
        tokens = decoder.embed(encoded)
        cls, visible = tokens[:, :1], tokens[:, 1:]
        every = decoder.mask_token.expand(len(tokens), self.patches, -1)
        every = every.scatter(1, keep_index[..., None].expand(-1, -1, every.shape[-1]), visible) + decoder.positions
        return decoder.out(decoder.norm(decoder.blocks(torch.cat([cls, every], dim=1))))[:, 1:]


def _host_uniform(low: float, high: float) -> float:
    """A draw from torch's seeded CPU generator (the loop seeds it every step): no device sync."""
    return low + (high - low) * float(torch.rand(()))


class IJEPA(MomentumObjective):
    """Assran et al., 2023: from a context of visible patches, a predictor regresses the EMA target
    encoder's (layer-normed) representations of several hidden target blocks; no pixels, no views.

    Batched: one block shape per step (positions per image), so every image has the same number of
    target tokens; the context is a random subset, of a fixed size, of the tokens outside every
    block (the paper's context block covers 85-100 % of these small grids anyway)."""

    colour_augmented = False

    def __init__(
        self,
        backbone: nn.Module,
        augment: TwoViews,
        predictor_dim: int,
        predictor_depth: int,
        predictor_heads: int,
        num_targets: int,
        target_scale: tuple[float, float],
        target_aspect: tuple[float, float],
        momentum_base: float,
    ):
        if not hasattr(backbone, "embed_patches"):
            raise ValueError("ijepa predicts patch tokens: it needs the vit backbone")
        super().__init__(backbone, augment, nn.Identity(), momentum_base)
        self.side = backbone.config["image_size"] // backbone.config["patch_size"]
        if num_targets >= self.side**2:
            raise ValueError(f"ijepa.num_targets {num_targets} leaves no context in a {self.side}x{self.side} patch "
                             "grid: lower it, or vit.patch_size")
        self.predictor = TokenDecoder(backbone.out_dim, self.side**2, predictor_dim, predictor_depth, predictor_heads, backbone.out_dim)
        self.num_targets = num_targets
        self.target_scale = tuple(target_scale)
        self.target_aspect = tuple(target_aspect)

    def block_shape(self) -> tuple[int, int]:
        """This step's target block (rows, columns): scale and aspect drawn as in the paper, shrunk
        until the blocks leave a context even when they do not overlap."""
        area = _host_uniform(*self.target_scale) * self.side**2
        aspect = _host_uniform(*self.target_aspect)
        rows = min(self.side, max(1, round((area * aspect) ** 0.5)))
        cols = min(self.side, max(1, round((area / aspect) ** 0.5)))
        while self.num_targets * rows * cols >= self.side**2:
            rows, cols = (rows - 1, cols) if rows >= cols else (rows, cols - 1)
        return rows, cols

    def masks(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Target token indices (N, blocks, rows * cols) and context indices (N, K) outside every block."""
        rows, cols = self.block_shape()
        top = torch.randint(0, self.side - rows + 1, (batch, self.num_targets, 1, 1), device=device)
        left = torch.randint(0, self.side - cols + 1, (batch, self.num_targets, 1, 1), device=device)
        row = top + torch.arange(rows, device=device)[:, None]
        col = left + torch.arange(cols, device=device)[None, :]
        target_index = (row * self.side + col).flatten(2)
        patches = self.side**2
        in_target = torch.zeros(batch, patches, device=device).scatter(1, target_index.flatten(1), 1.0)
        context_size = patches - self.num_targets * rows * cols  # never more than the tokens outside
        context_index = (in_target * 2 + torch.rand(batch, patches, device=device)).argsort(dim=1)[:, :context_size]
        return target_index, context_index

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.prediction_loss(self.augment.view(images))

    def prediction_loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        target_index, context_index = self.masks(len(images), images.device)
        batch, blocks, block_tokens = target_index.shape
        with torch.no_grad():
            target_encoder = self.target[0]
            targets = target_encoder.encode(target_encoder.embed_patches(images))[:, 1:]
            targets = F.layer_norm(targets, targets.shape[-1:])
            targets = gather_tokens(targets, target_index.flatten(1)).view(batch, blocks, block_tokens, -1)
        context = self.backbone.encode(gather_tokens(self.backbone.embed_patches(images), context_index))
        predicted = self.predict(context, context_index, target_index)
        return {"loss": F.mse_loss(predicted, targets), "feature_std": feature_std(context[:, 0])}

    def predict(self, context: torch.Tensor, context_index: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
        """Each target block's representations (N, blocks, tokens, dim), one predictor pass per
        block (the blocks stacked along the batch), from the context and the blocks' positions."""
        predictor = self.predictor
        batch, blocks, block_tokens = target_index.shape
        tokens = predictor.embed(context)
        tokens = torch.cat([tokens[:, :1], tokens[:, 1:] + predictor.positions_at(context_index)], dim=1)
        queries = predictor.mask_token + predictor.positions_at(target_index.flatten(1))
        queries = queries.view(batch * blocks, block_tokens, -1)
        sequence = torch.cat([tokens.repeat_interleave(blocks, dim=0), queries], dim=1)
        out = predictor.out(predictor.norm(predictor.blocks(sequence)[:, -block_tokens:]))
        return out.view(batch, blocks, block_tokens, -1)
