"""Backbones that map images (N, C, H, W) to features (N, out_dim): a CIFAR-style ResNet and a small ViT.

Each model keeps the config it was built from; `build_backbone(**model.config)` rebuilds it,
so a JSON file of that dict plus the weights is all an exported encoder needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ResNetConfig:
    """Set by tasks/params.py's ResNetParams and by the data."""

    in_channels: int
    image_size: int  # not needed by the convolutions; kept so the encoder knows its input size
    width: int  # channels of the first stage; each later stage doubles them
    depth: tuple[int, ...]  # BasicBlocks per stage; (2, 2, 2, 2) is ResNet-18
    stem_stride: int  # 2 halves the image in the stem: about 3.5x cheaper, for images of 28 px and up


@dataclass(frozen=True)
class ViTConfig:
    """Set by tasks/params.py's ViTParams (which also checks that heads divide dim) and by the data."""

    in_channels: int
    image_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: int
    pool: str  # the feature: the final cls token, or the mean of the patch tokens ("mean")


# -- ResNet ------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # zero-init the last norm so every block starts as the identity (Goyal et al., 2017)
        nn.init.zeros_(self.bn2.weight)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem without max-pool (small images keep their resolution, or half of it with
    stem_stride 2), then stages that halve it."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = {"name": "resnet", **asdict(config)}
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, config.width, 3, config.stem_stride, 1, bias=False),
            nn.BatchNorm2d(config.width),
            nn.ReLU(inplace=True),
        )
        blocks, channels = [], config.width
        for stage, num_blocks in enumerate(config.depth):
            stage_channels = config.width * 2**stage
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, stage_channels, stride))
                channels = stage_channels
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = channels

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The last stage's features before pooling (N, out_dim, h, w), for dense SSL heads."""
        return self.blocks(self.stem(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_map(images).mean(dim=(2, 3))


# -- ViT ---------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm attention and MLP, each on a residual branch."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Non-overlapping patches, a cls token and learned positions; the feature is the final cls token
    or the mean of the final patch tokens (what I-JEPA and MAE are probed with)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.config = {"name": "vit", **asdict(config)}
        self.image_size = config.image_size
        self.pool = config.pool
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patchify = nn.Conv2d(config.in_channels, config.dim, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.positions = nn.Parameter(torch.randn(1, num_patches + 1, config.dim) * 0.02)
        self.blocks = nn.Sequential(
            *(TransformerBlock(config.dim, config.heads, config.mlp_ratio) for _ in range(config.depth))
        )
        self.norm = nn.LayerNorm(config.dim)
        self.out_dim = config.dim
        self.apply(_init_vit_weights)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Every patch's embedding plus its position (N, patches, dim), row by row: what the
        masked objectives (MAE, I-JEPA) subset before `encode`."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"ViT built for {self.image_size}x{self.image_size} inputs, got {tuple(images.shape[-2:])}")
        return self.patchify(images).flatten(2).transpose(1, 2) + self.positions[:, 1:]

    def encode(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """The cls token and any subset of embedded patches through the blocks and the final norm:
        (N, 1 + tokens, dim), the cls token first."""
        cls = (self.cls_token + self.positions[:, :1]).expand(len(patch_tokens), -1, -1)
        return self.norm(self.blocks(torch.cat([cls, patch_tokens], dim=1)))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The encoded patch tokens as a grid (N, dim, h, w), for dense SSL heads."""
        tokens = self.encode(self.embed_patches(images))[:, 1:]
        side = self.image_size // self.config["patch_size"]
        return tokens.transpose(1, 2).reshape(len(images), -1, side, side)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encode(self.embed_patches(images))
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)


def _init_vit_weights(module: nn.Module) -> None:
    # truncated-normal linears as in timm's ViT; PyTorch's default fan-in init trains worse here
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


# -- factory -----------------------------------------------------------------------------

BACKBONES = {"resnet": (ResNet, ResNetConfig), "vit": (ViT, ViTConfig)}


def build_backbone(name: str, in_channels: int, image_size: int, **cfg) -> ResNet | ViT:
    """A backbone by name ("resnet" or "vit"); `cfg` holds the rest of its config's fields."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    model_class, config_class = BACKBONES[name]
    if "depth" in cfg and isinstance(cfg["depth"], list):  # a JSON round trip turns tuples into lists
        cfg["depth"] = tuple(cfg["depth"])
    return model_class(config_class(in_channels=in_channels, image_size=image_size, **cfg))
