"""The self-supervised losses as pure functions of embeddings (solo-learn style), one per objective."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's InfoNCE over the 2N embeddings of two views (N, D): each embedding's positive is
    the other view of its image, the remaining 2N - 2 are its negatives."""
    embeddings = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = embeddings @ embeddings.T / temperature
    self_pairs = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    # row i's positive is row i + n (and back): built on the device, no host-to-device copy
    positives = torch.arange(len(embeddings), device=embeddings.device).roll(len(z1))
    return F.cross_entropy(logits, positives)


def infonce_with_queue(
    queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2
) -> torch.Tensor:
    """MoCo: each query (N, D) is scored against its own key (the positive) and against every row
    of the queue (K, D) of past keys (the negatives). Keys and queue get no gradient."""
    queries = F.normalize(queries, dim=1)
    keys = F.normalize(keys.detach(), dim=1)
    positive = (queries * keys).sum(dim=1, keepdim=True)
    negatives = queries @ F.normalize(queue.detach(), dim=1).T
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=queries.device))


def byol_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss 2 - 2 cos(prediction, target), averaged; the targets get no gradient."""
    return (2 - 2 * F.cosine_similarity(predictions, targets.detach(), dim=-1)).mean()


def dino_loss(
    student_logits: Sequence[torch.Tensor],
    teacher_logits: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float | torch.Tensor = 0.04,
) -> torch.Tensor:
    """DINO: cross-entropy from the teacher's distribution of each view to the student's distribution
    of every other view, averaged over those pairs. The teacher's logits are centred (which keeps one
    dimension from dominating) and sharpened by a low temperature (which keeps them from going uniform)."""
    teacher_probs = [F.softmax((t.detach() - center) / teacher_temperature, dim=-1) for t in teacher_logits]
    student_log_probs = [F.log_softmax(s / student_temperature, dim=-1) for s in student_logits]
    pair_losses = [
        -(probs * log_probs).sum(dim=-1).mean()
        for t_view, probs in enumerate(teacher_probs)
        for s_view, log_probs in enumerate(student_log_probs)
        if t_view != s_view
    ]
    return torch.stack(pair_losses).mean()


def cpc_infonce(predictions: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """CPC's InfoNCE: each prediction (M, D) is scored by dot product against every candidate patch
    embedding (T, D); its positive is candidates[positives[m]], all the others are its negatives."""
    return F.cross_entropy(predictions @ candidates.T, positives)
