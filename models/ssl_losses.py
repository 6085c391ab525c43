"""The self-supervised losses as pure functions of embeddings (solo-learn style), one per objective
(SimCLR's gathers its negatives from every rank under torchrun)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows under torchrun, in rank order, with gradient flowing back to the rank
    that made them; and this rank's index. Just `tensor` and 0 when run plainly."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    return torch.cat(dist_nn.all_gather(tensor.contiguous())), dist.get_rank()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's InfoNCE over the 2N embeddings of two views (N, D): each embedding's positive is
    the other view of its image, the remaining 2N - 2 are its negatives. Under torchrun the
    negatives are every rank's (N = the global batch): each rank scores its own rows, so the mean
    of the ranks' losses, and DDP's mean of their gradients, are those of one process on the
    global batch."""
    all1, rank = gather_with_grad(z1)
    all2, _ = gather_with_grad(z2)
    keys = F.normalize(torch.cat([all1, all2]), dim=1)
    queries = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = queries @ keys.T / temperature
    # where each of this rank's rows sits among the keys (built on the device, no host-to-device copy)
    local = torch.arange(len(z1), device=z1.device) + rank * len(z1)
    own = torch.cat([local, local + len(all1)])
    rows = torch.arange(len(queries), device=z1.device)
    logits = logits.index_put((rows, own), torch.tensor(float("-inf"), device=z1.device, dtype=logits.dtype))
    # row i's positive is the other view of its image: key own[i + n] (and back)
    return F.cross_entropy(logits, own.roll(len(z1)))


def infonce_with_queue(
    queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, temperature: float
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
    student_temperature: float,
    teacher_temperature: float | torch.Tensor,
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


@torch.no_grad()
def hardest_negatives(anchors: torch.Tensor, keys: torch.Tensor, own: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Batch-hard mining (Hermans et al., 2017): for each anchor (M, D) the index of the key (K, D)
    nearest to it in Euclidean distance, leaving out key own[m] (the anchor itself) and
    positives[m] (its other view). Every key is l2-normalised here, so nearest is most cosine-similar."""
    similarities = anchors @ keys.T
    rows = torch.arange(len(anchors), device=anchors.device)
    excluded = torch.tensor(float("-inf"), device=anchors.device, dtype=similarities.dtype)
    similarities = similarities.index_put((rows, own), excluded).index_put((rows, positives), excluded)
    return similarities.argmax(dim=1)


def batch_hard_triplet(z1: torch.Tensor, z2: torch.Tensor, margin: float, soft_margin: bool) -> torch.Tensor:
    """The triplet loss with batch-hard negatives over the 2N embeddings of two views (N, D), each
    l2-normalised (FaceNet's hypersphere): every embedding is an anchor, the other view of its image
    its positive (the only one, so also the hardest), the nearest of the remaining 2N - 2 its
    negative; the loss is max(d(a, p) - d(a, n) + margin, 0) with d the plain Euclidean distance
    (Hermans et al.: squared distances collapse more easily), or softplus(d(a, p) - d(a, n)) with
    `soft_margin`, averaged over the anchors. Under torchrun the negatives are mined from every
    rank's embeddings, as SimCLR's are, and each rank averages over its own anchors."""
    all1, rank = gather_with_grad(z1)
    all2, _ = gather_with_grad(z2)
    keys = F.normalize(torch.cat([all1, all2]), dim=1)
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)
    local = torch.arange(len(z1), device=z1.device) + rank * len(z1)
    own = torch.cat([local, local + len(all1)])
    positives = own.roll(len(z1))
    negatives = hardest_negatives(anchors, keys, own, positives)
    positive_distance = (anchors - keys[positives]).norm(dim=1)
    negative_distance = (anchors - keys[negatives]).norm(dim=1)
    gap = positive_distance - negative_distance
    return (F.softplus(gap) if soft_margin else F.relu(gap + margin)).mean()
