"""The ar stage's pieces: the VQ-VAE's code grids of a split (raster order), the prior built from
params, export and rebuild (safetensors + JSON, with the sampling settings beside it), bits per
token on held-out codes, seeded sampling decoded by the VQ-VAE, and the note a skipped run leaves."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from models.ar import ArConfig, CodePrior, bits, next_token_loss, sample_codes
from models.vae import VAE
from tasks.artifacts import load_network, read_json, save_network, write_json
from tasks.device import autocast
from tasks.images import grid, to_uint8
from tasks.params import ArParams
from tasks.vae import decode, encode_means

NAME = "prior"  # prior.safetensors + prior.json
SAMPLING = "sampling.json"  # the temperature and top_k the fid stage samples with
SKIPPED = "skipped.json"  # what a run with a continuous latent leaves instead of a prior


def skip_reason(vae_config: dict) -> str | None:
    """Why there is no code grid to model (None when the VAE has a codebook)."""
    if vae_config.get("codebook_size", 0) > 0:
        return None
    return "vae.regulariser is not vq: the VAE has no codebook, so there are no codes to model"


def has_prior(folder: Path | str) -> bool:
    """Whether the ar stage trained a prior (False when it skipped: a VAE without a codebook)."""
    return (Path(folder) / f"{NAME}.json").is_file()


def write_skipped(folder: Path, reason: str) -> None:
    write_json(folder / SKIPPED, {"skipped": True, "reason": reason})


@torch.no_grad()
def code_grids(vae: VAE, latents: torch.Tensor) -> torch.Tensor:
    """The code index at each latent position, (N, h * w) in raster order (row by row)."""
    return vae.quantizer.codes(latents).flatten(1)


def split_codes(vae: VAE, images: torch.Tensor) -> torch.Tensor:
    """The code grids of images in [-1, 1] (their posterior means' nearest codes)."""
    return code_grids(vae, encode_means(vae, images))


def build_prior(params: ArParams, vocab_size: int, num_classes: int, grid_shape: tuple[int, int]) -> CodePrior:
    return CodePrior(ArConfig(vocab_size, num_classes, *grid_shape, params.dim, params.depth, params.heads, params.dropout))


def export_prior(prior: CodePrior, params: ArParams, folder: Path) -> None:
    save_network(prior, dataclasses.asdict(prior.config), folder, NAME)
    write_json(folder / SAMPLING, {"temperature": params.temperature, "top_k": params.top_k})


def load_prior(folder: Path | str, device: torch.device | str = "cpu") -> tuple[CodePrior, dict]:
    """The frozen prior (eval mode, no grads) and its sampling settings {"temperature", "top_k"}."""
    prior = load_network(folder, NAME, lambda config: CodePrior(ArConfig(**config)), device)[0]
    return prior, read_json(Path(folder) / SAMPLING, keys=("temperature", "top_k"))


@torch.no_grad()
def bits_per_token(prior: CodePrior, codes: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """The mean cross-entropy of `codes` (N, length) under the prior, in bits per code."""
    prior.eval()
    total = 0.0
    with autocast(codes.device):
        for chunk, chunk_labels in zip(codes.split(batch_size), labels.split(batch_size), strict=True):
            total += next_token_loss(prior, chunk_labels, chunk).item() * len(chunk)
    return bits(total / len(codes))


def unigram_bits_per_token(train_codes: torch.Tensor, codes: torch.Tensor, vocab_size: int) -> float:
    """The baseline a prior must beat: bits per code of `codes` under the training codes' frequencies
    (add-one smoothed), ignoring the class and the context."""
    counts = torch.bincount(train_codes.flatten(), minlength=vocab_size).double() + 1
    return bits(-(counts / counts.sum()).log()[codes.flatten()].mean().item())


def decode_codes(vae: VAE, codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images in [-1, 1] from code grids (N, height * width): each code's codebook vector, decoded."""
    vectors = vae.quantizer.codebook[codes].view(len(codes), height, width, -1).movedim(-1, 1)
    return decode(vae, vectors)


@torch.no_grad()
def timed_ar_images(
    prior: CodePrior, vae: VAE, labels: torch.Tensor, seed: int, temperature: float, top_k: int | None, batch_size: int = 500,
) -> tuple[torch.Tensor, float]:
    """Decoded samples in [-1, 1] for `labels`, and the images/s of sampling plus decoding."""
    prior.eval()
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    with autocast(labels.device):
        codes = torch.cat([sample_codes(prior, chunk, temperature, top_k, generator) for chunk in labels.split(batch_size)])
    images = decode_codes(vae, codes, prior.config.height, prior.config.width)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)  # count the kernels still queued
    return images, len(labels) / max(time.perf_counter() - started, 1e-9)


def ar_class_grid(
    prior: CodePrior, vae: VAE, per_class: int, seed: int, temperature: float, top_k: int | None
) -> tuple[np.ndarray, float]:
    """A row of `per_class` decoded samples per class, and the images/s it was drawn at."""
    device = next(prior.parameters()).device
    labels = torch.arange(prior.config.num_classes, device=device).repeat_interleave(per_class)
    images, images_per_s = timed_ar_images(prior, vae, labels, seed, temperature, top_k)
    return grid(to_uint8(images), ncols=per_class), images_per_s
