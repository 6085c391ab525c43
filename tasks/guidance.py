"""Classifier guidance and request-following: the noise-aware classifier's training module built
from params, its export beside the denoiser (classifier.safetensors + classifier.json) and rebuild,
a denoiser that samples with its gradient, and how often generated images show the class asked for
(the fid stage judges them by the probe on the frozen SSL encoder's features)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from models.guidance import (
    ClassifierGuided,
    NoiseLevels,
    NoisyClassification,
    NoisyClassifier,
    NoisyClassifierConfig,
)
from tasks.artifacts import load_network, save_network
from tasks.device import autocast
from tasks.diffusion import Denoiser
from tasks.params import DiffusionParams

NAME = "classifier"  # artifacts/diffusion/classifier.{safetensors,json}, when diffusion.classifier.epochs > 0


def noise_levels(formulation: str, edm: dict | None = None) -> NoiseLevels:
    """The noising of a denoiser's formulation (EDM's with its sigma_data and σ range)."""
    return NoiseLevels(formulation, sigmas=edm if formulation == "edm" else None)


def build_classifier_training(params: DiffusionParams, latent_channels: int, num_classes: int) -> NoisyClassification:
    """The classifier of `params.classifier` and its loss, on the noising of `params.formulation`."""
    config = NoisyClassifierConfig(latent_channels, num_classes, **params.classifier.model_dump(
        include={"channels", "channel_mults", "blocks_per_level"}))
    edm = params.edm.model_dump(include={"sigma_data", "sigma_min", "sigma_max"})
    return NoisyClassification(NoisyClassifier(config), noise_levels(params.formulation, edm))


def export_classifier(classifier: NoisyClassifier, folder: Path) -> None:
    save_network(classifier, dataclasses.asdict(classifier.config), folder, NAME)


def load_classifier(folder: Path | str, device: torch.device | str = "cpu") -> NoisyClassifier | None:
    """The frozen noise-aware classifier, or None when the diffusion stage trained none."""
    if not (Path(folder) / f"{NAME}.json").exists():
        return None
    return load_network(folder, NAME, lambda config: NoisyClassifier(NoisyClassifierConfig(**config)), device)[0]


def classifier_guided(denoiser: Denoiser, classifier: nn.Module, scale: float) -> Denoiser:
    """`denoiser` sampling along score + scale ∇log p(y | x_t) of `classifier` (models/guidance.py),
    with any of its formulation's samplers."""
    levels = noise_levels(denoiser.formulation, denoiser.edm)
    return dataclasses.replace(denoiser, guide=lambda net: ClassifierGuided(net, classifier, levels, scale))


@torch.no_grad()
def request_accuracy(judge: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """The share of `images` the judge classifies as their `labels` (the class each was asked for)."""
    with autocast(images.device):
        predicted = torch.cat([judge(chunk).float().argmax(1) for chunk in images.clamp(-1, 1).split(batch_size)])
    return (predicted == labels).float().mean().item()
