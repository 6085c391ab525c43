"""Diffusion objectives, each a small callable in NVlabs/edm's shape: the constructor holds the
hyper-parameters, `objective(net, x0, labels)` returns the per-sample loss (N,).

A denoiser is any module `net(x, t, labels)` returning a tensor shaped like x, with t (N,) the
noise level (in [0, 1] for the flow and DDPM; EDM's preconditioning feeds it log(σ) / 4) and an
attribute `null_label`: the class index that means "no label". Training with `label_dropout` > 0
teaches it the unconditional model too, for classifier-free guidance.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.repa import HiddenTap, RepaAlignment


def drop_labels(labels: torch.Tensor, null_label: int, probability: float) -> torch.Tensor:
    """Each label replaced by the null class with the given probability."""
    if probability == 0:
        return labels
    dropped = torch.rand(labels.shape, device=labels.device) < probability
    return torch.where(dropped, torch.full_like(labels, null_label), labels)


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...), to broadcast against a batch shaped like `like`."""
    return values.view(-1, *[1] * (like.ndim - 1))


class RectifiedFlow:
    """x_t = (1 - t) x0 + t noise; the net predicts the velocity noise - x0 (Liu et al. 2022).

    t is logit-normal (Esser et al. 2024): sigmoid of N(time_mean, time_std²), which spends
    the training on the middle of the path, where the velocity is hardest to predict.
    """

    def __init__(self, time_mean: float, time_std: float, label_dropout: float):
        self.time_mean = time_mean
        self.time_std = time_std
        self.label_dropout = label_dropout

    def sample_time(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.sigmoid(self.time_mean + self.time_std * torch.randn(n, device=device))

    def __call__(
        self, net: nn.Module, x0: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`noise` is x0's coupled noise for reflow; fresh Gaussian noise when not given."""
        noise = torch.randn_like(x0) if noise is None else noise
        t = self.sample_time(len(x0), x0.device)
        x_t = (1 - per_sample(t, x0)) * x0 + per_sample(t, x0) * noise
        velocity = net(x_t, t, drop_labels(labels, net.null_label, self.label_dropout))
        return (velocity - (noise - x0)).square().flatten(1).mean(1)


class CosineSchedule:
    """alpha_bar(t) = f(t) / f(0), f(t) = cos²(π/2 (t + offset) / (1 + offset)) (Nichol & Dhariwal 2021),
    in continuous time t in [0, 1].

    The cosine reaches alpha_bar = 0 at its end, where x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
    is undefined; t is stretched so that alpha_bar(1) = alpha_bar_min instead. The samplers start at t = 1
    from pure noise, ignoring the sqrt(alpha_bar_min) of signal left there, and a one-step sampler's
    x0 amplifies the eps error by 1 / sqrt(alpha_bar_min).
    """

    def __init__(self, offset: float = 0.008, alpha_bar_min: float = 1e-3):
        self.offset = offset
        self.alpha_bar_min = alpha_bar_min
        self.f0 = math.cos(math.pi / 2 * offset / (1 + offset)) ** 2
        self.t_max = (1 + offset) * 2 / math.pi * math.acos(math.sqrt(alpha_bar_min * self.f0)) - offset

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        angle = math.pi / 2 * (t * self.t_max + self.offset) / (1 + self.offset)
        return angle.cos().square() / self.f0


class DDPM:
    """Epsilon prediction (Ho et al. 2020) under the cosine schedule, t uniform in [0, 1]."""

    def __init__(self, label_dropout: float, schedule: CosineSchedule | None = None):
        self.schedule = schedule or CosineSchedule()
        self.label_dropout = label_dropout

    def __call__(self, net: nn.Module, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = torch.rand(len(x0), device=x0.device)
        alpha_bar = per_sample(self.schedule.alpha_bar(t), x0)
        noise = torch.randn_like(x0)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        predicted = net(x_t, t, drop_labels(labels, net.null_label, self.label_dropout))
        return (predicted - noise).square().flatten(1).mean(1)


class EDMPrecond(nn.Module):
    """The denoiser D(x, σ) = c_skip x + c_out F(c_in x, c_noise) around a raw network F (Karras et
    al. 2022, NVlabs/edm's EDMPrecond): input and training target at unit variance at every σ, and
    the network's error amplified as little as it can be. `precond(x, sigma, labels)` with sigma
    (N,); it has the net's null_label, so the samplers guide it like any denoiser."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        self.null_label = net.null_label

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) at `sigma`."""
        total = sigma.square() + self.sigma_data**2
        return self.sigma_data**2 / total, sigma * self.sigma_data / total.sqrt(), 1 / total.sqrt()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = per_sample(sigma.float(), x)
        c_skip, c_out, c_in = self.scalings(sigma)
        c_noise = sigma.log().flatten() / 4
        return c_skip * x + c_out * self.net(c_in * x, c_noise, labels).float()


class ConsistencyPrecond(EDMPrecond):
    """A consistency function f(x, σ) = c_skip x + c_out F(c_in x, c_noise) whose c_skip and c_out
    are shifted by σ_min so that f(x, σ_min) = x, the boundary condition (Song et al. 2023,
    appendix C); c_in and c_noise are EDM's."""

    def __init__(self, net: nn.Module, sigma_data: float, sigma_min: float):
        super().__init__(net, sigma_data)
        self.sigma_min = sigma_min

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total = sigma.square() + self.sigma_data**2
        c_skip = self.sigma_data**2 / ((sigma - self.sigma_min).square() + self.sigma_data**2)
        return c_skip, (sigma - self.sigma_min) * self.sigma_data / total.sqrt(), 1 / total.sqrt()


class EDM:
    """The σ-parameterisation of Karras et al. 2022: x = x0 + σ noise, σ log-normal
    (ln σ ~ N(p_mean, p_std²)), the preconditioned denoiser regresses x0 with weight
    (σ² + σ_data²) / (σ σ_data)², which makes the network's own target unit-variance at every σ."""

    def __init__(self, p_mean: float, p_std: float, sigma_data: float, label_dropout: float):
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_data = sigma_data
        self.label_dropout = label_dropout

    def sample_sigma(self, n: int, device: torch.device) -> torch.Tensor:
        return (self.p_mean + self.p_std * torch.randn(n, device=device)).exp()

    def __call__(self, net: nn.Module, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = self.sample_sigma(len(x0), x0.device)
        weight = per_sample((sigma.square() + self.sigma_data**2) / (sigma * self.sigma_data).square(), x0)
        noisy = x0 + per_sample(sigma, x0) * torch.randn_like(x0)
        denoised = EDMPrecond(net, self.sigma_data)(noisy, sigma, drop_labels(labels, net.null_label, self.label_dropout))
        return (weight * (denoised - x0).square()).flatten(1).mean(1)


class DenoiserTraining(nn.Module):
    """What the training loop trains: forward((latents, labels)) -> {"loss": the batch mean}. With
    `alignment`, the batch also holds the SSL embeddings of the latents' clean images and the loss adds
    REPA's alignment term (models/repa.py), weighted; "diffusion" and "alignment" are logged apart."""

    def __init__(self, net: nn.Module, objective: RectifiedFlow | DDPM | EDM, alignment: RepaAlignment | None = None):
        super().__init__()
        self.net = net
        self.objective = objective
        self.alignment = alignment

    def forward(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        latents, labels, *embeddings = batch
        if self.alignment is None:
            return {"loss": self.objective(self.net, latents, labels).mean()}
        tap = HiddenTap(self.net, self.alignment.depth)
        diffusion = self.objective(tap, latents, labels).mean()
        alignment = self.alignment(tap.hidden, *embeddings).mean()
        return {"loss": diffusion + self.alignment.weight * alignment, "diffusion": diffusion, "alignment": alignment}

    def compile(self, **kwargs) -> None:
        """torch.compile the network; the objective's sampling of t and noise stays eager."""
        self.net.compile(**kwargs)
