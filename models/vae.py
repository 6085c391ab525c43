"""Convolutional VAE from images in [-1, 1] to a latent grid, a PatchGAN discriminator, the
bottleneck regularisers (beta-KL, InfoVAE's MMD, VQ-VAE's codebook) and the module the training
loop trains them with. The VAE never knows which regulariser trains it; a vector-quantised one
only carries its codebook, which `decode` snaps latents to. A conditional VAE (Sohn et al. 2015)
also gives its encoder and decoder the image's class.

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
    """The fields but norm_groups are set by tasks/params.py's VaeParams and by the data."""

    image_channels: int
    latent_channels: int
    downsample: int  # 1, 2, 4 or 8: image size / latent grid size (one stride-2 stage per factor 2)
    width: int  # channels at full resolution, doubling per stage up to 4x
    codebook_size: int  # VQ-VAE: codes `decode` snaps latents to; 0 for a continuous latent
    num_classes: int = 0  # a conditional VAE: the classes its encoder and decoder see; 0 for an unconditional one
    norm_groups: int = 8

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


class VectorQuantizer(nn.Module):
    """A codebook of `size` vectors of `dim` channels (van den Oord et al. 2017). Called on latents
    (N, dim, h, w), it snaps each position's vector to its nearest code with a straight-through
    gradient: the value is the code, the gradient reaches the latent unchanged. The codebook is a
    buffer: `VectorQuantisation` moves it by EMA, not the optimiser."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("codebook", torch.randn(size, dim))

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """The index of the nearest code (squared Euclidean) of each row of `vectors` (M, dim)."""
        vectors = vectors.float()
        with torch.autocast(vectors.device.type, enabled=False):  # bf16 would blur close codes
            distances = vectors.square().sum(1, keepdim=True) - 2 * vectors @ self.codebook.T + self.codebook.square().sum(1)
        return distances.argmin(1)

    def codes(self, latents: torch.Tensor) -> torch.Tensor:
        """The code index at each position of latents (N, dim, h, w): (N, h, w)."""
        return self.nearest(latents.movedim(1, -1).flatten(0, -2)).view(latents.shape[0], *latents.shape[2:])

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        quantised = self.codebook[self.codes(latents)].movedim(-1, 1)
        return latents + (quantised - latents).detach()


class VAE(nn.Module):
    """Images (N, C, H, W) -> latents (N, latent_channels, H / downsample, W / downsample) and back.
    With a codebook (VQ-VAE) `decode` quantises first, so it takes the pre-quantisation latents
    that `encode` gives and the diffusion stage models (latent-diffusion practice).

    Conditional (num_classes > 0: Sohn et al. 2015's CVAE, Kingma et al. 2014's M2), q(z | x, y) and
    p(x | z, y): the label's one-hot map is concatenated to the encoder's input and to the decoder's
    as num_classes extra channels, Sohn et al.'s own MNIST setup. The first convolution's weights on
    those channels are the learned class embedding (a per-channel bias but at the zero-padded
    border), and both networks stay plain Sequentials: compiled and checkpointed as the
    unconditional VAE's. An unconditional VAE ignores the labels it is given."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        widths, groups = config.stage_widths, config.norm_groups

        encoder = [nn.Conv2d(config.image_channels + config.num_classes, widths[0], 3, padding=1)]
        for width, next_width in pairwise(widths):
            encoder += [ResBlock(width, groups), nn.Conv2d(width, next_width, 3, stride=2, padding=1)]
        encoder += [
            ResBlock(widths[-1], groups), group_norm(widths[-1], groups), nn.SiLU(),
            nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1),  # mean and log-variance
        ]
        self.encoder = nn.Sequential(*encoder)

        decoder = [nn.Conv2d(config.latent_channels + config.num_classes, widths[-1], 3, padding=1), ResBlock(widths[-1], groups)]
        for width, previous_width in pairwise(reversed(widths)):
            decoder += [
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, previous_width, 3, padding=1),
                ResBlock(previous_width, groups),
            ]
        decoder += [
            group_norm(widths[0], groups), nn.SiLU(), nn.Conv2d(widths[0], config.image_channels, 3, padding=1)
        ]
        self.decoder = nn.Sequential(*decoder)
        self.quantizer = VectorQuantizer(config.codebook_size, config.latent_channels) if config.codebook_size else None

    def with_labels(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """A conditional VAE's network input: `inputs` (N, C, h, w) and the one-hot maps of `labels` (N,)."""
        if not self.config.num_classes:
            return inputs
        if labels is None:
            raise ValueError("a conditional VAE encodes and decodes with the labels")
        one_hot = F.one_hot(labels, self.config.num_classes).to(inputs.dtype)
        return torch.cat([inputs, one_hot[:, :, None, None].expand(-1, -1, *inputs.shape[2:])], dim=1)

    def encode(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance, each (N, latent_channels, h, w)."""
        mean, logvar = self.encoder(self.with_labels(images, labels)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # exp() stays finite early in training

    def decode(self, latents: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self.with_labels(latents if self.quantizer is None else self.quantizer(latents), labels))

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

    def __init__(self, image_channels: int, width: int, layers: int, norm_groups: int = 8):
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


def imq_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Inverse multiquadric kernel C / (C + |x - y|^2) between the rows of x (n, d) and y (m, d), with
    C = 2d, the scale Tolstikhin et al. (2018) use for an N(0, I) prior: its heavy tails keep a
    gradient when the two samples lie far apart, where a Gaussian kernel's vanishes."""
    scale = 2.0 * x.shape[1]
    distances = (x.square().sum(1, keepdim=True) - 2 * x @ y.T + y.square().sum(1)).clamp(min=0)
    return scale / (scale + distances)


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unbiased estimate of MMD^2 between samples x (n, d) and y (m, d) under `imq_kernel`:
    near 0 (either sign) for samples of one distribution. In float32 even under autocast: it is
    a difference of near-equal means."""
    n, m = len(x), len(y)
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        within_x, within_y = imq_kernel(x, x), imq_kernel(y, y)
        return (
            (within_x.sum() - within_x.diagonal().sum()) / (n * (n - 1))
            + (within_y.sum() - within_y.diagonal().sum()) / (m * (m - 1))
            - 2 * imq_kernel(x, y).mean()
        )


def prior_mismatch(latents: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
    """How far latents (N, ...), flattened, sit from the N(0, I) prior that decoded samples are drawn
    from: `prior_mmd` against as many prior draws, `prior_mean_norm` (the norm of their mean) and
    `prior_cov_error` (the mean |cov - I| entry)."""
    flat = latents.flatten(1).float()
    prior = torch.randn(flat.shape, generator=generator).to(flat.device)
    centred = flat - flat.mean(0)
    covariance = centred.T @ centred / (len(flat) - 1)
    identity = torch.eye(flat.shape[1], device=flat.device)
    return {
        "prior_mmd": mmd(flat, prior).item(),
        "prior_mean_norm": flat.mean(0).norm().item(),
        "prior_cov_error": (covariance - identity).abs().mean().item(),
    }


def code_frequencies(codes: torch.Tensor, size: int) -> torch.Tensor:
    """The share of `codes` (any shape, indices into a codebook of `size`) that picked each code."""
    return torch.bincount(codes.flatten(), minlength=size).float() / codes.numel()


def perplexity(frequencies: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of code frequencies: the number of equally used codes they are worth."""
    return torch.exp(-(frequencies * frequencies.clamp(min=1e-12).log()).sum())


class KLRegulariser(nn.Module):
    """beta-VAE: beta * KL(q(z|x) || N(0, I)) per image element; the decoder gets a posterior draw."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, vae: VAE, mean: torch.Tensor, logvar: torch.Tensor, image_elements: int):
        kl = vae.kl(mean, logvar).mean()
        return vae.sample(mean, logvar), self.beta * kl / image_elements, {"kl": kl}


class MMDRegulariser(nn.Module):
    """InfoVAE (Zhao et al. 2019): weight * MMD^2(q(z), N(0, I)) per image element, between the
    batch's posterior draws (the aggregate posterior) and as many prior draws, plus kl_weight * the
    per-sample KL. kl_weight 0 is the paper's MMD-VAE (its alpha = 1), weight 1000 its lambda."""

    def __init__(self, weight: float, kl_weight: float):
        super().__init__()
        self.weight = weight
        self.kl_weight = kl_weight

    def forward(self, vae: VAE, mean: torch.Tensor, logvar: torch.Tensor, image_elements: int):
        latents = vae.sample(mean, logvar)
        flat = latents.flatten(1).float()
        distance = mmd(flat, torch.randn_like(flat))
        kl = vae.kl(mean, logvar).mean()
        return latents, (self.weight * distance + self.kl_weight * kl) / image_elements, {"mmd": distance, "kl": kl}


class VectorQuantisation(nn.Module):
    """VQ-VAE's bottleneck (van den Oord et al. 2017) for a VAE with a codebook. The decoder gets each
    posterior mean's nearest code with a straight-through gradient; the encoder a commitment loss,
    commitment * the mean of (mean - sg(code))^2. In training, each call moves the codebook to the
    EMA of the latents assigned to each code (the paper's appendix; Razavi et al. 2019):
        N_i <- decay N_i + (1 - decay) n_i,  m_i <- decay m_i + (1 - decay) sum_j z_ij,  e_i = m_i / N_i,
    and a code no latent picked for `restart_after` calls restarts at a random latent of the batch."""

    def __init__(self, quantizer: VectorQuantizer, commitment: float, decay: float, restart_after: int):
        super().__init__()
        self.commitment = commitment
        self.decay = decay
        self.restart_after = restart_after
        size = len(quantizer.codebook)
        # as if each code had had itself assigned once: unused codes stay put until restarted
        self.register_buffer("cluster_size", torch.ones(size))
        self.register_buffer("code_sum", quantizer.codebook.clone())
        self.register_buffer("unused_steps", torch.zeros(size, dtype=torch.long))

    def forward(self, vae: VAE, mean: torch.Tensor, logvar: torch.Tensor, image_elements: int):
        vectors = mean.movedim(1, -1).flatten(0, -2).float()  # (N * h * w, dim)
        codes = vae.quantizer.nearest(vectors)
        quantised = vae.quantizer.codebook[codes]
        commitment = (vectors - quantised).square().mean()
        if self.training:
            self.update(vae.quantizer.codebook, vectors.detach(), codes)
        quantised = quantised.view(*mean.shape[:1], *mean.shape[2:], -1).movedim(-1, 1)
        used = perplexity(code_frequencies(codes, len(vae.quantizer.codebook)))
        return mean + (quantised - mean).detach(), self.commitment * commitment, {"commitment": commitment, "perplexity": used}

    @torch.no_grad()
    def update(self, codebook: torch.Tensor, vectors: torch.Tensor, codes: torch.Tensor) -> None:
        """The EMA step and the restarts, in place, without reading anything back to the host."""
        counts = torch.bincount(codes, minlength=len(codebook)).float()
        sums = torch.zeros_like(codebook).index_add_(0, codes, vectors)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.code_sum.lerp_(sums, 1 - self.decay)
        codebook.copy_(self.code_sum / self.cluster_size.clamp(min=1e-12)[:, None])
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.unused_steps >= self.restart_after)[:, None]
        restarts = vectors[torch.randint(len(vectors), (len(codebook),), device=vectors.device)]
        codebook.copy_(torch.where(dead, restarts, codebook))
        self.code_sum.copy_(torch.where(dead, restarts, self.code_sum))
        self.cluster_size.masked_fill_(dead[:, 0], 1.0)
        self.unused_steps.masked_fill_(dead[:, 0], 0)


class VAETraining(nn.Module):
    """forward((images in [-1, 1], labels)) -> {"loss", "recon", the regulariser's terms[, "perceptual"][, "adv", "disc"]}.

    loss = recon + the regulariser's penalty (KLRegulariser, MMDRegulariser or VectorQuantisation)
         [+ perceptual_weight * feature distance under the frozen `feature_fn`]
         [+ adv_weight * generator hinge + discriminator hinge, once adv_warmup_steps are done]

    recon is the per-element L1 or L2 error; the regulariser gives the decoder its latents and a
    penalty on the same per-element scale (KL and MMD are divided by the elements per image).
    """

    def __init__(
        self,
        vae: VAE,
        *,
        regulariser: nn.Module,
        reconstruction: str,
        adv_weight: float,
        perceptual_weight: float,
        discriminator: PatchDiscriminator | None = None,
        adv_warmup_steps: int = 0,
        feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.vae = vae
        self.regulariser = regulariser
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

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        mean, logvar = self.vae.encode(images, labels)
        latents, penalty, outputs = self.regulariser(self.vae, mean, logvar, images[0].numel())
        reconstructions = self.vae.decoder(self.vae.with_labels(latents, labels))  # VQ: the regulariser has quantised them already
        error = reconstructions - images
        recon = error.abs().mean() if self.reconstruction == "l1" else error.square().mean()
        loss = recon + penalty
        outputs = {"recon": recon, **outputs}
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
