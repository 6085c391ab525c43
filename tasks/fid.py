"""FID and KID of image sets against one real set, with torchmetrics: in the frozen SSL encoder's
feature space (models/fid.FeatureExtractor, offline), and in Inception-v3's when torch-fidelity
and its weights are already on disk (never downloaded)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from tasks.device import autocast
from tasks.params import FidParams

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception-v3


def inception_weights(params: FidParams) -> Path | None:
    """The Inception-v3 weights file when FID in its space can run offline; else None, saying why."""
    if not params.inception:
        return None
    path = Path(params.inception_weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS)
    if importlib.util.find_spec("torch_fidelity") is None:
        warnings.warn("Inception-v3 FID skipped: torch-fidelity is not installed (pip install torch-fidelity)", stacklevel=2)
        return None
    if not path.is_file():
        warnings.warn(f"Inception-v3 FID skipped: no weights at {path}; this stage never downloads them. "
                      f"Put torch-fidelity's {INCEPTION_WEIGHTS} there, or set fid.inception_weights to its path.",
                      stacklevel=2)
        return None
    return path


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], torchmetrics' normalize=True convention."""
    return ((images + 1) / 2).clamp(0, 1)


class FidScorer:
    """Scores sets of float images in [-1, 1] against a real set whose features are computed once.

    `scorer(images)` -> {"fid": ..., "kid": ...[, "fid_inception": ...]}. KID's subset size is
    capped by the smaller of the two sets.
    """

    def __init__(
        self, extractor: nn.Module, real: torch.Tensor, *, kid_subset_size: int, kid_subsets: int,
        inception: Path | None = None, batch_size: int = 500, seed: int = 0,
    ):
        self.batch_size, self.seed = batch_size, seed
        self.kid_subset_size = kid_subset_size
        self.real_count = len(real)
        self.metrics: dict[str, FrechetInceptionDistance | KernelInceptionDistance] = {
            "fid": FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=False),
            "kid": KernelInceptionDistance(
                feature=extractor, subsets=kid_subsets, subset_size=kid_subset_size, normalize=True,
                reset_real_features=False,
            ),
        }
        if inception is not None:
            self.metrics["fid_inception"] = FrechetInceptionDistance(
                feature=2048, normalize=True, reset_real_features=False, feature_extractor_weights_path=str(inception)
            )
        for metric in self.metrics.values():
            metric.to(real.device)
            self._update(metric, real, real=True)

    def _update(self, metric, images: torch.Tensor, real: bool) -> None:
        """Features under bf16 autocast on CUDA; the metric's sums stay float64 (autocast leaves
        float64 alone)."""
        for chunk in images.split(self.batch_size):
            chunk = to_unit_range(chunk)
            if metric is self.metrics.get("fid_inception") and chunk.shape[1] == 1:
                chunk = chunk.expand(-1, 3, -1, -1)  # Inception takes RGB
            with autocast(chunk.device):
                metric.update(chunk, real=real)

    def __call__(self, images: torch.Tensor, only: tuple[str, ...] | None = None) -> dict[str, float]:
        """The scores of `images`; with `only`, just those metrics (e.g. ("fid",): no KID, no Inception pass)."""
        scores = {}
        for name, metric in self.metrics.items():
            if only is not None and name not in only:
                continue
            metric.reset()  # the fake features only
            self._update(metric, images, real=False)
            if name == "kid":
                metric.subset_size = min(self.kid_subset_size, self.real_count, len(images))
                torch.manual_seed(self.seed)  # KID's random subsets
                scores[name] = metric.compute()[0].item()
            else:
                scores[name] = metric.compute().item()
        return scores
