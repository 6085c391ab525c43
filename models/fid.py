"""FID and KID features from our own frozen encoder (offline, no torch-fidelity), and the Fréchet
distance computed directly, to cross-check torchmetrics.

    extractor = FeatureExtractor(encoder, image_shape=(1, 16, 16))
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    fid.update((images + 1) / 2, real=True)  # float images in [0, 1]

torchmetrics hands a custom feature module the images untouched (its `normalize` flag only
rescales for Inception), so the conversion to the encoder's [-1, 1] happens here.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureExtractor(nn.Module):
    """A frozen encoder as torchmetrics' `feature=`: images -> (N, num_features) features.

    Takes uint8 images in [0, 255] or float images in [0, 1] (torchmetrics' normalize=False and
    normalize=True conventions) and feeds the encoder floats in [-1, 1], as it was trained.
    `num_features` comes from one probe at `image_shape`, so torchmetrics never probes with
    3x299x299. Stays in eval mode and computes no gradients.
    """

    def __init__(self, encoder: nn.Module, image_shape: tuple[int, int, int]):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        device = next(encoder.parameters()).device
        with torch.no_grad():
            self.num_features = int(encoder(torch.zeros(2, *image_shape, device=device)).flatten(1).shape[1])

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # torchmetrics' .train() must not switch the encoder's batch norms

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255
        else:
            low, high = torch.stack(torch.aminmax(images)).tolist()  # one read back per batch
            if low < 0 or high > 1:
                raise ValueError(
                    f"float images must be in [0, 1], got [{low:.3f}, {high:.3f}]: "
                    "map [-1, 1] images with (x + 1) / 2 and clamp samples"
                )
        return self.encoder(images * 2 - 1).flatten(1).float()


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of (N, D) features, in float64 (as torchmetrics keeps them)."""
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½) between two Gaussians.

    tr (sigma1 sigma2)^½ = tr (sigma1^½ sigma2 sigma1^½)^½, a symmetric PSD matrix: two symmetric
    eigendecompositions, no complex parts to drop (unlike sqrtm of the non-symmetric product).
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, sigma1, mu2, sigma2))
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma1)
    sqrt_sigma1 = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    trace_sqrt_product = torch.linalg.eigvalsh(sqrt_sigma1 @ sigma2 @ sqrt_sigma1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product)
