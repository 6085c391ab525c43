"""An autoregressive prior over a VQ-VAE's code grid (van den Oord et al. 2017 used a PixelCNN;
this is the transformer of VQGAN, Esser et al. 2021, in miniature): a class-conditional, GPT-style
causal decoder over the codes in raster order, trained by next-token cross-entropy and sampled one
token at a time with temperature and top-k.

The sequence the network reads is [class, code_0, ..., code_{L-2}]: the class embedding stands in
the first place, so the logits at place i predict code_i from the class and the codes before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ArConfig:
    vocab_size: int  # the VQ-VAE's codebook size
    num_classes: int
    height: int  # the latent grid's rows and columns: height * width codes per sample
    width: int
    dim: int
    depth: int
    heads: int
    dropout: float

    @property
    def length(self) -> int:
        return self.height * self.width


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ArConfig):
        super().__init__()
        self.heads, self.dropout = config.heads, config.dropout
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.out = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-LN: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ArConfig):
        super().__init__()
        self.attention_norm, self.attention = nn.LayerNorm(config.dim), CausalSelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim), nn.GELU(), nn.Linear(4 * config.dim, config.dim), nn.Dropout(config.dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CodePrior(nn.Module):
    """(labels (N,), codes (N, T), 0 <= T <= length) -> logits (N, min(T + 1, length), vocab_size):
    row i is the distribution of code_i given the class and codes[:, :i]."""

    def __init__(self, config: ArConfig):
        super().__init__()
        self.config = config
        self.class_embedding = nn.Embedding(config.num_classes, config.dim)
        self.code_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position = nn.Parameter(torch.zeros(config.length, config.dim))
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)  # GPT-2's
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.class_embedding(labels)[:, None], self.code_embedding(codes)], dim=1)
        tokens = tokens[:, : self.config.length]  # the last code is only ever a target
        x = self.dropout(tokens + self.position[: tokens.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def next_token_loss(prior: CodePrior, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy (nats) of each code (N, length) given the class and the codes before it."""
    logits = prior(labels, codes)
    return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())


def bits(nats: torch.Tensor | float) -> torch.Tensor | float:
    return nats / math.log(2)


class NextTokenTraining(nn.Module):
    """The training loop's module: forward((codes (N, length), labels (N,))) -> {"loss"}, the
    next-token cross-entropy in nats."""

    def __init__(self, prior: CodePrior):
        super().__init__()
        self.prior = prior

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        codes, labels = batch
        return {"loss": next_token_loss(self.prior, labels, codes)}


def pick_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of logits (N, V): a draw from softmax(logits / temperature) over the top_k
    most likely tokens (None: all), by the Gumbel-max trick on the given uniform noise (N, V) so it
    is the same on any device; temperature 0 is the argmax."""
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0:
        return logits.argmax(-1)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
    return (logits / temperature + gumbel).argmax(-1)


@torch.no_grad()
def sample_codes(
    prior: CodePrior, labels: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator
) -> torch.Tensor:
    """Codes (N, length) for `labels`, one place at a time (a forward pass each: `length` network
    evaluations), the noise drawn on the CPU from `generator`."""
    config = prior.config
    codes = labels.new_zeros(len(labels), 0)
    for _ in range(config.length):
        logits = prior(labels, codes)[:, -1]
        uniform = torch.rand(len(labels), config.vocab_size, generator=generator).to(labels.device)
        codes = torch.cat([codes, pick_tokens(logits, temperature, top_k, uniform)[:, None]], dim=1)
    return codes
