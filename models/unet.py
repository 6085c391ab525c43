"""U-Net denoiser over a latent grid: `net(x, t, labels)` returns a tensor shaped like x.

The network knows nothing of the formulation: models/diffusion.py decides whether the output
is a flow velocity, DDPM's epsilon or EDM's preconditioned F. t is a float tensor (N,), the noise
level: in [0, 1] for the flow and DDPM, ln(σ) / 4 (about -1.6 to 1.1) under EDM; labels are class
indices (N,), where `null_label` (= num_classes) means "no label" for classifier-free guidance.
Any grid size works (2x2 up): each level halves it (rounding up) and the way back up resizes
to the skip connection it meets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    """The fields but norm_groups are set by tasks/params.py's UNetParams (which also checks
    that attention_heads divides the deepest width) and by the data."""

    in_channels: int  # latent channels; the output has as many
    num_classes: int  # real classes; index num_classes is the null class
    channels: int  # width of the first level
    channel_mults: tuple[int, ...]  # width of each level / channels; each next level halves the grid
    blocks_per_level: int
    attention_heads: int  # self-attention at the lowest resolution
    dropout: float
    norm_groups: int = 8

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)  # JSON gives a list


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with at most `groups` groups that still divide the channels."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero the last layer of a residual branch, so each block starts as the identity."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1]; t is scaled by 1000 so the frequencies cover it as
    they cover DDPM's integer steps."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000 * t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """Two 3x3 convolutions; the time + class embedding scales and shifts the second one's input."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embedding(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the grid positions, as a residual branch."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (n, heads, positions, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest resize to the skip connection's size (odd grids round up on the way down)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.null_label = config.num_classes
        groups, dropout = config.norm_groups, config.dropout
        embedding_dim = 4 * config.channels
        self.time_mlp = nn.Sequential(
            nn.Linear(config.channels, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim)
        )
        self.class_embedding = nn.Embedding(config.num_classes + 1, embedding_dim)
        self.input = nn.Conv2d(config.in_channels, config.channels, 3, padding=1)

        def block(in_channels: int, out_channels: int) -> ResBlock:
            return ResBlock(in_channels, out_channels, embedding_dim, groups, dropout)

        # down: every layer's output is kept for a skip connection on the way up
        level_widths = [config.channels * mult for mult in config.channel_mults]
        width, skip_widths = config.channels, [config.channels]
        self.down = nn.ModuleList()
        for level, level_width in enumerate(level_widths):
            for _ in range(config.blocks_per_level):
                self.down.append(block(width, level_width))
                width = level_width
                skip_widths.append(width)
            if level < len(level_widths) - 1:
                self.down.append(Downsample(width))
                skip_widths.append(width)

        self.middle = nn.ModuleList(
            [block(width, width), SelfAttention(width, config.attention_heads, groups), block(width, width)]
        )

        # up: one block more per level than on the way down, to take the downsample's skip too
        self.up = nn.ModuleList()
        for level, level_width in reversed(list(enumerate(level_widths))):
            for _ in range(config.blocks_per_level + 1):
                self.up.append(block(width + skip_widths.pop(), level_width))
                width = level_width
            if level > 0:
                self.up.append(Upsample(width))

        output_conv = zero_init(nn.Conv2d(width, config.in_channels, 3, padding=1))
        self.output = nn.Sequential(group_norm(width, groups), nn.SiLU(), output_conv)

    def residual_blocks(self) -> list[ResBlock]:
        """The ResBlocks in the order the input meets them: down, middle, up."""
        return [module for module in self.modules() if isinstance(module, ResBlock)]

    def hidden_width(self, depth: int) -> int:
        """Channels of the features after residual block `depth` (1-based), which REPA aligns."""
        return self.residual_blocks()[depth - 1].conv2.out_channels

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, hidden_depth: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The output; with `hidden_depth`, (the output, the features after that residual block
        (1-based) mean-pooled over the grid, (N, channels)) for REPA."""
        tapped = self.residual_blocks()[hidden_depth - 1] if hidden_depth else None
        embedding = self.time_mlp(timestep_embedding(t, self.config.channels)) + self.class_embedding(labels)
        h = self.input(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, embedding) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
            if layer is tapped:
                hidden = h.mean((2, 3))
        for layer in self.middle:
            h = layer(h, embedding) if isinstance(layer, ResBlock) else layer(h)
            if layer is tapped:
                hidden = h.mean((2, 3))
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h, skips[-1].shape[-2:])
            else:
                h = layer(torch.cat([h, skips.pop()], dim=1), embedding)
            if layer is tapped:
                hidden = h.mean((2, 3))
        output = self.output(h)
        return output if tapped is None else (output, hidden)
