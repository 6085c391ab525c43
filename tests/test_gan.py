"""The WGAN-GP baseline: its gradient penalty, the critic's and generator's losses and which
network each step updates, the conditional generator; and the stage through `dvc repro`, scored
by the fid stage beside every sampler of the teacher."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from models.gan import WGANGP, Critic, GanConfig, Generator, gradient_penalty
from tasks.gan import update_of
from tasks.params import GanParams
from tests.conftest import run

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = GanConfig(latent_shape=(2, 3, 3), num_classes=4, noise_dim=8, hidden=32, depth=2)


class LinearCritic(nn.Module):
    """score(x) = <w, x>: its gradient is w everywhere."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return latents.flatten(1) @ self.weight


def test_the_penalty_matches_autograd_on_the_interpolates():
    torch.manual_seed(0)
    critic = Critic(CONFIG)
    real, fake, labels = torch.randn(16, *CONFIG.latent_shape), torch.randn(16, *CONFIG.latent_shape), torch.arange(16) % 4
    torch.manual_seed(1)
    penalty = gradient_penalty(critic, real, fake, labels)
    torch.manual_seed(1)
    mix = torch.rand(16, 1, 1, 1)
    reference = []
    for index in range(16):  # one sample at a time, straight from the definition
        point = (mix[index] * real[index] + (1 - mix[index]) * fake[index]).unsqueeze(0).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(point, labels[index : index + 1]).sum(), point)
        reference.append((grad.norm() - 1) ** 2)
    assert penalty.item() == pytest.approx(torch.stack(reference).mean().item(), rel=1e-5)
    assert penalty.requires_grad  # the critic's loss carries it into its gradients


def test_the_penalty_vanishes_for_a_unit_gradient_critic_and_grows_off_it():
    weight = torch.randn(18)
    real, fake, labels = torch.randn(8, 2, 3, 3), torch.randn(8, 2, 3, 3), torch.zeros(8, dtype=torch.long)
    assert gradient_penalty(LinearCritic(weight / weight.norm()), real, fake, labels).item() == pytest.approx(0, abs=1e-10)
    assert gradient_penalty(LinearCritic(3 * weight / weight.norm()), real, fake, labels).item() == pytest.approx(4, rel=1e-5)


def test_the_critic_step_rewards_scoring_real_above_fake_and_touches_only_the_critic():
    """With no penalty, the critic's loss is E[D(fake)] - E[D(real)]: a linear critic along the
    direction real latents sit (all ones, fakes near 0) has a negative loss, and one step lowers it further."""
    torch.manual_seed(0)
    generator = Generator(CONFIG)
    training = WGANGP(generator, LinearCritic(torch.ones(18) / 18**0.5), penalty_weight=0.0, adam_betas=GanParams().adam_betas)
    real, labels = torch.ones(32, *CONFIG.latent_shape) * 3, torch.arange(32) % 4
    with torch.no_grad():
        nn.init.zeros_(generator.out.weight), nn.init.zeros_(generator.out.bias)  # fakes at 0
    outputs = training((real, labels, "critic"))
    assert outputs["loss"].item() == pytest.approx(-3 * 18**0.5, rel=1e-5)
    assert outputs["wasserstein"].item() == pytest.approx(-outputs["loss"].item())
    outputs["loss"].backward()
    assert training.critic.weight.grad is not None
    assert all(p.grad is None for p in generator.parameters())


def test_the_generator_step_raises_the_critic_s_score_of_fakes_and_touches_only_the_generator():
    torch.manual_seed(0)
    training = WGANGP(Generator(CONFIG), Critic(CONFIG), GanParams().penalty_weight, GanParams().adam_betas)
    real, labels = torch.randn(32, *CONFIG.latent_shape), torch.arange(32) % 4
    torch.manual_seed(1)  # the step's noise
    outputs = training((real, labels, "generator"))
    outputs["loss"].backward()
    assert all(p.grad is None for p in training.critic.parameters())
    assert all(p.grad is not None for p in training.generator.parameters())
    torch.optim.SGD(training.generator.parameters(), lr=1e-2).step()
    torch.manual_seed(1)  # the same noise again
    after = training((real, labels, "generator"))["loss"].item()
    assert after < outputs["loss"].item()  # -E[D(G(z))] went down: the fakes score higher


def test_the_conditional_generator_gives_latents_per_class_that_depend_on_the_class():
    generator = Generator(CONFIG).eval()
    noise = torch.randn(1, CONFIG.noise_dim).expand(CONFIG.num_classes, -1)
    latents = generator(noise, torch.arange(CONFIG.num_classes))
    assert latents.shape == (CONFIG.num_classes, *CONFIG.latent_shape)
    assert all(not torch.allclose(latents[0], latents[label]) for label in range(1, CONFIG.num_classes))


def test_five_critic_steps_then_one_generator_step():
    assert [update_of(step, 5) for step in range(12)] == (["critic"] * 5 + ["generator"]) * 2


@pytest.mark.slow
def test_the_smoke_run_scores_the_gan_and_every_sampler_on_one_chart(reproduced):
    """The session's smoke run (gan and fid among its stages): the GAN has a row, each of
    fid.samplers that applies to the (smoke: DDPM) teacher has its rows, and the FID-vs-NFE chart
    holds them all."""
    repo_copy = reproduced
    gan = json.loads((repo_copy / "metrics" / "gan.json").read_text())
    assert gan["steps"] > 0 and gan["generator_steps"] == gan["steps"] // 6 and gan["train_seconds"] > 0
    assert (repo_copy / "plots" / "gan" / "samples.png").is_file()
    assert (repo_copy / "artifacts" / "gan" / "generator.safetensors").is_file()
    fid = json.loads((repo_copy / "metrics" / "fid.json").read_text())
    assert {"fid.gan", "kid.gan", "images_per_s.gan", "train_seconds.gan", "train_seconds.teacher"} <= set(fid)
    for prefix in ("teacher", "teacher_ancestral", "student"):  # smoke: ddim is the teacher's own sampler
        assert any(key.startswith(f"fid.{prefix}.steps_") for key in fid), (prefix, sorted(fid))
    assert not any(key.startswith("fid.teacher_heun.") for key in fid)  # a flow sampler: not for DDPM
    with open(repo_copy / "plots" / "fid" / "fid_vs_nfe.csv") as handle:
        points = list(csv.DictReader(handle))
    lines = {point["generator"] for point in points}
    assert {"gan", "teacher (ddim)", "teacher (ancestral)", "student", "decoded prior", "floor (real train vs test)"} <= lines
    assert [float(p["fid"]) for p in points if p["generator"] == "gan"] == [pytest.approx(fid["fid.gan"], rel=1e-4)]
    assert (repo_copy / "plots" / "fid" / "fid_vs_nfe.png").is_file()
    assert "| gan |" in (repo_copy / "artifacts" / "fid" / "fid_table.md").read_text()
    assert run(["dvc", "status", "gan", "fid"], repo_copy).stdout.strip().endswith("up to date.")


def test_the_teacher_is_scored_with_each_sampler_that_applies_within_its_own_sampler_s_nfe():
    """A flow teacher (Euler, 1 call a step) to 32 steps: Heun (2 a step) at up to 16 steps; DDIM
    is a DDPM sampler and skipped. Rows and the chart's lines are named after the samplers."""
    from flows.fid import nfe_points, teacher_samplers
    from models.unet import UNet, UNetConfig
    from tasks.diffusion import Denoiser
    from tasks.params import FidParams, UNetParams
    from tests.defaults import defaults

    teacher = Denoiser(UNet(UNetConfig(2, 3, **defaults(UNetParams, channels=8, channel_mults=(1,), attention_heads=1))),
                       "flow", "euler", (2, 4, 4))
    rows = teacher_samplers(FidParams(teacher_steps=[1, 2, 4, 8, 16, 32]), teacher)
    assert [(prefix, denoiser.sampler, steps) for prefix, denoiser, steps in rows] == [
        ("teacher", "euler", [1, 2, 4, 8, 16, 32]), ("teacher_heun", "heun", [1, 2, 4, 8, 16])]
    assert [rows[1][1].evaluations(n) for n in rows[1][2]] == [2, 4, 8, 16, 32]

    scored = {"floor_train_vs_test": {"fid": 0.1}, "prior_vs_test": {"fid": 7.0, "nfe": 0},
              "gan": {"fid": 2.0, "images_per_s": 9000.0, "nfe": 1},
              "teacher.steps_4": {"fid": 0.5, "images_per_s": 100.0, "nfe": 4},
              "teacher_heun.steps_2": {"fid": 0.4, "images_per_s": 100.0, "nfe": 4}}
    points = nfe_points(scored, "euler")
    assert {(p["generator"], p["nfe"], p["fid"]) for p in points} == {
        ("gan", 1, 2.0), ("teacher (euler)", 4, 0.5), ("teacher (heun)", 4, 0.4),
        ("decoded prior", 1, 7.0), ("decoded prior", 4, 7.0),
        ("floor (real train vs test)", 1, 0.1), ("floor (real train vs test)", 4, 0.1)}
