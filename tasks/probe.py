"""Evaluate frozen features: linear probe (val-selected weight decay), per-class accuracy,
confusion matrix, kNN, and label efficiency at several fractions of the training labels; the
probe's export (safetensors + JSON), which the kd stage's teacher loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.knn import knn_accuracy
from models.probe import LinearProbe, accuracy, select_and_fit
from tasks.artifacts import load_network, save_network

NAME = "probe"  # probe.safetensors + probe.json


@dataclass
class Features:
    """One feature set (SSL encoder, raw pixels, random encoder) on every split."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


@dataclass
class Labels:
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def label_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a stratified `fraction` of the labels, at least one per class."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten().cpu()
        count = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values.to(labels.device)


def evaluate_features(
    features: Features,
    labels: Labels,
    num_classes: int,
    weight_decays: list[float],
    label_fractions: list[float],
    knn_k: int,
    seed: int,
) -> dict:
    """Probe top-1 (full labels), per-class accuracy, confusion matrix, kNN, label efficiency, and
    the probe fitted on the full labels (`probe`, a LinearProbe)."""
    result: dict = {"label_efficiency": {}}
    for fraction in sorted(label_fractions):
        subset = label_subset(labels.train, fraction, seed)
        probe = select_and_fit(
            (features.train[subset], labels.train[subset]), (features.val, labels.val), num_classes, weight_decays
        )
        test_x = probe.standardizer(features.test)
        top1 = accuracy(probe.classifier, test_x, labels.test)
        result["label_efficiency"][fraction] = top1
        if fraction == max(label_fractions):
            predictions = probe.classifier(test_x).argmax(1)
            result["probe_top1"] = top1
            result["probe_weight_decay"] = probe.weight_decay
            result["probe"] = LinearProbe.of(probe)
            result["confusion"] = confusion_matrix(predictions, labels.test, num_classes)
    result["per_class"] = (result["confusion"].diagonal() / result["confusion"].sum(1).clip(min=1)).tolist()
    result["knn_top1"] = knn_accuracy(features.train, labels.train, features.test, labels.test, k=knn_k)
    return result


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    flat = labels.cpu() * num_classes + predictions.cpu()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes).numpy()


def export_probe(probe: LinearProbe, folder: Path) -> None:
    save_network(probe, probe.config, folder, NAME)


def load_probe(folder: Path | str, device: torch.device | str = "cpu") -> LinearProbe:
    """The frozen probe (features -> logits), rebuilt from probe.json + probe.safetensors."""
    return load_network(folder, NAME, lambda config: LinearProbe(**config), device)[0]
