"""Self-supervised objectives, each a small module over a shared base.

Contract with the training loop: `forward(images)` takes a batch in [-1, 1] (N, C, H, W), makes its
own augmented views and returns {"loss": scalar, ...other scalars to log}; `after_step(step,
total_steps)` (momentum objectives) runs after each optimiser step. `self.backbone` is the online
backbone that the encoder stage exports; target networks never get gradients.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.augment import TwoViews
from models.ssl_losses import (
    batch_hard_triplet,
    byol_loss,
    cpc_infonce,
    dino_loss,
    infonce_with_queue,
    nt_xent,
)

# -- shared pieces -----------------------------------------------------------------------


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR/MoCo v2/BYOL projector (and BYOL's predictor): linear, batch norm, ReLU, linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's target momentum: `base` at step 0, rising along a half cosine to 1 at `total_steps`."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Per-dimension std of the l2-normalised features, averaged: 0 when they collapse to one point."""
    return F.normalize(features.detach().float(), dim=1).std(dim=0).mean()


def _gather_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows under torchrun (no gradient), so buffers built from them agree across ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class SSLObjective(nn.Module):
    """The online backbone and its head, trained on two augmented views of each image. Their batch
    norms see the global batch under DDP on GPUs (`sync_batch_norm`, read by the Trainer)."""

    sync_batch_norm = True

    colour_augmented = True  # False: the method's paper crops and flips only (its target is the pixels or colours)

    def __init__(self, backbone: nn.Module, augment: TwoViews, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.augment = augment
        self.head = head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        view1, view2 = self.augment(images)
        return self.views_loss(torch.cat([view1, view2]))

    def views_loss(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of a batch holding both views, view 1 of every image first: one backbone pass
        for both keeps the GPU busy."""
        raise NotImplementedError

    def compile(self, **kwargs) -> None:
        """torch.compile the networks (backbone, heads, target); the augmentation, with its
        per-call random parameters, and the losses stay eager."""
        for name, child in self.named_children():
            if name != "augment":
                child.compile(**kwargs)


class MomentumObjective(SSLObjective):
    """Adds a target copy of backbone + head whose weights follow the online ones as an EMA.
    Only weights are averaged: the target's batch-norm statistics come from its own forward passes."""

    def __init__(self, backbone: nn.Module, augment: TwoViews, head: nn.Module, momentum_base: float):
        super().__init__(backbone, augment, head)
        self.momentum_base = momentum_base
        self.target = copy.deepcopy(nn.Sequential(backbone, head)).requires_grad_(False)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        momentum = cosine_momentum(step, total_steps, self.momentum_base)
        online = [*self.backbone.parameters(), *self.head.parameters()]
        torch._foreach_lerp_(list(self.target.parameters()), online, 1 - momentum)


# -- the objectives ----------------------------------------------------------------------


class ProjectedViews(SSLObjective):
    """A projection MLP over the backbone's features of two views, and a loss on the two
    projections (`pair_loss`): SimCLR's and the triplet loss's shape."""

    def __init__(self, backbone: nn.Module, augment: TwoViews, proj_hidden_dim: int, proj_dim: int):
        super().__init__(backbone, augment, projection_mlp(backbone.out_dim, proj_hidden_dim, proj_dim))

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def views_loss(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(views)
        z1, z2 = self.head(features).chunk(2)
        return {"loss": self.pair_loss(z1, z2), "feature_std": feature_std(features)}


class SimCLR(ProjectedViews):
    """Chen et al., 2020: InfoNCE between the projections of two views, the batch as negatives."""

    def __init__(
        self,
        backbone: nn.Module,
        augment: TwoViews,
        proj_hidden_dim: int,
        proj_dim: int,
        temperature: float,
    ):
        super().__init__(backbone, augment, proj_hidden_dim, proj_dim)
        self.temperature = temperature

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature)


class Triplet(ProjectedViews):
    """Schroff et al., 2015 (FaceNet) with Hermans et al., 2017's batch-hard mining: the projections
    of two views, l2-normalised, the other view as the positive, the nearest other image's view in
    the batch as the negative, pushed apart by a margin in Euclidean distance."""

    def __init__(
        self,
        backbone: nn.Module,
        augment: TwoViews,
        proj_hidden_dim: int,
        proj_dim: int,
        margin: float,
        soft_margin: bool,
    ):
        super().__init__(backbone, augment, proj_hidden_dim, proj_dim)
        self.margin = margin
        self.soft_margin = soft_margin

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return batch_hard_triplet(z1, z2, self.margin, self.soft_margin)


class KeyQueue(nn.Module):
    """MoCo's negatives: a first-in-first-out ring of the last `size` l2-normalised keys. Held in
    buffers so a checkpoint resumes with the same queue."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # the oldest slot

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest slots with `keys` (N, dim), wrapping around the end of the ring."""
        size = len(self.keys)
        keys = keys[-size:]
        slots = (self.pointer + torch.arange(len(keys), device=keys.device)) % size
        self.keys[slots] = F.normalize(keys.to(self.keys.dtype), dim=1)
        self.pointer.copy_((self.pointer + len(keys)) % size)


class MoCoV2(MomentumObjective):
    """He et al., 2020 / Chen et al., 2020: queries from the online network, keys from its momentum
    copy, negatives from a queue of past keys. Symmetric: each view is a query for the other."""

    def __init__(
        self,
        backbone: nn.Module,
        augment: TwoViews,
        proj_hidden_dim: int,
        proj_dim: int,
        temperature: float,
        queue_size: int,
        momentum_base: float,
    ):
        super().__init__(backbone, augment, projection_mlp(backbone.out_dim, proj_hidden_dim, proj_dim), momentum_base)
        self.temperature = temperature
        self.queue = KeyQueue(queue_size, proj_dim)

    def views_loss(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(views)
        q1, q2 = self.head(features).chunk(2)
        with torch.no_grad():
            k1, k2 = self.target(views).chunk(2)
        negatives = self.queue.keys.clone()  # push() below edits the buffer that backward still needs
        loss = (
            infonce_with_queue(q1, k2, negatives, self.temperature)
            + infonce_with_queue(q2, k1, negatives, self.temperature)
        ) / 2
        if self.training:
            self.queue.push(_gather_across_ranks(torch.cat([k1, k2])))
        return {"loss": loss, "feature_std": feature_std(features)}


class BYOL(MomentumObjective):
    """Grill et al., 2020: the online projection, through a predictor, regresses the target
    network's projection of the other view; no negatives."""

    def __init__(
        self,
        backbone: nn.Module,
        augment: TwoViews,
        proj_hidden_dim: int,
        proj_dim: int,
        pred_hidden_dim: int,
        momentum_base: float,
    ):
        super().__init__(backbone, augment, projection_mlp(backbone.out_dim, proj_hidden_dim, proj_dim), momentum_base)
        self.predictor = projection_mlp(proj_dim, pred_hidden_dim, proj_dim)

    def views_loss(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(views)
        p1, p2 = self.predictor(self.head(features)).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target(views).chunk(2)
        loss = (byol_loss(p1, t2) + byol_loss(p2, t1)) / 2
        return {"loss": loss, "feature_std": feature_std(features)}


class DINOHead(nn.Module):
    """MLP to a bottleneck, l2-normalised, then scored against `out_dim` unit-norm prototypes
    (DINO's weight-normalised last layer with its norm fixed to 1)."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int, batch_norm: bool):
        super().__init__()
        norm = nn.BatchNorm1d if batch_norm else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), norm(hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), norm(hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck_dim) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(features), dim=-1), F.normalize(self.prototypes, dim=-1))


class DINO(MomentumObjective):
    """Caron et al., 2021: the student matches the momentum teacher's centred, sharpened
    distribution over prototypes for the other view. Two global views, no multi-crop."""

    def __init__(
        self,
        backbone: nn.Module,
        augment: TwoViews,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        head_batch_norm: bool,
        student_temperature: float,
        teacher_temperature: float,
        warmup_teacher_temperature: float,
        teacher_warmup_fraction: float,
        center_momentum: float,
        momentum_base: float,
    ):
        # without batch norm a fresh ResNet maps every image to nearly the same direction, so the
        # teacher is one-hot on the same prototype for all of them and centring makes it uniform
        head = DINOHead(backbone.out_dim, hidden_dim, bottleneck_dim, out_dim, head_batch_norm)
        super().__init__(backbone, augment, head, momentum_base)
        self.student_temperature = student_temperature
        self.final_teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.teacher_warmup_fraction = teacher_warmup_fraction  # share of all steps
        # buffers, so a resumed run continues the schedule and the centre where they were
        start = warmup_teacher_temperature if teacher_warmup_fraction > 0 else teacher_temperature
        self.register_buffer("teacher_temperature", torch.tensor(start))
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.center_momentum = center_momentum

    def views_loss(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(views)
        student = self.head(features).chunk(2)
        with torch.no_grad():
            teacher = self.target(views)
        loss = dino_loss(student, teacher.chunk(2), self.center, self.student_temperature, self.teacher_temperature)
        if self.training:
            self._update_center(teacher)
        return {
            "loss": loss,
            "feature_std": feature_std(features),
            "teacher_temperature": self.teacher_temperature.clone(),  # a copy: after_step edits the buffer
        }

    @torch.no_grad()
    def _update_center(self, teacher_logits: torch.Tensor) -> None:
        rank_means = _gather_across_ranks(teacher_logits.float().mean(dim=0, keepdim=True))
        batch_center = rank_means.mean(dim=0, keepdim=True)
        self.center.lerp_(batch_center, 1 - self.center_momentum)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)
        warmup_steps = self.teacher_warmup_fraction * total_steps
        progress = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        start, end = self.warmup_teacher_temperature, self.final_teacher_temperature
        self.teacher_temperature.fill_(start + progress * (end - start))


def rotate_four_ways(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image rotated by 0, 90, 180 and 270 degrees counter-clockwise (4N, C, H, W), with the
    number of quarter turns (4N,) as its label."""
    rotated = torch.cat([torch.rot90(images, quarter_turns, dims=(2, 3)) for quarter_turns in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(len(images))
    return rotated, labels


class Rotation(SSLObjective):
    """Gidaris et al., 2018: predict which of four rotations was applied to an augmented view.
    One view per image is enough here, so it replaces the base's two-view forward."""

    def __init__(self, backbone: nn.Module, augment: TwoViews):
        super().__init__(backbone, augment, nn.Linear(backbone.out_dim, 4))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        rotated, labels = rotate_four_ways(self.augment.view(images))
        features = self.backbone(rotated)
        logits = self.head(features)
        return {
            "loss": F.cross_entropy(logits, labels),
            "accuracy": (logits.argmax(dim=1) == labels).float().mean(),
            "feature_std": feature_std(features),
        }


def overlapping_patches(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, C, S, S) -> (N, grid * grid, C, p, p): a grid of square patches overlapping by half
    (CPC's 7x7 grid of 64-pixel patches, 32 apart), row by row, from the central square the grid
    spans (the rounding of patch and stride may leave a border)."""
    side = images.shape[-1]
    patch = 2 * side // (grid + 1)
    stride = (side - patch) // (grid - 1)
    span, start = patch + stride * (grid - 1), (side - patch - stride * (grid - 1)) // 2
    images = images[..., start : start + span, start : start + span]
    columns = F.unfold(images, patch, stride=stride)  # (N, C * p * p, grid * grid)
    return columns.transpose(1, 2).reshape(len(images), grid * grid, images.shape[1], patch, patch)


class RowCausalBlock(nn.Module):
    """A residual convolution whose output at row r sees only rows <= r (PixelCNN's masking, by
    padding above): the context network's autoregression runs down the rows."""

    def __init__(self, dim: int, rows_seen: int = 2):
        super().__init__()
        self.rows_seen = rows_seen
        self.conv = nn.Conv2d(dim, dim, (rows_seen, 3), padding=(0, 1))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid + self.conv(F.relu(F.pad(grid, (0, 0, self.rows_seen - 1, 0))))


class CPC(SSLObjective):
    """Hénaff et al., 2020 (CPC v2): the backbone embeds each patch of an overlapping grid on its own;
    a context network, causal down the rows, summarises the rows above; from it a linear map per
    offset k predicts the embeddings k rows below, scored by InfoNCE against every patch of the
    batch. Patches are resized to the backbone's input size, so the exported backbone takes whole images.
    A ResNet backbone's batch norm still mixes the patches' statistics (CPC v2 used layer norm)."""

    def __init__(
        self,
        backbone: nn.Module,
        augment: TwoViews,
        grid: int,
        context_dim: int,
        context_layers: int,
        prediction_steps: int,
    ):
        if 2 * backbone.config["image_size"] // (grid + 1) < 2:
            raise ValueError(f"cpc.grid {grid} leaves patches under 2 pixels on {backbone.config['image_size']}-pixel images")
        context = nn.Sequential(nn.Conv2d(backbone.out_dim, context_dim, 1), *(RowCausalBlock(context_dim) for _ in range(context_layers)))
        super().__init__(backbone, augment, context)
        self.predictors = nn.ModuleList(nn.Conv2d(context_dim, backbone.out_dim, 1) for _ in range(prediction_steps))
        self.grid = grid
        self.image_size = backbone.config["image_size"]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        patches = overlapping_patches(self.augment.view(images), self.grid)
        flat = F.interpolate(patches.flatten(0, 1), size=self.image_size, mode="bilinear", align_corners=False)
        embeddings = self.backbone(flat)  # (N * grid * grid, D), row by row per image
        grid, batch = self.grid, len(images)
        embedding_grid = embeddings.view(batch, grid, grid, -1).permute(0, 3, 1, 2)
        context = self.head(embedding_grid)
        slots = torch.arange(batch * grid * grid, device=images.device).view(batch, grid, grid)
        losses = []
        for step, predictor in enumerate(self.predictors, start=1):
            predicted = predictor(context[:, :, : grid - step])  # rows that have a row `step` below
            positives = slots[:, step:].flatten()
            losses.append(cpc_infonce(predicted.permute(0, 2, 3, 1).flatten(0, 2), embeddings, positives))
        return {"loss": torch.stack(losses).mean(), "feature_std": feature_std(embeddings)}
