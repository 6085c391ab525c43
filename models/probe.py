"""Linear probe: multinomial logistic regression on frozen features, fitted full-batch with L-BFGS."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.knn import share


@dataclass
class Standardizer:
    """Per-dimension mean/std of the training features, applied to every split."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor) -> Standardizer:
        return cls(features.mean(0), features.std(0).clamp_min(1e-6))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 200
) -> nn.Linear:
    """Cross-entropy + weight_decay * |W|^2 / 2, minimised with L-BFGS (strong-Wolfe line search)."""
    classifier = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(), lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(classifier(features), labels)
        loss = loss + 0.5 * weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return classifier.requires_grad_(False)


def accuracy(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    return share((classifier(features).argmax(1) == labels).sum().item(), len(labels))


@dataclass
class ProbeResult:
    classifier: nn.Linear
    standardizer: Standardizer
    weight_decay: float  # the value the val split chose
    val_accuracy: float


class LinearProbe(nn.Module):
    """A fitted probe as one network over features: standardise, then the linear classifier."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.config = {"dim": dim, "num_classes": num_classes}
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.classifier = nn.Linear(dim, num_classes)

    @classmethod
    def of(cls, result: ProbeResult) -> LinearProbe:
        probe = cls(result.classifier.in_features, result.classifier.out_features)
        probe.load_state_dict({
            "mean": result.standardizer.mean, "std": result.standardizer.std,
            "classifier.weight": result.classifier.weight, "classifier.bias": result.classifier.bias,
        })
        return probe.to(result.classifier.weight.device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier((features - self.mean) / self.std)


def select_and_fit(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    weight_decays: list[float],
) -> ProbeResult:
    """Fit one probe per weight decay on train; keep the one with the best val accuracy."""
    standardizer = Standardizer.fit(train[0])
    train_x, val_x = standardizer(train[0]), standardizer(val[0])
    best: ProbeResult | None = None
    for weight_decay in weight_decays:
        classifier = fit_logistic(train_x, train[1], num_classes, weight_decay)
        score = accuracy(classifier, val_x, val[1])
        if best is None or score > best.val_accuracy:
            best = ProbeResult(classifier, standardizer, weight_decay, score)
    return best
