"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): a
denoiser `net(x, t, labels)` with the U-Net's interface (models/unet.py), over a latent grid cut
into patches.

The grid's patches become tokens with fixed 2-D sin-cos positions; each block is pre-norm attention
and MLP, whose norms are shifted and scaled and whose residual branches are gated by an MLP of the
time + class embedding (adaLN-Zero). That MLP starts at zero, so every block starts as the identity,
and the final layer starts at zero, so the net's output does too. Any grid whose sides the patch
size divides works: the positions are computed for the grid each call.

Two departures from the paper: the time embedding is the U-Net's sinusoidal table at the token
width (the paper's is 256 wide, then projected), and the net predicts no variance (the paper
learns one for DDPM's variational bound, which no formulation here trains).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import timestep_embedding, zero_init


@dataclass
class DiTConfig:
    """Set by tasks/params.py's DiTParams (which also checks that heads divide dim) and by the data."""

    in_channels: int  # latent channels; the output has as many
    num_classes: int  # real classes; index num_classes is the null class
    patch_size: int  # side of the square patches a token covers; it must divide the grid
    dim: int  # token width
    depth: int  # transformer blocks
    heads: int
    mlp_ratio: int  # MLP hidden width / dim


def sincos_positions(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """(height * width, dim) fixed positions, row by row: half the features encode the row, half
    the column, each as sin and cos at dim / 4 frequencies (MAE's and DiT's 2-D sin-cos table)."""
    frequencies = 1.0 / 10_000 ** (torch.arange(dim // 4, device=device) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    angles = [axis.flatten().float()[:, None] * frequencies[None] for axis in (rows, cols)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Attention and MLP branches, each after a LayerNorm that the conditioning shifts and scales,
    and gated by it: with the modulation zero (its init), x passes through unchanged."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim))
        self.modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 6 * dim)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.null_label = config.num_classes
        dim, patch = config.dim, config.patch_size
        self.patchify = nn.Conv2d(config.in_channels, dim, patch, stride=patch)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_embedding = nn.Embedding(config.num_classes + 1, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.output = nn.Linear(dim, patch * patch * config.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """The paper's: Xavier-uniform linears (the patch embedding's kernel as one), N(0, 0.02) for
        the time MLP and class table, zero for every adaLN modulation and the output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patchify.weight.view(self.config.dim, -1))
        nn.init.zeros_(self.patchify.bias)
        for linear in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(self.class_embedding.weight, std=0.02)
        for linear in [block.modulation[1] for block in self.blocks] + [self.final_modulation[1], self.output]:
            zero_init(linear)

    def hidden_width(self, depth: int) -> int:
        """Width of the tokens after block `depth`, which REPA aligns: every block's is dim."""
        return self.config.dim

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, hidden_depth: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The output; with `hidden_depth`, (the output, the tokens after that block (1-based)
        mean-pooled, (N, dim)) for REPA."""
        n, channels, height, width = x.shape
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"a {height}x{width} latent grid is not a multiple of DiT patch_size {patch}")
        rows, cols = height // patch, width // patch
        tokens = self.patchify(x).flatten(2).transpose(1, 2)  # (n, rows * cols, dim)
        tokens = tokens + sincos_positions(rows, cols, self.config.dim, x.device).to(tokens.dtype)
        c = self.time_mlp(timestep_embedding(t, self.config.dim)) + self.class_embedding(labels)
        for index, block in enumerate(self.blocks, 1):
            tokens = block(tokens, c)
            if index == hidden_depth:
                hidden = tokens.mean(1)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        out = self.output(modulate(self.final_norm(tokens), shift, scale))  # (n, tokens, patch * patch * channels)
        out = out.view(n, rows, cols, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(n, channels, height, width)
        return out if hidden_depth is None else (out, hidden)
