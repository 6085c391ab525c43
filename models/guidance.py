"""Classifier guidance (Dhariwal & Nichol 2021): a noise-aware classifier p(y | x_t) trained on
latents noised the way the denoiser's formulation noises them, and the denoiser wrapped so that its
output follows the score of p(x_t) p(y | x_t)^s.

Every formulation's output is an affine function of the score ∇log p_t(x) at fixed (x, level),
so adding s ∇log p(y | x) to the score moves the output by a multiple of that gradient g:

- rectified flow, x = (1 - t) x0 + t ε, the net predicts v = ε - x0: x0 = x - t v and ε = x + (1 - t) v,
  and the score is -E[ε | x] / t; so v = (-t score - x) / (1 - t), and score + s g gives
  v' = v - s t / (1 - t) g. 1 - t is floored at `FLOW_MIN_SIGNAL` (t = 1 is the first step from noise).
- DDPM, x = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε, the net predicts ε = -sqrt(1 - ᾱ) score: ε' = ε - s sqrt(1 - ᾱ) g
  (Dhariwal & Nichol's eq. 14, which their DDIM sampler, Algorithm 2, steps with).
- EDM, x = x0 + σ ε, the preconditioned denoiser D = x + σ² score (Tweedie): D' = D + s σ² g.

The sign is the same in all three: the guided sample moves up the classifier's log-probability of
the requested class. At s = 0 the wrapper returns the net's output untouched, and it costs one
classifier forward and backward per net call on top of the net.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.diffusion import CosineSchedule, per_sample
from models.unet import Downsample, ResBlock, group_norm, timestep_embedding

# The flow's signal coefficient 1 - t floored where its signal-to-noise ratio meets DDPM's at
# alpha_bar_min = 1e-3 (sqrt(1e-3) ≈ 0.03): the guidance term's t / (1 - t) stays below ~32.
FLOW_MIN_SIGNAL = math.sqrt(CosineSchedule().alpha_bar_min)


@dataclass
class NoisyClassifierConfig:
    in_channels: int  # latent channels
    num_classes: int
    channels: int  # width of the first level
    channel_mults: tuple[int, ...]  # width of each level / channels; each next level halves the grid
    blocks_per_level: int
    norm_groups: int = 8

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)  # JSON gives a list


class NoisyClassifier(nn.Module):
    """The U-Net's down half (its ResBlocks, time-conditioned, no class embedding), pooled into
    logits: `classifier(x, t)` with t the noise level as the denoiser's net gets it."""

    def __init__(self, config: NoisyClassifierConfig):
        super().__init__()
        self.config = config
        embedding_dim = 4 * config.channels
        self.time_mlp = nn.Sequential(
            nn.Linear(config.channels, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim)
        )
        self.input = nn.Conv2d(config.in_channels, config.channels, 3, padding=1)
        self.down = nn.ModuleList()
        width = config.channels
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.blocks_per_level):
                self.down.append(ResBlock(width, config.channels * mult, embedding_dim, config.norm_groups, 0.0))
                width = config.channels * mult
            if level < len(config.channel_mults) - 1:
                self.down.append(Downsample(width))
        self.head = nn.Sequential(group_norm(width, config.norm_groups), nn.SiLU())
        self.logits = nn.Linear(width, config.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        embedding = self.time_mlp(timestep_embedding(t, self.config.channels))
        h = self.input(x)
        for layer in self.down:
            h = layer(h, embedding) if isinstance(layer, ResBlock) else layer(h)
        return self.logits(self.head(h).mean((2, 3)))


class NoiseLevels:
    """How a formulation noises x0 and what its net is told: `level` is what the samplers pass the
    denoiser (the flow's and DDPM's t in [0, 1], EDM's σ), `classifier_input` what the classifier
    sees of it, `guide` the output's shift for score + s g (the module docstring derives them).

    The classifier trains on levels spread evenly over what the samplers visit (t uniform in [0, 1];
    EDM: ln σ uniform over [σ_min, σ_max]), not over the denoiser's training distribution: the
    guidance is applied at every step of the sampler's grid, the first (pure noise) included."""

    def __init__(self, formulation: str, schedule: CosineSchedule | None = None, sigmas: dict[str, float] | None = None):
        """`sigmas`: EDM's sigma_data, sigma_min and sigma_max (its params), for formulation edm only."""
        if formulation not in ("flow", "ddpm", "edm"):
            raise ValueError(f"classifier guidance takes a flow, DDPM or EDM denoiser, not {formulation!r}")
        self.formulation = formulation
        self.schedule = schedule or CosineSchedule()
        if formulation == "edm":
            self.sigma_data, self.sigma_min, self.sigma_max = sigmas["sigma_data"], sigmas["sigma_min"], sigmas["sigma_max"]

    def sample(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 noised at random levels, the levels (N,))."""
        noise, uniform = torch.randn_like(x0), torch.rand(len(x0), device=x0.device)
        if self.formulation == "edm":
            sigma = (math.log(self.sigma_min) + uniform * math.log(self.sigma_max / self.sigma_min)).exp()
            return x0 + per_sample(sigma, x0) * noise, sigma
        signal, noise_weight = self.coefficients(uniform)
        return per_sample(signal, x0) * x0 + per_sample(noise_weight, x0) * noise, uniform

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise) weights of x_t = signal x0 + noise ε at t (the flow and DDPM)."""
        if self.formulation == "flow":
            return 1 - t, t
        alpha_bar = self.schedule.alpha_bar(t)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def classifier_input(self, x: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """EDM's x at unit variance and ln(σ) / 4, as its preconditioning feeds the denoiser; the
        flow's and DDPM's x and t as they are (x stays near unit variance)."""
        if self.formulation != "edm":
            return x, level
        total = per_sample(level.float(), x).square() + self.sigma_data**2
        return x / total.sqrt(), level.float().log() / 4

    def guide(
        self, output: torch.Tensor, level: torch.Tensor, gradient: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """The output that the score plus `scale` * `gradient` (∇_x log p(y | x)) implies."""
        level = per_sample(level.float(), output)
        if self.formulation == "flow":
            weight = level / (1 - level).clamp(min=FLOW_MIN_SIGNAL)
            return output - scale * weight * gradient
        if self.formulation == "ddpm":
            return output - scale * (1 - self.schedule.alpha_bar(level)).sqrt() * gradient
        return output + scale * level.square() * gradient


def log_probability_gradient(
    classifier: nn.Module, levels: NoiseLevels, x: torch.Tensor, level: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """∇_x log p(labels | x) at each sample's level, float32 (the samplers run under no_grad)."""
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        classifier_x, classifier_t = levels.classifier_input(x, level)
        log_probs = F.log_softmax(classifier(classifier_x, classifier_t).float(), dim=1)
        chosen = log_probs.gather(1, labels[:, None]).sum()
        (gradient,) = torch.autograd.grad(chosen, x)
    return gradient


class ClassifierGuided(nn.Module):
    """A denoiser `net(x, level, labels)` (for EDM, the preconditioned one) whose output follows
    score + scale ∇log p(y | x): every sampler guides it like the plain net. Rows whose label is
    the null class (classifier-free guidance's unconditional half) get no classifier term."""

    def __init__(self, net: nn.Module, classifier: nn.Module, levels: NoiseLevels, scale: float):
        super().__init__()
        self.net, self.classifier, self.levels, self.scale = net, classifier, levels, scale
        self.null_label = net.null_label

    def forward(self, x: torch.Tensor, level: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        output = self.net(x, level, labels).float()
        if self.scale == 0:
            return output
        conditional = labels != self.null_label
        gradient = log_probability_gradient(self.classifier, self.levels, x, level, labels.where(conditional, 0))
        gradient = gradient * per_sample(conditional.float(), gradient)
        return self.levels.guide(output, level, gradient, self.scale)


class NoisyClassification(nn.Module):
    """What the training loop trains: forward((latents, labels)) -> {"loss": cross-entropy of the
    classifier on the latents noised at random levels, "accuracy"}."""

    def __init__(self, classifier: NoisyClassifier, levels: NoiseLevels):
        super().__init__()
        self.classifier, self.levels = classifier, levels

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents, labels = batch
        noised, level = self.levels.sample(latents)
        logits = self.classifier(*self.levels.classifier_input(noised, level))
        return {"loss": F.cross_entropy(logits.float(), labels), "accuracy": (logits.argmax(1) == labels).float().mean()}
