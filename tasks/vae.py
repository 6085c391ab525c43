"""The VAE stage's pieces: the training module built from params (its regulariser included),
export and rebuild from safetensors + JSON, the training set's latents with their per-channel
scale, PSNR and SSIM, codebook use, and the latents' mismatch to the prior. Encoding and decoding
take the images' labels, which a conditional VAE needs and an unconditional one ignores."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.vae import (
    VAE,
    KLRegulariser,
    MMDRegulariser,
    PatchDiscriminator,
    VAEConfig,
    VAETraining,
    VectorQuantisation,
    code_frequencies,
    perplexity,
    prior_mismatch,
)
from tasks.artifacts import load_network, read_json, save_network, unreadable
from tasks.data import ImageSplit, read_labels, read_values
from tasks.device import autocast
from tasks.errors import StageError
from tasks.params import VaeParams

NAME = "vae"  # vae.safetensors + vae.json
LATENTS = "train_latents.npy"
LABELS = "train_labels.npy"
LATENTS_INFO = "latents.json"


def build_vae_training(
    params: VaeParams, image_shape: list[int], num_classes: int, steps: int, feature_fn: nn.Module | None
) -> VAETraining:
    """The VAE (and discriminator) under the losses the params switch on, for images of `image_shape`
    in `num_classes` classes (which a conditional VAE sees); `steps` places the adversarial warm-up."""
    channels, height, width = image_shape
    if height % params.downsample or width % params.downsample:
        raise StageError(f"params/vae.yaml: downsample {params.downsample} does not divide the {height}x{width} images")
    codebook_size = params.vq.codebook_size if params.regulariser == "vq" else 0
    config = VAEConfig(channels, params.latent_channels, params.downsample, params.width, codebook_size=codebook_size,
                       num_classes=num_classes if params.conditional else 0)
    vae = VAE(config)
    adversarial = params.adversarial
    return VAETraining(
        vae,
        regulariser=build_regulariser(params, vae),
        reconstruction=params.reconstruction,
        discriminator=PatchDiscriminator(channels, adversarial.width, adversarial.layers) if adversarial.enabled else None,
        adv_weight=adversarial.weight,
        adv_warmup_steps=round(adversarial.warmup_fraction * steps),
        feature_fn=feature_fn if params.perceptual_weight > 0 else None,
        perceptual_weight=params.perceptual_weight,
    )


def build_regulariser(params: VaeParams, vae: VAE) -> nn.Module:
    if params.regulariser == "mmd":
        return MMDRegulariser(params.mmd.weight, params.mmd.kl_weight)
    if params.regulariser == "vq":
        vq = params.vq
        return VectorQuantisation(vae.quantizer, vq.commitment, vq.decay, vq.restart_after_steps)
    return KLRegulariser(params.beta)


def export_vae(vae: VAE, folder: Path) -> None:
    save_network(vae, dataclasses.asdict(vae.config), folder, NAME)


def decoder_files(folder: Path | str) -> list[Path]:
    """The files `load_decoder` reads: the VAE and its latents' scale."""
    folder = Path(folder)
    return [folder / f"{NAME}.safetensors", folder / f"{NAME}.json", folder / LATENTS_INFO]


def load_vae(folder: Path | str, device: torch.device | str = "cpu") -> VAE:
    """Rebuild the frozen VAE (eval mode, no grads) from vae.json + vae.safetensors."""
    return load_network(folder, NAME, lambda config: VAE(VAEConfig(**config)), device)[0]


def chunks(rows: torch.Tensor, labels: torch.Tensor | None, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(rows, their labels or None) in batches of `batch_size`."""
    starts = range(0, len(rows), batch_size)
    return [(rows[i : i + batch_size], None if labels is None else labels[i : i + batch_size]) for i in starts]


@torch.no_grad()
def encode_means(vae: VAE, images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 512) -> torch.Tensor:
    """Posterior means of float images in [-1, 1] of `labels`, batched (bf16 autocast on CUDA), in float32."""
    with autocast(images.device):
        return torch.cat([vae.encode(chunk, chunk_labels)[0].float() for chunk, chunk_labels in chunks(images, labels, batch_size)])


@torch.no_grad()
def decode(vae: VAE, latents: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 512) -> torch.Tensor:
    """Images in [-1, 1] of `labels` from (unscaled) latents, batched (bf16 autocast on CUDA), in float32."""
    with autocast(latents.device):
        return torch.cat([vae.decode(chunk, chunk_labels).float().clamp(-1, 1) for chunk, chunk_labels in chunks(latents, labels, batch_size)])


def timed_prior_images(vae: VAE, latents: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, float]:
    """A conditional VAE as a generator: prior draws `latents` decoded as `labels` (one decoder call),
    and the images/s of decoding them."""
    started = time.perf_counter()
    images = decode(vae, latents, labels, batch_size)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)  # count the kernels still queued
    return images, len(labels) / max(time.perf_counter() - started, 1e-9)


@dataclass
class LatentScale:
    """Per-channel shift and scale: (latents - shift) * scale has zero mean and unit variance."""

    shift: torch.Tensor  # (C,)
    scale: torch.Tensor  # (C,)

    @classmethod
    def fit(cls, latents: torch.Tensor) -> LatentScale:
        return cls(latents.mean((0, 2, 3)), 1 / latents.std((0, 2, 3)).clamp(min=1e-6))

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.shift[:, None, None]) * self.scale[:, None, None]

    def denormalize(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled / self.scale[:, None, None] + self.shift[:, None, None]


@dataclass
class Latents:
    """The training split's posterior means (N, C, h, w), its labels, and their LatentScale."""

    latents: torch.Tensor
    labels: torch.Tensor
    latent_scale: LatentScale
    num_classes: int

    def scaled(self) -> torch.Tensor:
        """What the diffusion stage trains on: zero mean, unit variance per channel."""
        return self.latent_scale.normalize(self.latents)

    def save(self, folder: Path) -> None:
        np.save(folder / LATENTS, self.latents.cpu().numpy())
        np.save(folder / LABELS, self.labels.cpu().numpy())
        info = {
            "shift": self.latent_scale.shift.tolist(), "scale": self.latent_scale.scale.tolist(),
            "num_classes": self.num_classes, "latent_shape": list(self.latents.shape[1:]),
        }
        (folder / LATENTS_INFO).write_text(json.dumps(info, indent=2) + "\n")


def load_latent_info(folder: Path | str, device: torch.device | str = "cpu") -> tuple[LatentScale, dict]:
    """The LatentScale and latents.json (num_classes, latent_shape)."""
    path = Path(folder) / LATENTS_INFO
    info = read_json(path, keys=("shift", "scale", "num_classes", "latent_shape"))
    shape, classes = info["latent_shape"], info["num_classes"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise unreadable(path, f"latent_shape must be [channels, height, width], found {shape!r}")
    if not (isinstance(classes, int) and classes > 0):
        raise unreadable(path, f"num_classes must be a positive integer, found {classes!r}")
    if not all(isinstance(info[key], list) and len(info[key]) == shape[0] for key in ("shift", "scale")):
        raise unreadable(path, "shift and scale must hold one number per channel of latent_shape")
    scale = LatentScale(*(torch.tensor(info[key], device=device) for key in ("shift", "scale")))
    return scale, info


def check_fits_scale(path: Path, latents: torch.Tensor, recorded: LatentScale) -> None:
    """The latents' per-channel mean and std are the shift and 1 / scale the vae stage fitted to them:
    latents in another layout (channels last, even with as many channels as rows and columns) are not."""
    fitted, std = LatentScale.fit(latents), 1 / recorded.scale.cpu()
    tolerance = 1e-3 * std + 1e-5
    if not (((fitted.shift - recorded.shift.cpu()).abs() <= tolerance).all() and ((1 / fitted.scale - std).abs() <= tolerance).all()):
        raise unreadable(path, f"its per-channel mean and std are not the shift and scale in {LATENTS_INFO}: "
                               "latents in another layout (channels last?) or from another run")


@dataclass
class LatentDecoder:
    """Images in [-1, 1] of `labels` from the diffusion stage's scaled latents."""

    vae: VAE
    latent_scale: LatentScale

    def __call__(self, scaled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, self.latent_scale.denormalize(scaled), labels)


def load_decoder(folder: Path | str, device: torch.device | str = "cpu") -> LatentDecoder:
    return LatentDecoder(load_vae(folder, device), load_latent_info(folder, device)[0])


def load_latents(folder: Path | str, device: torch.device | str = "cpu") -> Latents:
    """The training split's latents (channels first, finite, fitting their scale) and labels (within
    num_classes), as latents.json describes them."""
    folder = Path(folder)
    scale, info = load_latent_info(folder, device)
    latents = torch.from_numpy(read_values(folder / LATENTS, (None, *info["latent_shape"]), f"{LATENTS_INFO}'s latent_shape (C, h, w)"))
    labels = read_labels(folder / LABELS, info["num_classes"], LATENTS_INFO)
    if len(labels) != len(latents):
        raise unreadable(folder / LATENTS, f"{tuple(latents.shape)} latents do not match {len(labels)} labels")
    check_fits_scale(folder / LATENTS, latents, scale)
    return Latents(latents.to(device), torch.from_numpy(labels).to(device), scale, info["num_classes"])


def image_quality(reconstructions: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of images in [-1, 1] against their targets (torchmetrics)."""
    from torchmetrics.image import (  # 2-3 s: only here
        PeakSignalNoiseRatio,
        StructuralSimilarityIndexMeasure,
    )

    psnr = PeakSignalNoiseRatio(data_range=2.0).to(images.device)
    ssim = StructuralSimilarityIndexMeasure(data_range=2.0).to(images.device)
    return {"psnr": psnr(reconstructions, images).item(), "ssim": ssim(reconstructions, images).item()}


def reconstruction_report(vae: VAE, test: ImageSplit, mean_image: torch.Tensor) -> dict[str, float]:
    """PSNR/SSIM of the test split's reconstructions, beside the mean training image as a baseline;
    with a codebook, the share of codes the test split uses and their perplexity."""
    images = test.floats()
    means = encode_means(vae, images, test.labels)
    report = image_quality(decode(vae, means, test.labels), images)
    baseline = image_quality(mean_image.expand_as(images), images)
    report.update({f"{name}_mean_image": value for name, value in baseline.items()})
    if vae.quantizer is not None:
        frequencies = code_frequencies(vae.quantizer.codes(means), len(vae.quantizer.codebook))
        report.update(codebook_usage=(frequencies > 0).float().mean().item(), perplexity=perplexity(frequencies).item())
    return report


def mismatch_report(vae: VAE, test: ImageSplit, latent_scale: LatentScale, samples: int, seed: int) -> dict[str, float]:
    """The aggregate-posterior mismatch: up to `samples` test latents, scaled as the diffusion stage
    sees them, against N(0, I) (MMD under the InfoVAE kernel, mean norm, mean |cov - I|)."""
    scaled = latent_scale.normalize(encode_means(vae, test.floats(slice(0, samples)), test.labels[:samples]))
    return prior_mismatch(scaled, torch.Generator().manual_seed(seed))
