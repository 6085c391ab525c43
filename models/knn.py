"""Weighted k-nearest-neighbour classification of embeddings (Wu et al., 2018; DINO's kNN monitor)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The class of each query (M,): its k most cosine-similar training embeddings each vote for
    their label with weight exp(similarity / temperature). Queries go in chunks to bound memory."""
    train_features = F.normalize(train_features.float(), dim=1)
    num_classes = int(train_labels.max()) + 1
    k = min(k, len(train_features))
    predictions = []
    for queries in F.normalize(query_features.float(), dim=1).split(chunk_size):
        similarities, neighbours = (queries @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[neighbours], (similarities / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of `knn_predict` on the test embeddings."""
    predictions = knn_predict(train_features, train_labels, test_features, k, temperature)
    return share((predictions == test_labels.to(predictions.device)).sum().item(), len(test_labels))


def share(count: int, total: int) -> float:
    """`count / total` to one decimal more than 1/total needs (what an accuracy over `total`
    samples resolves), without float noise."""
    return round(count / total, math.ceil(math.log10(max(total, 1))) + 1)
