"""The generative models/ half: U-Net, DiT, diffusion objectives, samplers, distillation, VAE, FID.

Denoisers are checked against closed forms where one exists (a Gaussian's exact denoiser) and
trained where the objective itself is under test (a small MLP on a 2-D Gaussian mixture).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from models.diffusion import DDPM, CosineSchedule, DenoiserTraining, RectifiedFlow, drop_labels
from models.distill import ProgressiveDistillation, ReflowTraining, make_reflow_pairs
from models.dit import DiT, DiTConfig
from models.fid import FeatureExtractor, feature_statistics, frechet_distance
from models.samplers import ddim, ddpm_ancestral, euler, guided, heun
from models.unet import UNet, UNetConfig, timestep_embedding
from models.vae import VAE, PatchDiscriminator, VAEConfig, VAETraining
from tasks.params import DiTParams, UNetParams
from tests.defaults import defaults, vae_training

pytestmark = pytest.mark.usefixtures("one_thread")


# -- exact denoisers of a Gaussian N(mean, diag(std²)); std = 0 is a point mass ---------------


class GaussianVelocity(nn.Module):
    """E[noise - x0 | x_t] for x_t = (1 - t) x0 + t noise."""

    null_label = 0

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x, t, labels):
        t = t[:, None]
        variance = (1 - t) ** 2 * self.std**2 + t**2
        centred = x - (1 - t) * self.mean
        return t * centred / variance - (self.mean + (1 - t) * self.std**2 * centred / variance)


class GaussianEpsilon(nn.Module):
    """E[eps | x_t] for x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""

    null_label = 0

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, schedule: CosineSchedule | None = None):
        super().__init__()
        self.mean, self.std, self.schedule = mean, std, schedule or CosineSchedule()

    def forward(self, x, t, labels):
        alpha_bar = self.schedule.alpha_bar(t)[:, None]
        centred = x - alpha_bar.sqrt() * self.mean
        return (1 - alpha_bar).sqrt() * centred / (alpha_bar * self.std**2 + 1 - alpha_bar)


GAUSSIAN_MEAN, GAUSSIAN_STD = torch.tensor([2.0, -1.0]), torch.tensor([0.3, 0.6])


@pytest.mark.parametrize(
    ("net", "sampler", "steps"),
    [
        (GaussianVelocity(GAUSSIAN_MEAN, GAUSSIAN_STD), euler, 200),
        (GaussianVelocity(GAUSSIAN_MEAN, GAUSSIAN_STD), heun, 20),
        (GaussianEpsilon(GAUSSIAN_MEAN, GAUSSIAN_STD), ddim, 200),
        (GaussianEpsilon(GAUSSIAN_MEAN, GAUSSIAN_STD), ddpm_ancestral, 500),
    ],
    ids=["euler", "heun", "ddim", "ddpm_ancestral"],
)
def test_samplers_reproduce_a_gaussian_from_its_exact_denoiser(net, sampler, steps):
    torch.manual_seed(0)
    noise = torch.randn(20_000, 2)
    samples = sampler(net, noise, torch.zeros(len(noise), dtype=torch.long), steps)
    # DDIM keeps the sqrt(alpha_bar_min) of signal that starting from pure noise leaves out: ~0.02 here
    torch.testing.assert_close(samples.mean(0), GAUSSIAN_MEAN, atol=0.03, rtol=0)
    torch.testing.assert_close(samples.std(0), GAUSSIAN_STD, atol=0, rtol=0.03)


def test_one_step_samplers_land_on_a_point_mass():
    point = torch.tensor([1.5, -0.5])
    noise, labels = torch.randn(64, 2), torch.zeros(64, dtype=torch.long)
    samples = euler(GaussianVelocity(point, torch.zeros(2)), noise, labels, 1)
    torch.testing.assert_close(samples, point.expand(64, 2))
    for sampler in (ddim, ddpm_ancestral):
        samples = sampler(GaussianEpsilon(point, torch.zeros(2)), noise, labels, 1)
        torch.testing.assert_close(samples, point.expand(64, 2), atol=1e-4, rtol=0)


class LabelEcho(nn.Module):
    """Outputs its label everywhere: conditional = label, unconditional = null_label."""

    null_label = 7

    def forward(self, x, t, labels):
        return labels.float().view(-1, 1).expand_as(x)


def test_guidance_extrapolates_from_the_unconditional_output():
    x, labels = torch.zeros(4, 3), torch.tensor([0, 1, 2, 3])
    conditional = labels.float().view(-1, 1).expand(4, 3)
    torch.testing.assert_close(guided(LabelEcho(), x, 0.5, labels, 3.0), 7 + 3.0 * (conditional - 7))
    torch.testing.assert_close(guided(LabelEcho(), x, 0.5, labels, 1.0), conditional)


def test_label_dropout_swaps_in_the_null_class_at_its_rate():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20_000,))
    dropped = drop_labels(labels, null_label=10, probability=0.2)
    changed = dropped != labels
    assert (dropped[changed] == 10).all()
    assert abs(changed.float().mean().item() - 0.2) < 0.01
    assert torch.equal(drop_labels(labels, 10, 0.0), labels)


# -- objectives trained on a class-conditional 2-D Gaussian mixture ------------------------

MIXTURE_MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
MIXTURE_STDS = torch.tensor([[0.3, 0.3], [0.5, 0.2], [0.2, 0.6]])
NULL = len(MIXTURE_MEANS)


class MixtureDenoiser(nn.Module):
    """net(x, t, labels) for 2-D points: an MLP on x, time features and a class embedding."""

    def __init__(self, num_classes: int = NULL, hidden: int = 128):
        super().__init__()
        self.null_label = num_classes
        self.input = nn.Linear(2 + 32, hidden)
        self.class_embedding = nn.Embedding(num_classes + 1, hidden)
        self.body = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x, t, labels):
        features = self.input(torch.cat([x, timestep_embedding(t, 32)], 1))
        return self.body(features + self.class_embedding(labels))


def sample_mixture(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, NULL, (n,))
    return MIXTURE_MEANS[labels] + MIXTURE_STDS[labels] * torch.randn(n, 2), labels


def train_on_mixture(objective, steps: int = 2000) -> nn.Module:
    torch.manual_seed(0)
    training = DenoiserTraining(MixtureDenoiser(), objective)
    optimizer = torch.optim.Adam(training.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        loss = training(sample_mixture(256))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return training.net.eval()


def sample_per_class(net, sampler, steps: int, per_class: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of each class and of the null class (the whole mixture)."""
    torch.manual_seed(1)
    labels = torch.arange(NULL + 1).repeat_interleave(per_class)
    return sampler(net, torch.randn(len(labels), 2), labels, steps), labels


def assert_recovers_mixture(samples: torch.Tensor, labels: torch.Tensor):
    for label in range(NULL):
        of_class = samples[labels == label]
        torch.testing.assert_close(of_class.mean(0), MIXTURE_MEANS[label], atol=0.1, rtol=0)
        torch.testing.assert_close(of_class.std(0), MIXTURE_STDS[label], atol=0, rtol=0.12)
    unconditional = samples[labels == NULL]
    torch.testing.assert_close(unconditional.mean(0), MIXTURE_MEANS.mean(0), atol=0.2, rtol=0)


@pytest.fixture(scope="module")
def flow_net():
    # a wider logit-normal than the default: the narrow clusters need t near 0 trained too
    return train_on_mixture(RectifiedFlow(time_mean=0.0, time_std=1.6, label_dropout=0.1))


@pytest.fixture(scope="module")
def ddpm_net():
    # DDIM's deterministic path forgives less of the eps error than the flow's: train longer
    return train_on_mixture(DDPM(label_dropout=0.1), steps=3000)


@pytest.mark.parametrize(("sampler", "steps"), [(euler, 100), (heun, 50)], ids=["euler", "heun"])
def test_rectified_flow_recovers_the_mixture(flow_net, sampler, steps):
    assert_recovers_mixture(*sample_per_class(flow_net, sampler, steps))


def test_ddpm_recovers_the_mixture_and_ddim_matches_ancestral(ddpm_net):
    samples_ddim, labels = sample_per_class(ddpm_net, ddim, 100)
    samples_ancestral, _ = sample_per_class(ddpm_net, ddpm_ancestral, 300)
    assert_recovers_mixture(samples_ddim, labels)
    assert_recovers_mixture(samples_ancestral, labels)
    for label in range(NULL):
        of_ddim, of_ancestral = samples_ddim[labels == label], samples_ancestral[labels == label]
        torch.testing.assert_close(of_ddim.mean(0), of_ancestral.mean(0), atol=0.1, rtol=0)
        torch.testing.assert_close(of_ddim.std(0), of_ancestral.std(0), atol=0, rtol=0.12)


# -- distillation --------------------------------------------------------------------------


class TwoStepDDIMStudent(nn.Module):
    """The ideal one-step student: the eps whose x0 is the teacher's two-step DDIM sample."""

    def __init__(self, teacher: nn.Module, schedule: CosineSchedule):
        super().__init__()
        self.teacher, self.schedule = teacher, schedule
        self.null_label = teacher.null_label
        self.unused = nn.Parameter(torch.zeros(()))  # something for the optimiser and autograd to hold

    def forward(self, x, t, labels):
        assert torch.all(t == 1), "a one-step student is only asked at t = 1"
        x0 = ddim(self.teacher, x, labels, 2, schedule=self.schedule)
        alpha_bar = self.schedule.alpha_bar(t)[:, None]
        return (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt() + 0 * self.unused


def test_progressive_distillation_targets_two_teacher_steps():
    torch.manual_seed(0)
    schedule = CosineSchedule()
    teacher = GaussianEpsilon(GAUSSIAN_MEAN, GAUSSIAN_STD, schedule)
    batch = (GAUSSIAN_MEAN + GAUSSIAN_STD * torch.randn(512, 2), torch.zeros(512, dtype=torch.long))
    ideal = ProgressiveDistillation(teacher, TwoStepDDIMStudent(teacher, schedule), 1, 0.1, schedule)
    assert ideal(batch)["loss"].item() < 1e-6
    # the teacher as its own one-step student is off: two DDIM steps are not one on a Gaussian
    naive = ProgressiveDistillation(teacher, copy.deepcopy(teacher), 1, 0.1, schedule)
    assert naive(batch)["loss"].item() > 1e-2


def test_progressive_distillation_trains_only_the_student_and_halves_its_steps():
    torch.manual_seed(0)
    teacher = MixtureDenoiser()
    distillation = ProgressiveDistillation(teacher, copy.deepcopy(teacher), student_steps=4, label_dropout=0.1)
    distillation.train()
    assert not distillation.teacher.training
    distillation(sample_mixture(64))["loss"].backward()
    assert all(param.grad is None for param in distillation.teacher.parameters())
    assert all(param.grad is not None for param in distillation.student.parameters())
    following = distillation.next_round()
    assert following.student_steps == 2 and following.teacher is distillation.student
    assert not any(param.requires_grad for param in following.teacher.parameters())
    assert all(param.requires_grad for param in following.student.parameters())


def test_reflow_pairs_come_from_the_teacher_and_straight_paths_train_a_student():
    torch.manual_seed(0)
    point = torch.tensor([1.5, -0.5])
    teacher = GaussianVelocity(point, torch.zeros(2))
    labels = torch.zeros(300, dtype=torch.long)
    noise, samples = make_reflow_pairs(teacher, euler, labels, (2,), steps=1, guidance=1.0, batch_size=128)
    assert noise.shape == samples.shape == (300, 2)
    torch.testing.assert_close(samples, point.expand(300, 2))
    assert noise.std().item() == pytest.approx(1.0, abs=0.1)
    # the point mass's straight paths are its exact flow, so the exact velocity scores zero
    assert ReflowTraining(teacher, RectifiedFlow(0.0, 1.0, 0.1))((noise, samples, labels))["loss"].item() < 1e-8
    student = MixtureDenoiser(num_classes=1)
    assert ReflowTraining(student, RectifiedFlow(0.0, 1.0, 0.1))((noise, samples, labels))["loss"].item() > 0.1


def test_reflow_straightens_the_flow_for_one_step_sampling(flow_net):
    torch.manual_seed(0)
    labels = torch.randint(0, NULL + 1, (4096,))
    noise, samples = make_reflow_pairs(flow_net, euler, labels, (2,), steps=32, guidance=1.0, batch_size=256)
    student = copy.deepcopy(flow_net).train()
    reflow = ReflowTraining(student, RectifiedFlow(time_mean=0.0, time_std=1.6, label_dropout=0.1))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(800):
        batch = torch.randint(0, len(labels), (256,))
        loss = reflow((noise[batch], samples[batch], labels[batch]))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student.eval()
    # one Euler step of the curved teacher collapses each class towards its mean; the student's does not
    teacher_samples, sample_labels = sample_per_class(flow_net, euler, 1)
    student_samples, _ = sample_per_class(student, euler, 1)
    for label in range(NULL):
        teacher_ratio = teacher_samples[sample_labels == label].std(0) / MIXTURE_STDS[label]
        of_class = student_samples[sample_labels == label]
        student_ratio = of_class.std(0) / MIXTURE_STDS[label]
        assert teacher_ratio.max() < 0.4 and student_ratio.min() > 0.5, (teacher_ratio, student_ratio)
        torch.testing.assert_close(of_class.mean(0), MIXTURE_MEANS[label], atol=0.15, rtol=0)


# -- U-Net ---------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [2, 4, 8])
def test_unet_output_matches_input_shape(grid):
    config = UNetConfig(in_channels=4, num_classes=10, **UNetParams().model_dump())
    net = UNet(UNetConfig(**json.loads(json.dumps(dataclasses.asdict(config)))))  # rebuilt from JSON
    assert net.config == config
    x = torch.randn(3, 4, grid, grid)
    output = net(x, torch.rand(3), torch.tensor([0, 9, net.null_label]))
    assert output.shape == x.shape
    output.square().mean().backward()
    assert all(param.grad is not None for param in net.parameters())


# -- DiT -----------------------------------------------------------------------------------


def tiny_dit(**changes) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(in_channels=4, num_classes=10, **defaults(DiTParams, **{"dim": 32, "depth": 2, "heads": 2, **changes})))


def test_every_dit_block_is_the_identity_at_init_and_the_dit_outputs_zero():
    """adaLN-Zero (Peebles & Xie 2023): the modulation MLP starts at zero, so every gate is 0 and
    each block returns its input exactly; the final layer starts at zero too."""
    net = DiT(DiTConfig(in_channels=4, num_classes=10, **DiTParams().model_dump()))
    torch.manual_seed(1)
    tokens, condition = 3 * torch.randn(5, 4, net.config.dim), torch.randn(5, net.config.dim)
    for block in net.blocks:
        assert torch.equal(block(tokens, condition), tokens)
    x = torch.randn(5, 4, 4, 4)
    output = net(x, torch.rand(5), torch.tensor([0, 3, 9, net.null_label, 1]))
    assert output.shape == x.shape and torch.equal(output, torch.zeros_like(x))


@pytest.mark.parametrize(("patch_size", "grid"), [(1, 4), (2, 4), (2, 8), (4, 8)])
def test_dit_unpatchify_puts_each_token_back_where_patchify_took_it(patch_size, grid):
    """With no blocks, tokens never mix: changing one input patch changes that output patch only.
    Rebuilt from its config's JSON, it is the same net."""
    net = tiny_dit(patch_size=patch_size, depth=0)
    nn.init.normal_(net.output.weight)  # the zero-initialised output layer, made to pass tokens on
    config = json.loads(json.dumps(dataclasses.asdict(net.config)))
    assert DiT(DiTConfig(**config)).config == net.config
    x, t, labels = torch.randn(2, 4, grid, grid), torch.rand(2), torch.tensor([1, 10])
    changed = x.clone()
    changed[:, :, :patch_size, -patch_size:] += 1  # the top-right patch
    difference = (net(changed, t, labels) - net(x, t, labels)).abs().sum(dim=(0, 1))
    inside = torch.zeros(grid, grid, dtype=torch.bool)
    inside[:patch_size, -patch_size:] = True
    assert difference[inside].min() > 0 and difference[~inside].max() == 0
    if patch_size > 1:
        with pytest.raises(ValueError, match="not a multiple of DiT patch_size"):
            net(torch.randn(1, 4, grid + 1, grid + 1), t[:1], labels[:1])


def test_dit_learns_class_conditioning_from_its_zero_start():
    """At init every class (and the null class) gets the same output, zero; a few optimiser steps
    towards a target per class, from one input, open the gates: the classes' outputs part."""
    net = tiny_dit()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, t = torch.randn(1, 4, 4, 4).expand(4, -1, -1, -1), torch.full((4,), 0.5)
    labels = torch.tensor([0, 1, 2, 3])  # the label is all that tells the targets apart
    target = labels.float().view(-1, 1, 1, 1).expand_as(x) - 1.5
    probe_labels = torch.tensor([0, 3, net.null_label])

    def probe() -> torch.Tensor:
        with torch.no_grad():
            return net(x[:3], t[:3], probe_labels)

    assert torch.equal(probe(), torch.zeros(3, 4, 4, 4))
    losses = []
    for _ in range(60):
        loss = F.mse_loss(net(x, t, labels), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], losses
    class_0, class_3, null = probe()
    assert (class_3 - class_0).mean() > 2.5 and not torch.allclose(null, class_0)


# -- VAE -----------------------------------------------------------------------------------


def test_vae_kl_is_the_closed_form():
    mean, logvar = torch.randn(5, 4, 2, 2), torch.randn(5, 4, 2, 2)
    posterior = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(posterior, prior).flatten(1).sum(1)
    torch.testing.assert_close(VAE.kl(mean, logvar), expected)


def digits_16x16() -> torch.Tensor:
    images = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16 * 2 - 1
    return F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)


def test_vae_reconstruction_loss_falls_on_digits():
    torch.manual_seed(0)
    images = digits_16x16()
    training = vae_training(VAE(VAEConfig(1, 4, downsample=4, width=8, codebook_size=0)))
    optimizer = torch.optim.Adam(training.parameters(), lr=3e-3)
    recon = []
    for step in range(150):
        outputs = training(unlabelled(images[torch.randint(0, len(images), (32,))]))
        optimizer.zero_grad()
        outputs["loss"].backward()
        optimizer.step()
        training.after_step(step, 150)
        recon.append(outputs["recon"].item())
    first, last = sum(recon[:10]) / 10, sum(recon[-20:]) / 20
    assert last < 0.4 * first, (first, last)
    mean, _ = training.vae.encode(images[:8])
    assert mean.shape == (8, 4, 4, 4)


def unlabelled(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of an unconditional VAE, which ignores the labels: class 0 for each image."""
    return images, torch.zeros(len(images), dtype=torch.long)


def small_vae_training(**kwargs) -> VAETraining:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(1, 4, downsample=2, width=8, codebook_size=0))
    return vae_training(vae, discriminator=PatchDiscriminator(1, width=8, layers=2), **kwargs)


def test_one_backward_gives_the_discriminator_only_its_hinge_and_the_vae_only_the_adversarial_term():
    training = small_vae_training(adv_weight=0.5)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.manual_seed(1)
    outputs = training(unlabelled(images))
    vae_params, disc_params = list(training.vae.parameters()), list(training.discriminator.parameters())

    def grads(value, params):
        found = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(found, params, strict=True)]

    assert all(g.abs().max() == 0 for g in grads(outputs["adv"], disc_params))
    assert all(g.abs().max() == 0 for g in grads(outputs["disc"], vae_params))
    # what reaches the VAE is the adversarial gradient through the live discriminator
    torch.manual_seed(1)  # the same posterior sample as the forward above
    reconstructions = training.vae.decode(training.vae.sample(*training.vae.encode(images)))
    live_adv = -training.discriminator(reconstructions).mean()
    for detached, live in zip(grads(outputs["adv"], vae_params), grads(live_adv, vae_params), strict=True):
        torch.testing.assert_close(detached, live)

    expected_disc = grads(outputs["disc"], disc_params)
    expected_vae = grads(outputs["loss"] - outputs["disc"], vae_params)
    outputs["loss"].backward()  # the training loop's single backward
    for param, expected in zip(disc_params, expected_disc, strict=True):
        torch.testing.assert_close(param.grad, expected)
    for param, expected in zip(vae_params, expected_vae, strict=True):
        torch.testing.assert_close(param.grad, expected)


def test_adversarial_terms_wait_for_the_warmup_and_the_step_is_saved():
    training = small_vae_training(adv_warmup_steps=3)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    before = training(unlabelled(images))
    assert before["adv"].item() == 0 and before["disc"].item() == 0
    before["loss"].backward()
    assert all(param.grad is None for param in training.discriminator.parameters())
    training.after_step(2, 10)  # the third optimizer step is done
    assert training.state_dict()["steps_done"].item() == 3
    after = training(unlabelled(images))
    assert after["disc"].item() > 0 and after["adv"].item() != 0
    resumed = small_vae_training(adv_warmup_steps=3)  # a checkpoint restores the host-side switch too
    assert not resumed.adversarial_active
    resumed.load_state_dict(training.state_dict())
    assert resumed.adversarial_active and resumed(unlabelled(images))["disc"].item() > 0


class FrozenFeatures(nn.Module):
    """A stand-in for the frozen SSL encoder, with batch norm to catch a switch to train mode."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())

    def forward(self, images):
        return self.layers(images)


def test_perceptual_loss_trains_the_vae_through_a_frozen_encoder():
    encoder = FrozenFeatures()
    statistics = copy.deepcopy(encoder.layers[1].running_mean)
    training = vae_training(VAE(VAEConfig(1, 4, downsample=2, width=8, codebook_size=0)), feature_fn=encoder, perceptual_weight=1.0)
    training.train()
    assert not encoder.training
    outputs = training(unlabelled(torch.rand(4, 1, 16, 16) * 2 - 1))
    assert outputs["perceptual"].item() > 0
    outputs["perceptual"].backward()
    assert all(param.grad is None for param in encoder.parameters())
    assert any(param.grad is not None and param.grad.abs().max() > 0 for param in training.vae.parameters())
    torch.testing.assert_close(encoder.layers[1].running_mean, statistics)


# -- FID -----------------------------------------------------------------------------------


def feature_extractor() -> FeatureExtractor:
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 12)
    )
    return FeatureExtractor(encoder, image_shape=(1, 16, 16))


def digits_in_unit_range() -> torch.Tensor:
    return (digits_16x16() + 1) / 2


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    torch.manual_seed(0)
    extractor, images = feature_extractor(), digits_in_unit_range()
    reference = feature_statistics(extractor(images))
    assert abs(frechet_distance(*reference, *reference)) < 1e-6
    distances = []
    for level in (0.05, 0.1, 0.2, 0.4, 0.8):
        noisy = (images + level * torch.randn_like(images)).clamp(0, 1)
        distances.append(frechet_distance(*reference, *feature_statistics(extractor(noisy))))
    assert distances[0] > 0 and all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_torchmetrics_fid_with_the_wrapper_matches_frechet_distance():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    torch.manual_seed(0)
    extractor, images = feature_extractor(), digits_in_unit_range()
    real, fake = images[:900], (images[900:] + 0.1 * torch.randn_like(images[900:])).clamp(0, 1)
    metric = FrechetInceptionDistance(feature=extractor, normalize=True)
    assert metric.inception is extractor and extractor.num_features == 12
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = frechet_distance(*feature_statistics(extractor(real)), *feature_statistics(extractor(fake)))
    assert metric.compute().item() == pytest.approx(expected, rel=1e-3)

    metric.train()  # torchmetrics' modes must not reach the frozen encoder
    assert not extractor.training
    # uint8 images (normalize=False) give the same features as floats in [0, 1]
    as_uint8 = (real[:16] * 255).round().to(torch.uint8)
    torch.testing.assert_close(extractor(as_uint8), extractor(as_uint8.float() / 255))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extractor(real * 2 - 1)

    kid = KernelInceptionDistance(feature=extractor, subset_size=100, subsets=10, normalize=True)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    kid_mean, _ = kid.compute()
    assert torch.isfinite(kid_mean)
