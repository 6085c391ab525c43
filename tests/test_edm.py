"""EDM (Karras et al. 2022): the preconditioning and loss against NVlabs/edm's formulas on identical
inputs, the ρ-schedule, the Heun sampler's cost and exactness, the reverse-time SDE sampler, and an
EDM teacher with its consistency students through `dvc repro`."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models.diffusion import EDM, EDMPrecond
from models.samplers import KarrasSchedule, edm_heun, reverse_sde
from tasks.captions import WORDS
from tasks.diffusion import Denoiser, build_denoiser_training
from tasks.params import DiffusionParams, EDMParams, ParamsError, validate
from tests.conftest import run

SCHEDULE = KarrasSchedule(**EDMParams().model_dump(include={"sigma_min", "sigma_max", "rho"}))  # the default rho-schedule

pytestmark = pytest.mark.usefixtures("one_thread")


class RawNet(nn.Module):
    """A stand-in for the U-Net F(x, c_noise, labels): a fixed nonlinear function of all three,
    recording what it was called with."""

    null_label = 3

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c_noise, labels):
        self.calls.append((x, c_noise, labels))
        return torch.tanh(x) * (1 + c_noise.view(-1, 1, 1, 1)) + 0.1 * labels.view(-1, 1, 1, 1)


def edm_precond_reference(model, x, sigma, labels, sigma_data):
    """NVlabs/edm training/networks.py, EDMPrecond.forward (fp32, no label one-hot)."""
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    F_x = model((c_in * x), c_noise.flatten(), labels)
    return c_skip * x + c_out * F_x.to(torch.float32)


def edm_loss_reference(net, images, labels, P_mean, P_std, sigma_data):
    """NVlabs/edm training/loss.py, EDMLoss.__call__ (no augmentation), per element."""
    rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    n = torch.randn_like(images) * sigma
    D_yn = net(images + n, sigma.flatten(), labels)
    return weight * ((D_yn - images) ** 2)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_preconditioning_matches_nvlabs_edm(sigma_data):
    torch.manual_seed(0)
    x, labels = 3 * torch.randn(5, 2, 4, 4), torch.tensor([0, 1, 2, 3, 1])
    sigma = torch.tensor([0.002, 0.1, 1.0, 7.0, 80.0])
    ours_net, reference_net = RawNet(), RawNet()
    ours = EDMPrecond(ours_net, sigma_data)(x, sigma, labels)
    reference = edm_precond_reference(reference_net, x, sigma, labels, sigma_data)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for got, expected in zip(ours_net.calls[0], reference_net.calls[0], strict=True):
        torch.testing.assert_close(got, expected)  # the same c_in x, c_noise and labels reach the net
    assert EDMPrecond(ours_net, sigma_data).null_label == RawNet.null_label


def test_loss_matches_nvlabs_edm_on_the_same_draws():
    x0, labels = torch.randn(6, 2, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(3)
    ours = EDM(p_mean=-1.2, p_std=1.2, sigma_data=0.5, label_dropout=0.0)(RawNet(), x0, labels)
    torch.manual_seed(3)
    precond = EDMPrecond(RawNet(), 0.5)
    reference = edm_loss_reference(precond, x0, labels, P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    torch.testing.assert_close(ours, reference.flatten(1).mean(1))


class PointNet(nn.Module):
    """The raw network whose preconditioned denoiser is exact for data at one point per class:
    D(x, σ) = point[label], so F = (point - c_skip x) / c_out, reading σ back from c_noise."""

    null_label = 2

    def __init__(self, points: torch.Tensor, sigma_data: float):
        super().__init__()
        self.points, self.sigma_data = points, sigma_data

    def forward(self, x_in, c_noise, labels):
        sigma = (4 * c_noise).exp().view(-1, 1, 1, 1)
        total = sigma**2 + self.sigma_data**2
        x = x_in * total.sqrt()  # undo c_in
        c_skip, c_out = self.sigma_data**2 / total, sigma * self.sigma_data / total.sqrt()
        return (self.points[labels] - c_skip * x) / c_out


def test_a_perfect_denoiser_has_zero_loss_and_heun_lands_on_its_point():
    torch.manual_seed(0)
    points = torch.randn(3, 2, 4, 4)  # the null class (2) has a point too: guidance 1 ignores it
    net = PointNet(points, sigma_data=1.0)
    labels = torch.tensor([0, 1, 0, 1])
    loss = EDM(-1.2, 1.2, sigma_data=1.0, label_dropout=0.0)(net, points[labels], labels)
    assert loss.abs().max() < 1e-6
    noise = torch.randn(4, 2, 4, 4)
    for steps in (1, 2, 7):
        landed = edm_heun(EDMPrecond(net, 1.0), noise, labels, steps, schedule=SCHEDULE)
        torch.testing.assert_close(landed, points[labels], atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 18, 100])
def test_rho_schedule_runs_from_sigma_max_down_to_sigma_min_then_zero(steps):
    schedule = SCHEDULE
    sigmas = schedule.sigmas(steps)
    assert len(sigmas) == steps + 1 and sigmas[0] == pytest.approx(80.0) and sigmas[-1] == 0
    assert all(high > low for high, low in zip(sigmas, sigmas[1:], strict=False))
    if steps > 1:
        assert sigmas[-2] == pytest.approx(0.002)
        # NVlabs/edm generate.py's t_steps
        i = torch.arange(steps, dtype=torch.float64)
        reference = (80 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        assert sigmas[:-1] == pytest.approx(reference.tolist())


class CountingGaussian(nn.Module):
    """The exact denoiser of N(mean, std²) data, counting its calls."""

    null_label = 0

    def __init__(self, mean: float = 1.0, std: float = 0.5):
        super().__init__()
        self.mean, self.std, self.calls = mean, std, 0

    def forward(self, x, sigma, labels):
        self.calls += 1
        sigma = sigma.view(-1, *[1] * (x.ndim - 1))
        return self.mean + self.std**2 / (self.std**2 + sigma**2) * (x - self.mean)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_heun_takes_two_net_calls_a_step_but_one_on_the_last(steps, guidance):
    net = CountingGaussian()
    edm_heun(net, torch.randn(3, 2), torch.zeros(3, dtype=torch.long), steps, guidance, schedule=SCHEDULE)
    assert net.calls == 2 * steps - 1  # guidance batches the conditional and null calls


def test_heun_on_a_gaussian_target_gets_its_spread():
    torch.manual_seed(0)
    samples = edm_heun(CountingGaussian(1.0, 0.5), torch.randn(20000, 4), torch.zeros(20000, dtype=torch.long), 32, schedule=SCHEDULE)
    assert samples.std().item() == pytest.approx(0.5, rel=0.03) and samples.mean().item() == pytest.approx(1.0, abs=0.02)


def euler_ode_reference(net, noise, labels, steps):
    """The first-order probability-flow ODE on the ρ-schedule: x += (σ' - σ)(x - D)/σ."""
    sigmas = SCHEDULE.sigmas(steps)
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas, sigmas[1:], strict=False):
        x = x + (sigma_next - sigma) * (x - net(x, torch.full((len(x),), sigma), labels)) / sigma
    return x


def test_reverse_sde_without_churn_is_the_deterministic_euler_sampler():
    torch.manual_seed(0)
    noise, labels = torch.randn(64, 3), torch.zeros(64, dtype=torch.long)
    net = CountingGaussian()
    torch.manual_seed(1)
    no_churn = reverse_sde(net, noise, labels, 12, schedule=SCHEDULE, churn=0.0)
    torch.manual_seed(2)
    assert torch.equal(reverse_sde(net, noise, labels, 12, schedule=SCHEDULE, churn=0.0), no_churn)  # no noise drawn
    torch.testing.assert_close(no_churn, euler_ode_reference(net, noise, labels, 12))


@pytest.mark.parametrize("churn", [None, 40.0])
def test_reverse_sde_is_seed_reproducible_and_gets_a_gaussian_targets_spread(churn):
    noise, labels = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(20000, dtype=torch.long)
    net = CountingGaussian(1.0, 0.5)
    torch.manual_seed(5)
    samples = reverse_sde(net, noise, labels, 128, schedule=SCHEDULE, churn=churn)
    torch.manual_seed(5)
    assert torch.equal(reverse_sde(net, noise, labels, 128, schedule=SCHEDULE, churn=churn), samples)
    torch.manual_seed(6)
    assert not torch.equal(reverse_sde(net, noise, labels, 128, schedule=SCHEDULE, churn=churn), samples)
    assert net.calls == 3 * 128  # one call a step
    assert samples.std().item() == pytest.approx(0.5, rel=0.05) and samples.mean().item() == pytest.approx(1.0, abs=0.02)
    # the noise is fresh: samples are no longer a function of the starting noise
    assert torch.corrcoef(torch.stack([noise.flatten(), samples.flatten()]))[0, 1].abs() < 0.5


def test_edm_params_build_the_objective_and_the_sampler():
    params = DiffusionParams(formulation="edm", edm={"sigma_data": 0.5, "sampler": "sde", "churn": 10.0})
    training = build_denoiser_training(params, latent_channels=2, num_classes=3)
    assert isinstance(training.objective, EDM)
    assert (training.objective.p_mean, training.objective.p_std, training.objective.sigma_data) == (-1.2, 1.2, 0.5)
    denoiser = Denoiser.from_params(training.net, params, (2, 4, 4))
    net, sampler = denoiser.sampling()
    assert isinstance(net, EDMPrecond) and net.sigma_data == 0.5 and net.net is training.net
    assert sampler.func is reverse_sde and sampler.keywords["churn"] == 10.0
    assert sampler.keywords["schedule"] == KarrasSchedule(0.002, 80.0, 7.0)
    assert DiffusionParams().edm.sigma_data == 1.0 and math.isclose(DiffusionParams().edm.p_mean, -1.2)
    with pytest.raises(ParamsError, match="sigma_min must be below sigma_max"):
        validate("diffusion", {"edm": {"sigma_min": 90.0}})


@pytest.mark.slow
def test_dvc_repro_of_a_text_conditioned_edm_teacher_on_a_conditional_vae_scores_heun_the_sde_consistency_and_the_cvae(
    reproduced: Path,
):
    """Off by default, on by params: `diffusion.formulation=edm` with `diffusion.condition=text`,
    `distill.method=consistency` and `fid.samplers=[heun,sde]`, on the latents of a conditional
    InfoVAE (`vae.conditional`), then `dvc repro fid` (one rerun from vae on for the three features:
    CI time). The FID table and chart have the Heun teacher, the reverse-SDE teacher and the
    consistency students, all asked for captions; the guided samples show the class their caption
    names, and the attributes it names, above chance. The conditional VAE's decoded prior for the
    requested classes is a generator, row cvae_prior at NFE 1, that shows them well above chance.
    MMD with kl_weight 0.3: the KL pushes the class out of the latent, so the decoder reads it from
    the label (seen on the smoke profile: 0.55 of 500 samples; 0.42 at kl_weight 1, where the latent
    collapses to the mean image's PSNR; 0.13 for a KL-VAE at the default beta, whose latent keeps
    the class)."""
    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "diffusion.formulation=edm",
         "--set", "diffusion.condition=text", "--set", "distill.method=consistency", "--set", "fid.samplers=[heun,sde]",
         "--set", "vae.regulariser=mmd", "--set", "vae.mmd.kl_weight=0.3", "--set", "vae.conditional=true"], reproduced)
    run(["dvc", "repro", "fid"], reproduced)
    vae = json.loads((reproduced / "metrics/vae.json").read_text())
    assert json.loads((reproduced / "artifacts/vae/vae.json").read_text())["num_classes"] == 10
    fid = json.loads((reproduced / "metrics/fid.json").read_text())
    assert "fid.prior_vs_test" not in fid and fid["images_per_s.cvae_prior"] > 0, fid
    assert fid["request_accuracy.cvae_prior"] > 0.3, fid  # chance: 0.1
    assert fid["train_seconds.cvae"] == vae["train_seconds"]
    students = json.loads((reproduced / "artifacts" / "distill" / "students.json").read_text())
    assert students["method"] == "consistency", students
    for network in ("diffusion/denoiser", "distill/student"):  # the students keep the teacher's caption table
        assert len(json.loads((reproduced / "artifacts" / f"{network}.json").read_text())["captions"]) == 810, network
    for prefix in ("teacher", "teacher_sde", "student"):
        assert any(key.startswith(f"fid.{prefix}.steps_") for key in fid), (prefix, sorted(fid))
    top = max(float(key.rpartition("scale_")[2]) for key in fid if key.startswith("request_accuracy.cfg.scale_"))
    assert fid[f"request_accuracy.cfg.scale_{top:g}"] > 0.3, fid  # the class its caption names; chance 0.1
    agreement = [fid[f"request_attribute.{name}.cfg.scale_{top:g}"] for name in WORDS]
    assert sum(agreement) / len(agreement) > 0.4, agreement  # the words it names; chance 1/3 (smoke: 0.50)
    with open(reproduced / "plots" / "fid" / "fid_vs_nfe.csv") as handle:
        lines = {point["generator"] for point in csv.DictReader(handle)}
    assert {"teacher (heun)", "teacher (sde)", "student", "cvae_prior"} <= lines, lines
    assert run(["dvc", "status", "fid"], reproduced).stdout.strip().endswith("up to date.")
