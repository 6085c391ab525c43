"""Batched SimCLR-style augmentation on the batch's own device (kornia): two random views per image.

Every sample draws its own crop, flip, jitter and blur. kornia draws from torch's global RNG,
so `torch.manual_seed(s)` before a call fixes both views.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


class TwoViews(nn.Module):
    """images in [-1, 1] (N, C, H, W) -> two independently augmented views, same shape and range.

    Colour jitter and random grayscale only apply to 3-channel images.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        crop_scale: tuple[float, float],
        flip: bool,
        jitter_strength: float,
        jitter_prob: float,
        grayscale_prob: float,
        blur_prob: float,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ):
        super().__init__()
        # "resample" crops all samples with one batched warp; "slice" loops over them in Python
        steps: list[nn.Module] = [K.RandomResizedCrop((image_size, image_size), scale=crop_scale, cropping_mode="resample")]
        if flip:
            steps.append(K.RandomHorizontalFlip())
        if channels == 3 and jitter_prob > 0:
            strength = jitter_strength  # SimCLR's s: brightness, contrast, saturation 0.8 s, hue 0.2 s
            steps.append(K.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength, p=jitter_prob))
        if channels == 3 and grayscale_prob > 0:
            steps.append(K.RandomGrayscale(p=grayscale_prob))
        if blur_prob > 0:
            # SimCLR's kernel: 10% of the image side, odd, at least 3
            kernel = max(3, (image_size // 10) | 1)
            steps.append(K.RandomGaussianBlur(kernel, blur_sigma, p=blur_prob))
        self.pipeline = nn.Sequential(*steps)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """One random view of each image."""
        unit = (images + 1) / 2  # kornia's colour ops expect [0, 1]
        return self.pipeline(unit) * 2 - 1

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(images), self.view(images)
