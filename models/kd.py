"""Knowledge distillation of a classifier (Hinton et al. 2015): a small CNN student, and the loss
that mixes the task's cross-entropy with the KL divergence from the teacher's temperature-softened
outputs to the student's."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StudentConfig:
    in_channels: int
    image_size: int
    num_classes: int
    widths: tuple[int, ...]  # channels of each conv stage; each stage halves the grid


class StudentCNN(nn.Module):
    """conv3x3 -> ReLU -> 2x2 max-pool per width, then one linear layer on the flattened grid."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, widths: tuple[int, ...] | list[int]):
        super().__init__()
        self.config = asdict(StudentConfig(in_channels, image_size, num_classes, tuple(widths)))
        layers, channels, size = [], in_channels, image_size
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = width, size // 2
        if size < 1:
            raise ValueError(f"{len(widths)} stages halve a {image_size}-pixel image to nothing; use fewer widths")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(channels * size * size, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, cross-entropy, soft term): (1 - alpha) CE(student, labels) + alpha T^2 KL(p_teacher^T || p_student^T).
    The soft term's gradients scale as 1/T^2, so T^2 keeps its weight against the labels' term
    whatever the temperature (Hinton et al. 2015, section 2)."""
    cross_entropy = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
        reduction="batchmean", log_target=True,
    )
    return (1 - alpha) * cross_entropy + alpha * temperature**2 * soft, cross_entropy, soft


class KnowledgeDistillation(nn.Module):
    """Trains `student` on batches of (images, labels, the teacher's logits of those images);
    alpha 0 is plain supervised training. A batch of (images, labels) alone, with no teacher,
    trains on the labels' cross-entropy (how the kd stage trains its CNN teacher)."""

    def __init__(self, student: nn.Module, temperature: float, alpha: float):
        super().__init__()
        self.student, self.temperature, self.alpha = student, temperature, alpha

    def forward(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        images, labels, *teacher = batch
        logits = self.student(images).float()
        if not teacher:
            cross_entropy = F.cross_entropy(logits, labels)
            return {"loss": cross_entropy, "cross_entropy": cross_entropy}
        [teacher_logits] = teacher
        loss, cross_entropy, soft = distillation_loss(logits, teacher_logits, labels, self.temperature, self.alpha)
        return {"loss": loss, "cross_entropy": cross_entropy, "soft_kl": soft}
