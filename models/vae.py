"""Convolutional VAE from images in [-1, 1] to a latent grid, a PatchGAN discriminator, and the
module the training loop trains them with.

The loop's contract: one optimizer over all parameters, forward then one loss.backward(). So
the discriminator's hinge loss sees detached reconstructions, and the generator's adversarial
term runs through the discriminator with detached parameters: one backward gives each side only
its own gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from models.unet import group_norm


@dataclass
class VAEConfig:
    image_channels: int = 1
    latent_channels: int = 4
    downsample: int = 4  # 1, 2, 4 or 8: image size / latent grid size (one stride-2 stage per factor 2)
    width: int = 32  # channels at full resolution, doubling per stage up to 4x
    norm_groups: int = 8

    def __post_init__(self):
        if self.downsample not in (1, 2, 4, 8):
            raise ValueError(f"downsample must be 1, 2, 4 or 8, got {self.downsample}")

    @property
    def stage_widths(self) -> list[int]:
        """Channels at full resolution and after each stride-2 stage."""
        stages = self.downsample.bit_length() - 1
        return [self.width * min(2**stage, 4) for stage in range(stages + 1)]


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VAE(nn.Module):
    """Images (N, C, H, W) -> latents (N, latent_channels, H / downsample, W / downsample) and back."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        widths, groups = config.stage_widths, config.norm_groups

        encoder = [nn.Conv2d(config.image_channels, widths[0], 3, padding=1)]
        for width, next_width in pairwise(widths):
            encoder += [ResBlock(width, groups), nn.Conv2d(width, next_width, 3, stride=2, padding=1)]
        encoder += [
            ResBlock(widths[-1], groups), group_norm(widths[-1], groups), nn.SiLU(),
            nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1),  # mean and log-variance
        ]
        self.encoder = nn.Sequential(*encoder)

        decoder = [nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1), ResBlock(widths[-1], groups)]
        for width, previous_width in pairwise(reversed(widths)):
            decoder += [
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, previous_width, 3, padding=1),
                ResBlock(previous_width, groups),
            ]
        decoder += [
            group_norm(widths[0], groups), nn.SiLU(), nn.Conv2d(widths[0], config.image_channels, 3, padding=1)
        ]
        self.decoder = nn.Sequential(*decoder)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance, each (N, latent_channels, h, w)."""
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # exp() stays finite early in training

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A reparameterised draw from the posterior, differentiable in mean and logvar."""
        return mean + (0.5 * logvar).exp() * torch.randn_like(mean)

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, exp(logvar)) || N(0, I)) per sample (N,), in nats, summed over the latent."""
        return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)


class PatchDiscriminator(nn.Module):
    """A real/fake logit per overlapping patch (Isola et al. 2017). Each of the `layers` stride-2
    stages halves the grid: 2 suits 16x16 images (a 4x4 grid of logits), 3 suits 32x32 and up.
    GroupNorm, not BatchNorm: it runs three times a step (real, detached fake, fake through
    detached parameters), and batch statistics would differ between the calls."""

    def __init__(self, image_channels: int = 1, width: int = 32, layers: int = 2, norm_groups: int = 8):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(image_channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for stage in range(layers):
            next_channels = width * min(2 ** (stage + 1), 8)
            blocks += [
                nn.Conv2d(channels, next_channels, 4, stride=2, padding=1),
                group_norm(next_channels, norm_groups), nn.LeakyReLU(0.2),
            ]
            channels = next_channels
        blocks.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.layers = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def feature_distance(features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between unit-normalised feature vectors, in [0, 4]: blind to the
    encoder's feature scale."""
    features = F.normalize(features.flatten(1), dim=1)
    target_features = F.normalize(target_features.flatten(1), dim=1)
    return (features - target_features).square().sum(1).mean()


class VAETraining(nn.Module):
    """forward(images in [-1, 1]) -> {"loss", "recon", "kl"[, "perceptual"][, "adv", "disc"]}.

    loss = recon + beta * kl / (elements per image)
         [+ perceptual_weight * feature distance under the frozen `feature_fn`]
         [+ adv_weight * generator hinge + discriminator hinge, once adv_warmup_steps are done]

    recon is the per-element L1 or L2 error and kl the per-image KL in nats (its mean over the
    batch), so beta weighs the KL per image element whatever the image size.
    """

    def __init__(
        self,
        vae: VAE,
        *,
        beta: float = 1e-4,
        reconstruction: str = "l1",
        discriminator: PatchDiscriminator | None = None,
        adv_weight: float = 0.1,
        adv_warmup_steps: int = 0,
        feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        perceptual_weight: float = 1.0,
    ):
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
        self.vae = vae
        self.beta = beta
        self.reconstruction = reconstruction
        self.discriminator = discriminator
        self.adv_weight = adv_weight
        self.adv_warmup_steps = adv_warmup_steps
        if isinstance(feature_fn, nn.Module):
            feature_fn.requires_grad_(False).eval()
        self.feature_fn = feature_fn
        self.perceptual_weight = perceptual_weight
        # the discriminator sits out the warm-up, so DDP must expect unused parameters
        self.ddp_find_unused_parameters = discriminator is not None
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # saved with checkpoints
        # the host's copy of steps_done, so forward never reads a device tensor to branch on it
        self.adversarial_active = adv_warmup_steps <= 0
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_adversarial_active())

    def _sync_adversarial_active(self) -> None:
        """After a checkpoint is loaded: the one read of steps_done back to the host."""
        self.adversarial_active = int(self.steps_done) >= self.adv_warmup_steps

    def train(self, mode: bool = True) -> VAETraining:
        super().train(mode)
        if isinstance(self.feature_fn, nn.Module):
            self.feature_fn.eval()  # frozen: its batch-norm statistics must not move
        return self

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(step + 1)
        self.adversarial_active = step + 1 >= self.adv_warmup_steps

    def compile(self, **kwargs) -> None:
        """torch.compile the networks; the losses' Python around them stays eager."""
        for network in (self.vae.encoder, self.vae.decoder, self.discriminator, self.feature_fn):
            if isinstance(network, nn.Module):
                network.compile(**kwargs)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        mean, logvar = self.vae.encode(images)
        reconstructions = self.vae.decode(self.vae.sample(mean, logvar))
        error = reconstructions - images
        recon = error.abs().mean() if self.reconstruction == "l1" else error.square().mean()
        kl = self.vae.kl(mean, logvar).mean()
        loss = recon + self.beta * kl / images[0].numel()
        outputs = {"recon": recon, "kl": kl}
        if self.feature_fn is not None:
            with torch.no_grad():
                target_features = self.feature_fn(images)
            perceptual = feature_distance(self.feature_fn(reconstructions), target_features)
            loss = loss + self.perceptual_weight * perceptual
            outputs["perceptual"] = perceptual
        if self.discriminator is not None:
            if self.adversarial_active:
                adv, disc = self.adversarial_losses(images, reconstructions)
            else:
                adv = disc = images.new_zeros(())
            loss = loss + self.adv_weight * adv + disc
            outputs.update(adv=adv, disc=disc)
        outputs["loss"] = loss
        return outputs

    def adversarial_losses(self, images: torch.Tensor, reconstructions: torch.Tensor):
        """(generator hinge, discriminator hinge); the first reaches only the VAE, the second only
        the discriminator."""
        disc = (
            F.relu(1 - self.discriminator(images)).mean()
            + F.relu(1 + self.discriminator(reconstructions.detach())).mean()
        )
        frozen = {name: param.detach() for name, param in self.discriminator.named_parameters()}
        adv = -functional_call(self.discriminator, frozen, (reconstructions,)).mean()
        return adv, disc
