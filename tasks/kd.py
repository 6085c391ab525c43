"""Knowledge distillation of a classifier: the teachers (a wider CNN trained on the labels, or the
frozen encoder and its linear probe) and their logits on the training images, CNNs trained by the one
loop, the student's export, and top-1 and images/s end to end from images."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from models.kd import KnowledgeDistillation, StudentCNN
from models.knn import share
from tasks.artifacts import artifacts_dir, load_network, save_network
from tasks.data import ImageSplit, load_manifest
from tasks.device import autocast
from tasks.encoder import load_embeddings, load_encoder
from tasks.params import KdParams
from tasks.probe import load_probe
from tasks.training import TrainingContext, TrainResult

NAME = "student"  # student.safetensors + student.json


def load_probe_teacher(train_size: int, device: torch.device | str) -> tuple[nn.Module, torch.Tensor]:
    """The probe teacher, images -> logits (encoder, then probe; frozen), and its logits of the
    `train_size` training images: the probe on the encoder stage's training embeddings, the same
    features it was fitted on."""
    encoder, probe = load_encoder(artifacts_dir("encoder"), device), load_probe(artifacts_dir("probe"), device)
    with torch.no_grad():
        train_logits = probe(load_embeddings(artifacts_dir("encoder"), "train", train_size, device))
    return nn.Sequential(encoder, probe).eval(), train_logits


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_cnn(
    params: KdParams, train: ImageSplit, context: TrainingContext, name: str,
    teacher_logits: torch.Tensor | None = None, alpha: float = 0.0,
) -> TrainResult:
    """A CNN trained on the training images from the seed's initial weights: the student (student_widths,
    `train`) with the distillation loss at `alpha` (0: the labels alone) against `teacher_logits`, or
    with no teacher logits the cnn teacher (teacher_widths, teacher_train) on the labels. Its step
    metrics are logged as `<name>/<metric>` (plots/kd/students.csv), its checkpoint is
    checkpoints/kd/<name>.pt."""
    torch.manual_seed(params.seed)
    widths, budget = (params.teacher_widths, params.teacher_train) if teacher_logits is None else (params.student_widths, params.train)
    network = StudentCNN(train.images.shape[1], train.images.shape[-1], len(load_manifest()["class_names"]), widths)
    trainer, batches = context.logged_as(f"{name}/").trainer(KnowledgeDistillation(network, params.temperature, alpha), budget, len(train), params.seed, name)

    def batch(step: int) -> tuple[torch.Tensor, ...]:
        rows = batches(step)
        return train.floats(rows), train.labels[rows], *([] if teacher_logits is None else [teacher_logits[rows]])

    return trainer.fit(batch)


@torch.no_grad()
def logits_of(classifier: nn.Module, split: ImageSplit, batch_size: int) -> torch.Tensor:
    """The classifier's float32 logits of every image in `split`, in order."""
    with autocast(split.images.device):
        return torch.cat([
            classifier(split.floats(slice(start, start + batch_size))).float() for start in range(0, len(split), batch_size)
        ])


@torch.no_grad()
def top1_and_speed(classifier: nn.Module, split: ImageSplit, batch_size: int) -> tuple[float, float]:
    """Top-1 on `split` and images/s, end to end from its uint8 images on the device (after one
    warm-up batch)."""
    device = split.images.device
    with autocast(device):
        classifier(split.floats(slice(0, batch_size)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    correct = (logits_of(classifier, split, batch_size).argmax(1) == split.labels).sum().item()  # reading it back waits for the device
    return share(correct, len(split)), len(split) / max(time.perf_counter() - started, 1e-9)


def top1_gain(top1: float, baseline: float, total: int) -> float:
    """`top1 - baseline`, two accuracies over the same `total` samples, as precise as they are."""
    return share(round((top1 - baseline) * total), total)


def export_student(student: StudentCNN, folder: Path) -> None:
    save_network(student, student.config, folder, NAME)


def load_student(folder: Path | str, device: torch.device | str = "cpu") -> StudentCNN:
    """The frozen student (images -> logits), rebuilt from student.json + student.safetensors."""
    return load_network(folder, NAME, lambda config: StudentCNN(**config), device)[0]
