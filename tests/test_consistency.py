"""Consistency distillation (Song et al. 2023): the boundary condition, multistep sampling with a
perfect consistency function, the training objective at its optimum, and the distill task's
student exported and sampled like any other."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.diffusion import ConsistencyPrecond, EDMPrecond
from models.distill import ConsistencyDistillation
from models.samplers import KarrasSchedule, consistency
from tasks.diffusion import Denoiser, balanced_labels
from tasks.distill import consistency_student
from tasks.errors import StageError
from tasks.params import ConsistencyParams, DistillParams, EDMParams, TrainParams
from tasks.students import export_students, load_students
from tasks.training import TrainingContext
from tests.test_generative_stages import TINY_NETS, tiny_unet

SCHEDULE = KarrasSchedule(**EDMParams().model_dump(include={"sigma_min", "sigma_max", "rho"}))  # the default rho-schedule

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD, SIGMA_DATA, SIGMA_MIN = 0.7, 0.5, 1.0, 0.002


def ideal_map(x, sigma):
    """The probability-flow ODE's map from (x, σ) to σ = 0 for N(MEAN, STD²) data."""
    return MEAN + STD / (STD**2 + sigma**2).sqrt() * (x - MEAN)


class RawFor(nn.Module):
    """The raw network F whose preconditioned output is `target(x, σ)`: it reads σ back from
    c_noise and x from c_in x, under the consistency (or EDM) preconditioning."""

    null_label = 0

    def __init__(self, target, boundary: bool):
        super().__init__()
        self.target, self.boundary = target, boundary
        self.calls = 0

    def forward(self, x_in, c_noise, labels):
        self.calls += 1
        sigma = (4 * c_noise).exp().view(-1, *[1] * (x_in.ndim - 1))
        total = sigma**2 + SIGMA_DATA**2
        x = x_in * total.sqrt()
        shift = SIGMA_MIN if self.boundary else 0.0
        c_skip = SIGMA_DATA**2 / ((sigma - shift) ** 2 + SIGMA_DATA**2)
        c_out = (sigma - shift) * SIGMA_DATA / total.sqrt()
        return (self.target(x, sigma) - c_skip * x) / c_out.clamp_min(1e-12)


def test_the_consistency_function_is_the_identity_at_sigma_min():
    net = tiny_unet().eval()
    x, labels = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(ConsistencyPrecond(net, SIGMA_DATA, SIGMA_MIN)(x, torch.full((4,), SIGMA_MIN), labels), x)
        assert not torch.allclose(ConsistencyPrecond(net, SIGMA_DATA, SIGMA_MIN)(x, torch.full((4,), 1.0), labels), x)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_sampling_with_a_perfect_consistency_function_gets_the_target(steps):
    raw = RawFor(ideal_map, boundary=True)
    noise, labels = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(20000, dtype=torch.long)
    torch.manual_seed(1)
    samples = consistency(ConsistencyPrecond(raw, SIGMA_DATA, SIGMA_MIN), noise, labels, steps, schedule=SCHEDULE)
    assert raw.calls == steps
    assert samples.std().item() == pytest.approx(STD, rel=0.03) and samples.mean().item() == pytest.approx(MEAN, abs=0.02)


def test_the_distillation_loss_vanishes_for_the_ode_map_and_not_for_another():
    teacher = EDMPrecond(RawFor(lambda x, sigma: MEAN + STD**2 / (STD**2 + sigma**2) * (x - MEAN), boundary=False), SIGMA_DATA)
    x0, labels = MEAN + STD * torch.randn(512, 3), torch.zeros(512, dtype=torch.long)

    def loss(target) -> float:
        torch.manual_seed(0)
        distillation = ConsistencyDistillation(teacher, RawFor(target, boundary=True), SCHEDULE, 18, 0.95, guidance=1.0)
        return distillation((x0, labels))["loss"].item()

    ideal, wrong = loss(ideal_map), loss(lambda x, sigma: ideal_map(x, 1.5 * sigma))  # off the ODE
    assert ideal < 1e-4 and wrong > 20 * ideal, (ideal, wrong)  # the ideal leaves only Heun error


@pytest.mark.parametrize("backbone", list(TINY_NETS))
def test_consistency_student_is_the_target_network_and_samples_like_any_denoiser(in_tmp, backbone):
    net = TINY_NETS[backbone]()
    edm = {"sigma_data": 1.0, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "churn": None}
    teacher = Denoiser(net.requires_grad_(False), "edm", "heun", (2, 4, 4), edm=edm)
    train = TrainParams(epochs=2, batch_size=8, lr=1e-3, log_every=1)
    params = DistillParams(method="consistency", guidance=1.5, student_steps=[1, 2], consistency=ConsistencyParams(train=train))
    latents, labels = torch.randn(16, 2, 4, 4), balanced_labels(16, 3)
    students, results = consistency_student(teacher, params, latents, labels, TrainingContext("distill"))
    assert [s.steps for s in students] == [1, 2] and results[0].steps == 4
    student = students[0].denoiser
    assert students[1].denoiser is student and students[0].guidance == 1.0
    assert (student.formulation, student.sampler, student.edm) == ("consistency", "multistep", edm)
    assert student.net is results[0].module.target.module and student.net is not results[0].module.student
    moved = [not torch.equal(a, b) for a, b in zip(student.net.parameters(), teacher.net.parameters(), strict=True)]
    assert any(moved)

    export_students(students, "consistency", 1.5, in_tmp / "out")
    loaded, _ = load_students(in_tmp / "out")
    assert loaded[0].denoiser is loaded[1].denoiser and loaded[0].denoiser.formulation == "consistency"
    for steps in (1, 2):
        assert torch.equal(loaded[0].denoiser.sample(labels, steps, 1.0, seed=4), student.sample(labels, steps, 1.0, seed=4))

    with pytest.raises(StageError, match="distill.method consistency needs an edm teacher"):
        consistency_student(Denoiser(net, "flow", "euler", (2, 4, 4)), params, latents, labels, TrainingContext("distill"))
