"""The GAN stage's pieces: the WGAN-GP training module built from params, the alternating update
schedule the training loop follows, export and rebuild of the generator (safetensors + JSON),
seeded class-conditional sampling and decoded per-class grids."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.gan import WGANGP, Critic, GanConfig, Generator
from tasks.artifacts import load_network, save_network
from tasks.data import EpochBatches
from tasks.device import autocast
from tasks.images import grid, to_uint8
from tasks.params import GanParams
from tasks.vae import LatentDecoder

NAME = "generator"  # generator.safetensors + generator.json


def build_gan_training(params: GanParams, latent_shape: tuple[int, ...], num_classes: int) -> WGANGP:
    config = GanConfig(tuple(latent_shape), num_classes, **params.net.model_dump())
    return WGANGP(Generator(config), Critic(config), params.penalty_weight, tuple(params.adam_betas))


def update_of(step: int, critic_steps: int) -> str:
    """Which network a training step updates: `critic_steps` critic steps, then one generator step."""
    return "generator" if step % (critic_steps + 1) == critic_steps else "critic"


def alternating_batches(
    batches: EpochBatches, latents: torch.Tensor, labels: torch.Tensor, critic_steps: int
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor, str]]:
    """The Trainer's `next_batch`: the step's real latents and labels, and the network it updates
    (the generator draws its own noise for the step's labels)."""

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        index = batches(step)
        return latents[index], labels[index], update_of(step, critic_steps)

    return next_batch


def export_generator(generator: Generator, folder: Path) -> None:
    config = dataclasses.asdict(generator.config)
    save_network(generator, {**config, "latent_shape": list(generator.config.latent_shape)}, folder, NAME)


def load_generator(folder: Path | str, device: torch.device | str = "cpu", name: str = NAME) -> Generator:
    """Rebuild the frozen generator (eval mode, no grads) from <name>.json + <name>.safetensors."""

    def build(config: dict) -> Generator:
        return Generator(GanConfig(**{**config, "latent_shape": tuple(config["latent_shape"])}))

    return load_network(folder, name, build, device)[0]


@torch.no_grad()
def sample_latents(generator: Generator, labels: torch.Tensor, seed: int, batch_size: int = 500) -> torch.Tensor:
    """Scaled latents for `labels` from seeded noise (the same on any device), in batches."""
    generator.eval()
    noise = torch.randn(len(labels), generator.config.noise_dim, generator=torch.Generator().manual_seed(seed))
    with autocast(labels.device):
        return torch.cat([
            generator(chunk.to(labels.device), chunk_labels).float()
            for chunk, chunk_labels in zip(noise.split(batch_size), labels.split(batch_size), strict=True)
        ])


def timed_gan_images(
    generator: Generator, decoder: LatentDecoder, labels: torch.Tensor, seed: int, batch_size: int = 500
) -> tuple[torch.Tensor, float]:
    """Decoded samples in [-1, 1] for `labels`, and the images/s of sampling plus decoding."""
    started = time.perf_counter()
    images = decoder(sample_latents(generator, labels, seed, batch_size), labels)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)  # count the kernels still queued
    return images, len(labels) / max(time.perf_counter() - started, 1e-9)


def gan_class_grid(generator: Generator, decoder: LatentDecoder, per_class: int, seed: int) -> tuple[np.ndarray, float]:
    """A row of `per_class` decoded samples per class, and the images/s it was drawn at."""
    device = next(generator.parameters()).device
    labels = torch.arange(generator.config.num_classes, device=device).repeat_interleave(per_class)
    images, images_per_s = timed_gan_images(generator, decoder, labels, seed)
    return grid(to_uint8(images), ncols=per_class), images_per_s
