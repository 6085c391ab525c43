"""Classifier guidance (models/guidance.py, tasks/guidance.py): the output shift per formulation
against the score it implies, its direction on a toy logistic classifier, s = 0 as unguided
sampling, the noise-aware classifier's training and export, and the fid stage's guidance params."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from models.diffusion import CosineSchedule, EDMPrecond
from models.guidance import (
    FLOW_MIN_SIGNAL,
    ClassifierGuided,
    NoiseLevels,
    NoisyClassification,
)
from tasks.diffusion import Denoiser, balanced_labels
from tasks.guidance import (
    build_classifier_training,
    classifier_guided,
    export_classifier,
    load_classifier,
)
from tasks.params import DiffusionParams, FidParams, ParamsError, validate
from tests.test_generative_stages import EDM_SETTINGS, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 4, 4)
FLOW_TIME = {"time_mean": 0.0, "time_std": 1.0}
FORMULATIONS = {"flow": ("euler", {}), "ddpm": ("ddim", {}), "edm": ("heun", EDM_SETTINGS)}


class ToyLogistic(nn.Module):
    """Two classes, logits (w·x, -w·x) whatever the noise level: ∇_x log p(y | x) points along +w
    for class 0 and -w for class 1."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.direction = nn.Parameter(torch.randn(math.prod(SHAPE), generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.direction
        return torch.stack([score, -score], dim=1)


class Flat(nn.Module):
    """Logits that depend on the noise level only: a zero gradient in x."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t.float(), -t.float()], dim=1) + 0 * x.flatten(1)[:, :1]


def denoiser(formulation: str) -> Denoiser:
    sampler, edm = FORMULATIONS[formulation]
    return Denoiser(tiny_unet(SHAPE[0], num_classes=2).eval(), formulation, sampler, SHAPE, FLOW_TIME, edm)


def net_and_levels(formulation: str) -> tuple[nn.Module, NoiseLevels, torch.Tensor]:
    """What the sampler calls, the formulation's noise levels and a batch of levels it visits."""
    net = denoiser(formulation).net
    if formulation == "edm":
        return EDMPrecond(net, 1.0), NoiseLevels("edm", sigmas={"sigma_data": 1.0, "sigma_min": 0.002, "sigma_max": 80.0}), torch.tensor([80.0, 5.0, 0.5, 0.01])
    return net, NoiseLevels(formulation), torch.tensor([1.0, 0.7, 0.3, 0.05])


def predicted_x0(formulation: str, output: torch.Tensor, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The clean latent each formulation's output implies."""
    level = level.view(-1, 1, 1, 1)
    if formulation == "flow":
        return x - level * output
    if formulation == "ddpm":
        alpha_bar = CosineSchedule().alpha_bar(level)
        return (x - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
    return output


def score_of(formulation: str, output: torch.Tensor, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """∇log p_t(x) from the net's output, the textbook way: E[ε | x] / the noise's weight."""
    level = level.view(-1, 1, 1, 1)
    if formulation == "flow":
        return -(x + (1 - level) * output) / level
    if formulation == "ddpm":
        return -output / (1 - CosineSchedule().alpha_bar(level)).sqrt()
    return (output - x) / level.square()


def output_of(formulation: str, score: torch.Tensor, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """score_of's inverse."""
    level = level.view(-1, 1, 1, 1)
    if formulation == "flow":
        return (-level * score - x) / (1 - level)
    if formulation == "ddpm":
        return -(1 - CosineSchedule().alpha_bar(level)).sqrt() * score
    return x + level.square() * score


@pytest.mark.parametrize("formulation", list(FORMULATIONS))
def test_a_classifier_with_no_gradient_leaves_the_output_exactly_as_it_was(formulation):
    net, levels, level = net_and_levels(formulation)
    x, labels = torch.randn(4, *SHAPE), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        plain = net(x, level, labels).float()
        assert torch.equal(ClassifierGuided(net, Flat(), levels, scale=5.0)(x, level, labels), plain)
        assert torch.equal(ClassifierGuided(net, ToyLogistic(), levels, scale=0.0)(x, level, labels), plain)


@pytest.mark.parametrize("formulation", list(FORMULATIONS))
def test_the_guided_output_is_the_one_that_score_plus_s_times_the_gradient_implies(formulation):
    net, levels, level = net_and_levels(formulation)
    if formulation == "flow":
        level = level.clamp(max=1 - FLOW_MIN_SIGNAL)  # the textbook route divides by 1 - t
    x, labels, classifier, scale = torch.randn(4, *SHAPE), torch.tensor([0, 1, 0, 1]), ToyLogistic(), 2.5
    with torch.no_grad():
        plain = net(x, level, labels).float()
        guided = ClassifierGuided(net, classifier, levels, scale)(x, level, labels)
    x_in = x.clone().requires_grad_(True)
    classifier_x, classifier_t = levels.classifier_input(x_in, level)
    log_p = torch.log_softmax(classifier(classifier_x, classifier_t), 1).gather(1, labels[:, None]).sum()
    (gradient,) = torch.autograd.grad(log_p, x_in)
    expected = output_of(formulation, score_of(formulation, plain, x, level) + scale * gradient, x, level)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("formulation", list(FORMULATIONS))
def test_classifier_guidance_moves_the_predicted_sample_towards_the_requested_class(formulation):
    """On a toy logistic classifier the guidance term shifts the clean latent the output implies
    along the requested class's direction (+w for class 0, -w for class 1): a positive dot product
    at every level, and a larger one at a larger scale."""
    net, levels, level = net_and_levels(formulation)
    x, labels, classifier = torch.randn(4, *SHAPE), torch.tensor([0, 1, 0, 1]), ToyLogistic()
    class_direction = classifier.direction.detach() * (1 - 2 * labels[:, None].float())
    with torch.no_grad():
        plain = predicted_x0(formulation, net(x, level, labels).float(), x, level)
        shifts = [
            (predicted_x0(formulation, ClassifierGuided(net, classifier, levels, scale)(x, level, labels), x, level) - plain)
            .flatten(1).mul(class_direction).sum(1)
            for scale in (1.0, 4.0)
        ]
    assert (shifts[0] > 0).all() and (shifts[1] > shifts[0]).all(), shifts


@pytest.mark.parametrize("formulation", list(FORMULATIONS))
def test_classifier_guided_sampling_at_scale_0_is_unguided_sampling_and_above_it_follows_the_classifier(formulation):
    # 16 steps: at 4, EDM's first Heun step (σ 80 to 9.7) overshoots. The toy's gradient is not a
    # noise-aware classifier's (which fades at high σ), and the Euler predictor's push lands where the
    # toy is already certain, so the corrector's slope, without the push, undoes it and more
    steps = 16
    teacher, classifier, labels = denoiser(formulation), ToyLogistic(), balanced_labels(16, 2)
    plain = teacher.sample(labels, steps=steps, guidance=1.0, seed=3)
    assert torch.equal(classifier_guided(teacher, classifier, 0.0).sample(labels, steps, 1.0, seed=3), plain)
    guided = classifier_guided(teacher, classifier, 2.0).sample(labels, steps, 1.0, seed=3)

    def log_p(latents: torch.Tensor) -> float:
        return torch.log_softmax(classifier(latents, torch.zeros(len(latents))), 1).gather(1, labels[:, None]).mean().item()

    assert log_p(guided) > log_p(plain) + 0.1, (log_p(guided), log_p(plain))
    both = classifier_guided(teacher, classifier, 2.0).sample(labels, steps, guidance=2.0, seed=3)  # with CFG on top
    assert torch.isfinite(both).all()


def toy_latents(count: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes, each a Gaussian around its own mean latent."""
    generator = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(10, *SHAPE, generator=generator)
    labels = torch.arange(count) % 10
    return means[labels] + 0.5 * torch.randn(count, *SHAPE, generator=generator), labels


@pytest.mark.parametrize("formulation", list(FORMULATIONS))
def test_the_noise_aware_classifier_learns_below_chance_loss(formulation):
    torch.manual_seed(0)
    params = DiffusionParams(formulation=formulation, classifier={"epochs": 1, "channels": 16})
    training = build_classifier_training(params, SHAPE[0], num_classes=10)
    assert isinstance(training, NoisyClassification) and training.levels.formulation == formulation
    latents, labels = toy_latents()
    optimizer = torch.optim.AdamW(training.parameters(), lr=3e-3)
    for step in range(150):
        rows = torch.randint(len(latents), (64,), generator=torch.Generator().manual_seed(step))
        loss = training((latents[rows], labels[rows]))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = training((latents, labels))["loss"].item()
    assert final < math.log(10) - 0.5, final  # noised at levels spread over the whole schedule: never 0


def test_the_classifier_is_exported_beside_the_denoiser_and_rebuilt_identically(tmp_path):
    assert load_classifier(tmp_path) is None  # diffusion.classifier.epochs 0: no file, no guidance
    torch.manual_seed(0)
    classifier = build_classifier_training(DiffusionParams(classifier={"epochs": 1, "channels": 8}), 2, 10).classifier.eval()
    export_classifier(classifier, tmp_path)
    loaded = load_classifier(tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, t = torch.randn(5, *SHAPE), torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), classifier(x, t))


def test_guidance_params_default_off_and_refuse_bad_scales():
    assert DiffusionParams().classifier.epochs == 0
    train = DiffusionParams(classifier={"epochs": 2, "lr": 2e-3}).classifier.train()
    assert (train.epochs, train.lr, train.ema_decay) == (2, 2e-3, None)
    assert FidParams().guidance.cfg_scales == [1.0, 2.0, 4.0]
    with pytest.raises(ParamsError, match="cfg_scales must be >= 1"):
        validate("fid", {"guidance": {"cfg_scales": [0.5]}})
    with pytest.raises(ParamsError, match="classifier_scales >= 0"):
        validate("fid", {"guidance": {"classifier_scales": [-1]}})


def assert_classifier_guidance_scored(reproduced: Path) -> None:
    """After `dvc repro fid` with the classifier on (`diffusion.classifier.epochs` > 0; run by
    tests/test_generative_stages.py's DiT test, which shares its diffusion and fid reruns): the
    diffusion stage exported its classifier, and the fid stage scored request-following for CFG and
    classifier guidance at each of the profile's scales, with FID, in metrics, CSV and plots."""
    assert (reproduced / "artifacts/diffusion/classifier.safetensors").is_file()
    assert json.loads((reproduced / "metrics/diffusion.json").read_text())["classifier.steps"] > 0
    guidance = yaml.safe_load((reproduced / "params/fid.yaml").read_text())["guidance"]
    scales = {"cfg": guidance["cfg_scales"], "classifier": guidance["classifier_scales"]}
    assert scales["classifier"], scales
    metrics = json.loads((reproduced / "metrics/fid.json").read_text())
    assert 0.5 < metrics["request_accuracy.real_test"] <= 1, metrics  # the judge: the probe on real test images
    for kind, kind_scales in scales.items():
        for scale in kind_scales:
            name = f"{kind}.scale_{scale:g}"
            assert 0 <= metrics[f"request_accuracy.{name}"] <= 1 and metrics[f"request_fid.{name}"] > 0, name
            assert metrics[f"request_images_per_s.{name}"] > 0, name
    with open(reproduced / "plots/fid/guidance.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["series"], float(row["scale"])) for row in rows) == sorted(
        (kind, float(scale)) for kind, kind_scales in scales.items() for scale in kind_scales)
    classifier_rows = [row for row in rows if row["series"] == "classifier"]
    assert all(int(row["classifier_evaluations"]) > 0 and int(row["denoiser_evaluations"]) == int(row["steps"])
               for row in classifier_rows), classifier_rows  # DDIM: a denoiser call and a classifier pass a step
    for name in ("guidance.png", "samples_guidance.png"):
        assert (reproduced / "plots/fid" / name).is_file(), name
