"""Samplers: Euler and Heun for the rectified flow (integrating t from 1 to 0), DDPM ancestral and
DDIM (eta = 0) for DDPM, EDM's Heun and the reverse-time SDE for EDM (over σ on the ρ-schedule).
Each takes (net, noise, labels, steps, guidance) and returns x0; the EDM ones take the
preconditioned denoiser (models/diffusion.EDMPrecond) and unit noise, which they scale to σ_max.

Classifier-free guidance: uncond + guidance * (cond - uncond), both from one batched call;
guidance = 1 is the plain conditional model and costs one call. The caller sets eval mode.

The deterministic samplers (euler, heun, ddim, edm_heun) also run backwards with `invert=True`:
from x0 to the noise they would map onto it (DDIM inversion, Song et al. 2021): Euler and DDIM
evaluate the net at each step's less noisy end, the Heun samplers at both ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from models.diffusion import CosineSchedule, per_sample


def guided(
    net: nn.Module, x: torch.Tensor, t: float | torch.Tensor, labels: torch.Tensor, guidance: float
) -> torch.Tensor:
    """The net's output at time t (a float, or per sample (N,)), with classifier-free guidance, in
    float32 (the sampler's state stays float32 when the net runs under bf16 autocast)."""
    times = t if isinstance(t, torch.Tensor) else torch.full((len(x),), t, device=x.device, dtype=x.dtype)
    if guidance == 1:
        return net(x, times, labels).float()
    both_labels = torch.cat([labels, torch.full_like(labels, net.null_label)])
    cond, uncond = net(torch.cat([x, x]), torch.cat([times, times]), both_labels).float().chunk(2)
    return uncond + guidance * (cond - uncond)


def time_grid(steps: int) -> list[float]:
    """steps + 1 evenly spaced times from 1 down to 0."""
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()


@torch.no_grad()
def euler(
    net: nn.Module, noise: torch.Tensor, labels: torch.Tensor, steps: int, guidance: float = 1.0, invert: bool = False
) -> torch.Tensor:
    x = noise
    times = time_grid(steps)[:: -1 if invert else 1]
    for t, t_next in pairwise(times):
        x = x + (t_next - t) * guided(net, x, t, labels, guidance)
    return x


@torch.no_grad()
def heun(
    net: nn.Module, noise: torch.Tensor, labels: torch.Tensor, steps: int, guidance: float = 1.0, invert: bool = False
) -> torch.Tensor:
    """Second order: the mean of the velocities at both ends of an Euler step (2 calls a step)."""
    x = noise
    times = time_grid(steps)[:: -1 if invert else 1]
    for t, t_next in pairwise(times):
        velocity = guided(net, x, t, labels, guidance)
        x_euler = x + (t_next - t) * velocity
        x = x + (t_next - t) * 0.5 * (velocity + guided(net, x_euler, t_next, labels, guidance))
    return x


def predict_x0(x: torch.Tensor, eps: torch.Tensor, alpha_bar) -> torch.Tensor:
    """The x0 that eps implies at noise level alpha_bar (a float, or per-sample tensor)."""
    return (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar, alpha_bar_next) -> torch.Tensor:
    """Deterministic DDIM update (Song et al. 2021): the predicted x0 re-noised with the same eps."""
    x0 = predict_x0(x, eps, alpha_bar)
    return alpha_bar_next**0.5 * x0 + (1 - alpha_bar_next) ** 0.5 * eps


def alpha_bar_grid(steps: int, schedule: CosineSchedule | None) -> list[float]:
    schedule = schedule or CosineSchedule()
    return schedule.alpha_bar(torch.linspace(1, 0, steps + 1, dtype=torch.float64)).tolist()


@torch.no_grad()
def ddim(
    net: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    guidance: float = 1.0,
    schedule: CosineSchedule | None = None,
    invert: bool = False,
) -> torch.Tensor:
    x = noise
    times, alpha_bars = time_grid(steps), alpha_bar_grid(steps, schedule)
    if invert:
        times, alpha_bars = times[::-1], alpha_bars[::-1]
    for t, (alpha_bar, alpha_bar_next) in zip(times[:-1], pairwise(alpha_bars), strict=True):
        x = ddim_step(x, guided(net, x, t, labels, guidance), alpha_bar, alpha_bar_next)
    return x


@torch.no_grad()
def ddpm_ancestral(
    net: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    guidance: float = 1.0,
    schedule: CosineSchedule | None = None,
) -> torch.Tensor:
    """Draws x_next from the posterior q(x_next | x, x0 = the predicted x0) (Ho et al. 2020)."""
    x = noise
    times, alpha_bars = time_grid(steps), alpha_bar_grid(steps, schedule)
    for t, (alpha_bar, alpha_bar_next) in zip(times[:-1], pairwise(alpha_bars), strict=True):
        x0 = predict_x0(x, guided(net, x, t, labels, guidance), alpha_bar)
        step_alpha = alpha_bar / alpha_bar_next
        x0_weight = alpha_bar_next**0.5 * (1 - step_alpha) / (1 - alpha_bar)
        x_weight = step_alpha**0.5 * (1 - alpha_bar_next) / (1 - alpha_bar)
        variance = (1 - alpha_bar_next) / (1 - alpha_bar) * (1 - step_alpha)
        x = x0_weight * x0 + x_weight * x + variance**0.5 * torch.randn_like(x)
    return x


@dataclass(frozen=True)
class KarrasSchedule:
    """EDM's noise levels (Karras et al. 2022, eq. 5): σ_max^(1/ρ) to σ_min^(1/ρ) evenly, to the
    power ρ, then 0; ρ = 7 crowds the steps at low σ, where the ODE curves most. The values come
    from tasks/params.py's EDMParams."""

    sigma_min: float
    sigma_max: float
    rho: float

    def sigmas(self, steps: int) -> list[float]:
        """steps + 1 noise levels from sigma_max down to 0 (one step: sigma_max, 0)."""
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
        high, low = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return ((high + ramp * (low - high)) ** self.rho).tolist() + [0.0]


@torch.no_grad()
def edm_heun(
    net: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    guidance: float = 1.0,
    *,
    schedule: KarrasSchedule,
    invert: bool = False,
) -> torch.Tensor:
    """EDM's deterministic sampler (Algorithm 1): Heun on the probability-flow ODE
    dx/dσ = (x - D(x, σ)) / σ, Euler on the last step to σ = 0: 2 steps - 1 net calls.
    Inverted, x0 stands for x at σ_min and the result is divided by σ_max: unit noise."""
    sigmas = schedule.sigmas(steps)
    if invert:
        sigmas = sigmas[-2::-1]
    x = noise if invert else noise * sigmas[0]
    for sigma, sigma_next in pairwise(sigmas):
        if sigma_next == 0:  # an Euler step to σ = 0 lands on the denoiser's output
            x = guided(net, x, sigma, labels, guidance)
        else:
            x = edm_heun_step(net, x, sigma, sigma_next, labels, guidance)
    return x / sigmas[-1] if invert else x


def edm_heun_step(
    net: nn.Module, x: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
    labels: torch.Tensor, guidance: float,
) -> torch.Tensor:
    """One Heun step of dx/dσ = (x - D(x, σ)) / σ between noise levels > 0: floats, or per
    sample (N,) (consistency distillation's teacher step)."""
    level, level_next = (per_sample(v, x) if isinstance(v, torch.Tensor) else v for v in (sigma, sigma_next))
    slope = (x - guided(net, x, sigma, labels, guidance)) / level
    x_euler = x + (level_next - level) * slope
    slope_next = (x_euler - guided(net, x_euler, sigma_next, labels, guidance)) / level_next
    return x + (level_next - level) * 0.5 * (slope + slope_next)


@torch.no_grad()
def reverse_sde(
    net: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    guidance: float = 1.0,
    *,
    schedule: KarrasSchedule,
    churn: float | None,
) -> torch.Tensor:
    """Euler–Maruyama on EDM's family of reverse-time SDEs (eq. 6, σ(t) = t): the probability-flow
    ODE plus Langevin steps of strength γ, all sharing one net call a step:
    x += (σ' - σ)(x - D)/σ + γ (D - x) + sqrt(2γ) σ z.

    churn None: γ = 1 - σ'/σ, Anderson's reverse-time SDE dx = -2σ ∇log p dσ + sqrt(2σ) dw.
    churn a number: EDM's S_churn, γ = min(churn / steps, √2 - 1) at every step; 0 is the Euler
    ODE sampler. The last step to σ = 0 returns the denoiser's output, without noise. Fresh noise
    comes from torch's global generator: the caller seeds it.
    """
    sigmas = schedule.sigmas(steps)
    x = noise * sigmas[0]
    for sigma, sigma_next in pairwise(sigmas):
        denoised = guided(net, x, sigma, labels, guidance)
        if sigma_next == 0:
            x = denoised
            continue
        langevin = 1 - sigma_next / sigma if churn is None else min(churn / steps, 2**0.5 - 1)
        x = x + (sigma_next - sigma) * (x - denoised) / sigma + langevin * (denoised - x)
        if langevin > 0:
            x = x + (2 * langevin) ** 0.5 * sigma * torch.randn_like(x)
    return x


@torch.no_grad()
def consistency(
    net: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    guidance: float = 1.0,
    *,
    schedule: KarrasSchedule,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): the consistency function
    (models/diffusion.ConsistencyPrecond) maps x at σ_max to x0, then x0 re-noised to each next
    level of a (steps + 1)-level ρ-schedule, short of σ_min, is mapped again: 1 call a step."""
    sigmas = schedule.sigmas(steps + 1)[:steps]
    x = guided(net, noise * sigmas[0], sigmas[0], labels, guidance)
    for sigma in sigmas[1:]:
        renoised = x + (sigma**2 - schedule.sigma_min**2) ** 0.5 * torch.randn_like(x)
        x = guided(net, renoised, sigma, labels, guidance)
    return x
