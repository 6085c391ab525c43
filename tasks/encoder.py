"""The frozen encoder: export to safetensors + JSON config, rebuild from those two files alone,
embed every split, and refuse a collapsed representation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.backbones import build_backbone
from tasks.artifacts import freeze, load_network, read_json, save_network, unreadable
from tasks.data import ImageSplit, read_values
from tasks.device import autocast
from tasks.errors import StageError

NAME = "encoder"  # encoder.safetensors + encoder.json


class EncoderCollapsed(StageError):
    """Every embedding dimension is (nearly) constant: the SSL run learned nothing usable."""


def export_encoder(backbone: nn.Module, config: dict, folder: Path) -> None:
    """Write the backbone's weights and the config `build_backbone(**config)` rebuilds it from."""
    save_network(backbone, config, folder, NAME)


def load_encoder(folder: Path | str, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the frozen encoder (eval mode, no grads) from encoder.json + encoder.safetensors."""
    return load_network(folder, NAME, lambda config: build_backbone(**config), device)[0]


def random_encoder(folder: Path | str, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """The probe's random baseline: a freshly initialised network of the exported encoder's own
    architecture (encoder.json's whole config: a random ViT of the same patch size, width, depth
    and pooling for MAE and I-JEPA, a random ResNet of the same widths for SimCLR), frozen."""
    config = read_json(Path(folder) / f"{NAME}.json", keys=("name", "in_channels", "image_size"))
    torch.manual_seed(seed)
    return freeze(build_backbone(**config).to(device))


@torch.no_grad()
def load_embeddings(folder: Path | str, split: str, rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The encoder stage's embeddings of a split: one finite row per image of it."""
    path = Path(folder) / f"{split}_embeddings.npy"
    return torch.from_numpy(read_values(path, (rows, None), f"one row per image of the prepared {split} split")).to(device)


def embed(encoder: nn.Module, split: ImageSplit, batch_size: int = 1024) -> torch.Tensor:
    """Features of every image of a split, batched (bf16 autocast on CUDA), in float32."""
    with autocast(split.images.device):
        chunks = [
            encoder(split.floats(slice(start, start + batch_size))).float()
            for start in range(0, len(split), batch_size)
        ]
    return torch.cat(chunks)


def collapse_stats(embeddings: torch.Tensor, tolerance: float = 1e-4) -> dict[str, float]:
    """Per-dimension std relative to the features' scale; `dead_fraction` counts near-constant dims."""
    relative_std = embeddings.std(0) / (embeddings.abs().mean() + 1e-12)
    return {
        "embedding_std_mean": relative_std.mean().item(),
        "embedding_std_max": relative_std.max().item(),
        "dead_fraction": (relative_std < tolerance).float().mean().item(),
    }


def check_not_collapsed(embeddings: torch.Tensor, tolerance: float = 1e-4) -> dict[str, float]:
    stats = collapse_stats(embeddings, tolerance)
    if stats["embedding_std_max"] < tolerance:
        raise EncoderCollapsed(
            f"the encoder collapsed: every embedding dimension has std < {tolerance} of the features' "
            f"scale (max {stats['embedding_std_max']:.2e}). Try another objective, a lower lr or more epochs."
        )
    return stats


def backbone_from_ssl(folder: Path) -> tuple[nn.Module, dict]:
    """The online backbone of a trained SSL objective (heads and target networks stripped)."""
    config = read_json(folder / "config.json", keys=("backbone",))["backbone"]
    try:
        state = torch.load(folder / "objective.pt", map_location="cpu", weights_only=True)
        backbone = build_backbone(**config)
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    except Exception as err:  # truncated, not plain tensors (nothing else is unpickled), other weights
        raise unreadable(folder / "objective.pt", f"does not load with config.json ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0][:200]})") from None
    return freeze(backbone), config


def project_2d(embeddings: np.ndarray, method: str, seed: int) -> np.ndarray:
    """t-SNE (PCA-initialised) or PCA to two dimensions."""
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(2, random_state=seed).fit_transform(embeddings)
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(embeddings) - 1) / 3)
    return TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(embeddings)
