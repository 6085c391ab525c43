"""U-Net denoiser over a latent grid: `net(x, t, labels)` returns a tensor shaped like x.

The network knows nothing of the formulation: models/diffusion.py decides whether the output
is a flow velocity, DDPM's epsilon or EDM's preconditioned F. t is a float tensor (N,), the noise
level: in [0, 1] for the flow and DDPM, ln(σ) / 4 (about -1.6 to 1.1) under EDM; labels are class
indices (N,), where `null_label` (= num_classes) means "no label" for classifier-free guidance.

Text-conditioned (`text_dim` > 0), a label is an index into a table of captions whose token
features (num_classes + 1, length, text_dim) and padding the frozen CLIP text encoder computed once
and the net keeps as buffers (row num_classes: the empty caption, the null label); the ResBlocks of the levels
`cross_attention_levels` names, and the middle ones, then attend to the caption's tokens
(cross-attention, padding masked out of the keys), and no class embedding is added to the time's.
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
    attention_heads: int  # self-attention at the lowest resolution, and every cross-attention's
    dropout: float
    cross_attention_levels: tuple[int, ...]  # levels whose blocks attend to the caption (text-conditioned only)
    text_length: int = 0  # tokens per caption; 0: class-conditioned
    text_dim: int = 0  # width of the text encoder's token features
    norm_groups: int = 8

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)  # JSON gives a list
        self.cross_attention_levels = tuple(self.cross_attention_levels)


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
    """Two 3x3 convolutions; the time embedding (plus the class's, class-conditioned) scales and
    shifts the second one's input. With `cross_attention`, the block's output then attends to the
    caption's tokens."""

    def __init__(
        self, in_channels: int, out_channels: int, embedding_dim: int, groups: int, dropout: float,
        cross_attention: CrossAttention | None = None,
    ):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.cross_attention = cross_attention

    def forward(
        self, x: torch.Tensor, embedding: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embedding(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.skip(x) + self.conv2(self.dropout(F.silu(h)))
        return h if self.cross_attention is None else self.cross_attention(h, *context)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of queries (N, Lq, C) over keys and values (N, Lk, C); `mask` (N, Lk),
    True where a key may be attended to. (N, Lq, C)."""
    n, length, channels = q.shape
    q, k, v = (t.reshape(n, -1, heads, channels // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    return out.transpose(1, 2).reshape(n, length, channels)


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
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        out = attend(q, k, v, self.heads)
        return x + self.proj(out.transpose(1, 2).reshape(n, c, h, w))


class CrossAttention(nn.Module):
    """Queries from the grid positions, keys and values from the caption's token features, the
    padding masked out of the keys (Rombach et al. 2022's cross-attention), as a residual branch."""

    def __init__(self, channels: int, text_dim: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.query = nn.Conv2d(channels, channels, 1)
        self.key_value = nn.Linear(text_dim, 2 * channels)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W); tokens (N, length, text_dim); keep (N, length), False at padding."""
        n, c, h, w = x.shape
        q = self.query(self.norm(x)).flatten(2).transpose(1, 2)
        k, v = self.key_value(tokens.to(q.dtype)).chunk(2, dim=-1)
        out = attend(q, k, v, self.heads, keep)
        return x + self.proj(out.transpose(1, 2).reshape(n, c, h, w))


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
        if config.text_dim:  # the table's token features, the empty caption last; set by the diffusion stage
            rows = config.num_classes + 1
            self.register_buffer("caption_tokens", torch.zeros(rows, config.text_length, config.text_dim))
            self.register_buffer("caption_keep", torch.ones(rows, config.text_length, dtype=torch.bool))
        else:
            self.class_embedding = nn.Embedding(config.num_classes + 1, embedding_dim)
        self.input = nn.Conv2d(config.in_channels, config.channels, 3, padding=1)

        def block(in_channels: int, out_channels: int, level: int | None) -> ResBlock:
            attends = config.text_dim and (level is None or level in config.cross_attention_levels)
            cross = CrossAttention(out_channels, config.text_dim, config.attention_heads, groups) if attends else None
            return ResBlock(in_channels, out_channels, embedding_dim, groups, dropout, cross)

        # down: every layer's output is kept for a skip connection on the way up
        level_widths = [config.channels * mult for mult in config.channel_mults]
        width, skip_widths = config.channels, [config.channels]
        self.down = nn.ModuleList()
        for level, level_width in enumerate(level_widths):
            for _ in range(config.blocks_per_level):
                self.down.append(block(width, level_width, level))
                width = level_width
                skip_widths.append(width)
            if level < len(level_widths) - 1:
                self.down.append(Downsample(width))
                skip_widths.append(width)

        self.middle = nn.ModuleList(
            [block(width, width, None), SelfAttention(width, config.attention_heads, groups), block(width, width, None)]
        )

        # up: one block more per level than on the way down, to take the downsample's skip too
        self.up = nn.ModuleList()
        for level, level_width in reversed(list(enumerate(level_widths))):
            for _ in range(config.blocks_per_level + 1):
                self.up.append(block(width + skip_widths.pop(), level_width, level))
                width = level_width
            if level > 0:
                self.up.append(Upsample(width))

        output_conv = zero_init(nn.Conv2d(width, config.in_channels, 3, padding=1))
        self.output = nn.Sequential(group_norm(width, groups), nn.SiLU(), output_conv)

    def set_captions(self, tokens: torch.Tensor, keep: torch.Tensor) -> None:
        """A text-conditioned net's caption table: token features (num_classes + 1, length, text_dim)
        and where they are not padding (same rows, length), the empty caption last."""
        self.caption_tokens.copy_(tokens)
        self.caption_keep.copy_(keep)

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
        embedding = self.time_mlp(timestep_embedding(t, self.config.channels))
        if self.config.text_dim:
            context = self.caption_tokens[labels], self.caption_keep[labels]
        else:
            embedding, context = embedding + self.class_embedding(labels), None
        h = self.input(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, embedding, context) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
            if layer is tapped:
                hidden = h.mean((2, 3))
        for layer in self.middle:
            h = layer(h, embedding, context) if isinstance(layer, ResBlock) else layer(h)
            if layer is tapped:
                hidden = h.mean((2, 3))
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h, skips[-1].shape[-2:])
            else:
                h = layer(torch.cat([h, skips.pop()], dim=1), embedding, context)
            if layer is tapped:
                hidden = h.mean((2, 3))
        output = self.output(h)
        return output if tapped is None else (output, hidden)
