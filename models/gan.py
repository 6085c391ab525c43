"""A class-conditional Wasserstein GAN with gradient penalty (WGAN-GP, Gulrajani et al. 2017) over
the VAE's scaled latents: an MLP generator fed noise and a class embedding, an MLP critic with a
projection head for the class (Miyato & Koyama 2018), the penalty and the alternating objective.

The latents are tiny (4x4x4 on the default profile), so both networks see them flattened. The
critic has no batch norm: the penalty is taken per sample, and batch statistics would couple them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class GanConfig:
    latent_shape: tuple[int, ...]  # (C, h, w) of the scaled latents
    num_classes: int
    noise_dim: int
    hidden: int
    depth: int  # hidden layers of each network


def mlp(inputs: int, hidden: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(depth):
        layers += [nn.Linear(inputs if index == 0 else hidden, hidden), nn.SiLU()]
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """(noise (N, noise_dim), labels (N,)) -> scaled latents (N, C, h, w)."""

    def __init__(self, config: GanConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.num_classes, config.noise_dim)
        self.body = mlp(2 * config.noise_dim, config.hidden, config.depth)
        self.out = nn.Linear(config.hidden, int(torch.Size(config.latent_shape).numel()))

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.body(torch.cat([noise, self.embed(labels)], dim=1))
        return self.out(hidden).view(len(noise), *self.config.latent_shape)


class Critic(nn.Module):
    """(latents (N, C, h, w), labels (N,)) -> scores (N,): an unconditional score plus the projection
    of the features on the class's embedding."""

    def __init__(self, config: GanConfig):
        super().__init__()
        self.body = mlp(int(torch.Size(config.latent_shape).numel()), config.hidden, config.depth)
        self.score = nn.Linear(config.hidden, 1)
        self.embed = nn.Embedding(config.num_classes, config.hidden)

    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.body(latents.flatten(1))
        return self.score(features).squeeze(1) + (self.embed(labels) * features).sum(1)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """E[(||grad_x critic(x)|| - 1)^2] at random points x between paired real and fake samples (the
    critic's 1-Lipschitz constraint, softly); differentiable, so the critic's loss can carry it."""
    mix = torch.rand(len(real), *([1] * (real.ndim - 1)), device=real.device, dtype=real.dtype)
    between = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (grads,) = torch.autograd.grad(critic(between, labels).sum(), between, create_graph=True)
    return (grads.flatten(1).norm(dim=1) - 1).square().mean()


class WGANGP(nn.Module):
    """The trained module of the one training loop: forward((real, labels, update)) is the loss of
    the network `update` names ("critic" or "generator"); only that network gets gradients.

    critic loss    = E[D(fake)] - E[D(real)] + penalty_weight * gradient_penalty
    generator loss = -E[D(fake)]
    Both steps log `wasserstein` = E[D(real)] - E[D(fake)], the critic's estimate of the distance.
    """

    ddp_find_unused_parameters = True  # one network sits out each step

    def __init__(
        self, generator: Generator, critic: Critic, penalty_weight: float, adam_betas: tuple[float, float]
    ):
        super().__init__()
        self.generator, self.critic = generator, critic
        self.penalty_weight = penalty_weight
        self.adam_betas = tuple(adam_betas)

    def param_groups(self) -> list[dict]:
        """The optimiser's groups: each network with the paper's Adam betas, no weight decay."""
        return [
            {"params": list(network.parameters()), "betas": self.adam_betas, "weight_decay": 0.0}
            for network in (self.critic, self.generator)
        ]

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        return self.generator(torch.randn(len(labels), self.generator.config.noise_dim, device=labels.device), labels)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor, str]) -> dict[str, torch.Tensor]:
        real, labels, update = batch
        if update == "critic":
            with torch.no_grad():
                fake = self.sample(labels)
            real_score, fake_score = self.critic(real, labels).mean(), self.critic(fake, labels).mean()
            penalty = gradient_penalty(self.critic, real, fake, labels)
            wasserstein = real_score - fake_score
            return {"loss": -wasserstein + self.penalty_weight * penalty, "wasserstein": wasserstein.detach()}
        if update != "generator":
            raise ValueError(f"update must be 'critic' or 'generator', got {update!r}")
        frozen = {name: param.detach() for name, param in self.critic.named_parameters()}
        fake_score = functional_call(self.critic, frozen, (self.sample(labels), labels)).mean()
        with torch.no_grad():
            real_score = self.critic(real, labels).mean()
        return {"loss": -fake_score, "wasserstein": (real_score - fake_score).detach()}
