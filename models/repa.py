"""REPA (Yu et al. 2024, "Representation Alignment for Generation: Training Diffusion Transformers
Is Easier Than You Think"): the denoiser's hidden features at an early block, through a trainable
MLP projector, are pulled towards a frozen self-supervised encoder's representation of the *clean*
image by negative cosine similarity, a term added to the diffusion loss with weight lambda. The
projector only shapes training: it is dropped afterwards, and sampling never runs it.

One departure from the paper, which aligns each patch token to DINOv2's feature of that patch: the
latent grid here is tiny (4x4: a DiT with patch 2 has 4 tokens, the U-Net's bottom level is 2x2)
and the SSL encoder's per-image embedding is already computed (artifacts/encoder), so the hidden
features are mean-pooled over the grid and aligned to that one embedding per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def negative_cosine(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-cos(projected, target) per row (N,): -1 when they point the same way."""
    return -(F.normalize(projected.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)


class RepaAlignment(nn.Module):
    """The projector h_phi (the paper's 3-layer MLP with SiLU) from the denoiser's pooled hidden
    features at block `depth` to the encoder's embedding; `alignment(hidden, target)` is the
    per-sample term, weighted by `weight` in the training loss. The target is the frozen encoder's:
    no gradient goes back to it (the authors compute it under `torch.no_grad`)."""

    def __init__(self, hidden_dim: int, embedding_dim: int, projector_dim: int, depth: int, weight: float):
        super().__init__()
        self.depth = depth
        self.weight = weight
        self.projector = nn.Sequential(
            nn.Linear(hidden_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, embedding_dim),
        )

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return negative_cosine(self.projector(hidden), target.detach())


class HiddenTap(nn.Module):
    """`net` as an objective calls it, `tap(x, t, labels)`, keeping the pooled hidden features at
    block `depth` that its last call computed (`hidden`). Made per step, so that its reference to
    the net is never a second copy in the training module's state."""

    def __init__(self, net: nn.Module, depth: int):
        super().__init__()
        self.net = net
        self.depth = depth
        self.null_label = net.null_label
        self.hidden: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        output, self.hidden = self.net(x, t, labels, hidden_depth=self.depth)
        return output
