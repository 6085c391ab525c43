"""DDIM inversion: each deterministic sampler run backwards maps data to the noise it regenerates
them from, and the round trip tightens as the steps grow. The toy denoisers are exact for
N(mean, std²) data in each formulation's parameterisation."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from models.diffusion import CosineSchedule
from models.samplers import KarrasSchedule, ddim, edm_heun, euler, heun
from models.unet import UNet, UNetConfig
from tasks.diffusion import Denoiser, invert_and_regenerate
from tasks.params import EDMParams, UNetParams
from tests.defaults import defaults

SCHEDULE = KarrasSchedule(**EDMParams().model_dump(include={"sigma_min", "sigma_max", "rho"}))  # the default rho-schedule

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = 0.7, 0.5


class GaussianVelocity(nn.Module):
    """Rectified flow, x_t = (1 - t) x0 + t noise: E[noise - x0 | x_t]."""

    null_label = 0

    def forward(self, x, t, labels):
        t = t.view(-1, 1)
        centred = x - (1 - t) * MEAN
        variance = (1 - t) ** 2 * STD**2 + t**2
        return (t - (1 - t) * STD**2) * centred / variance - MEAN


class GaussianEps(nn.Module):
    """DDPM, x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) noise: E[noise | x_t]."""

    null_label = 0

    def forward(self, x, t, labels):
        alpha_bar = CosineSchedule().alpha_bar(t).view(-1, 1)
        return (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * MEAN) / (alpha_bar * STD**2 + 1 - alpha_bar)


class GaussianDenoiser(nn.Module):
    """EDM, x = x0 + σ noise: E[x0 | x]."""

    null_label = 0

    def forward(self, x, sigma, labels):
        sigma = sigma.view(-1, 1)
        return MEAN + STD**2 / (STD**2 + sigma**2) * (x - MEAN)


@pytest.mark.parametrize(
    ("sampler", "net"),
    [(euler, GaussianVelocity()), (heun, GaussianVelocity()), (ddim, GaussianEps()), (functools.partial(edm_heun, schedule=SCHEDULE), GaussianDenoiser())],
    ids=["flow-euler", "flow-heun", "ddim", "edm-heun"],
)
def test_round_trip_error_falls_as_the_steps_grow(sampler, net):
    generator = torch.Generator().manual_seed(0)
    x0, labels = MEAN + STD * torch.randn(2000, 3, generator=generator), torch.zeros(2000, dtype=torch.long)
    errors = []
    for steps in (8, 16, 32, 128):  # first order: the error falls as 1/steps²
        noise = sampler(net, x0, labels, steps, invert=True)
        errors.append((sampler(net, noise, labels, steps) - x0).square().mean().item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-2 * errors[0] and errors[-1] < 1e-3
    # what it inverts to is noise: the Gaussian data map to unit Gaussian noise
    assert noise.std().item() == pytest.approx(1.0, abs=0.05) and noise.mean().abs().item() < 0.05


@pytest.mark.parametrize(("formulation", "sampler"), [("flow", "euler"), ("ddpm", "ancestral"), ("edm", "sde")])
def test_a_denoiser_inverts_with_its_deterministic_sampler(formulation, sampler):
    torch.manual_seed(0)
    net = UNet(UNetConfig(2, 3, **defaults(UNetParams, channels=8, channel_mults=(1, 2), attention_heads=2))).eval()
    edm = {"sigma_data": 1.0, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "churn": None}
    denoiser = Denoiser(net, formulation, sampler, (2, 4, 4), edm=edm if formulation == "edm" else {})
    assert denoiser.deterministic().sampler == {"flow": "euler", "ddpm": "ddim", "edm": "heun"}[formulation]
    latents, labels = torch.randn(6, 2, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    noise, regenerated = invert_and_regenerate(denoiser, latents, labels, steps=3, batch_size=4)
    assert noise.shape == regenerated.shape == latents.shape
    deterministic = denoiser.deterministic()
    net, sample = deterministic.sampling()
    torch.testing.assert_close(regenerated, sample(net, noise, labels, 3, 1.0))  # batching changes nothing
