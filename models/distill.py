"""Few-step students: progressive distillation for DDPM (Salimans & Ho 2022), reflow for the
rectified flow (Liu et al. 2022) and consistency distillation for EDM (Song et al. 2023).
Students are denoisers like their teachers and sample with the samplers of models/samplers.py,
at 1, 2 or 4 steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from models.diffusion import (
    ConsistencyPrecond,
    CosineSchedule,
    EDMPrecond,
    RectifiedFlow,
    drop_labels,
    per_sample,
)
from models.ema import EMA
from models.samplers import KarrasSchedule, ddim_step, edm_heun_step, predict_x0


class ProgressiveDistillation(nn.Module):
    """The student learns to take in one DDIM step what the frozen teacher takes in two.

    The student samples with `student_steps` DDIM steps, its teacher with twice as many; it starts
    as a copy of the teacher. After training, `next_round()` halves the steps again. Labels are
    dropped for teacher and student alike, so the student keeps classifier-free guidance.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        student_steps: int,
        label_dropout: float,
        schedule: CosineSchedule | None = None,
    ):
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student.requires_grad_(True)
        self.student_steps = student_steps
        self.schedule = schedule or CosineSchedule()
        self.label_dropout = label_dropout

    def train(self, mode: bool = True) -> ProgressiveDistillation:
        super().train(mode)
        self.teacher.eval()
        return self

    def next_round(self) -> ProgressiveDistillation:
        """This student, frozen, teaches a copy of itself to take half as many steps."""
        if self.student_steps < 2:
            raise ValueError("the student already samples in one step")
        student = copy.deepcopy(self.student)
        return ProgressiveDistillation(
            self.student, student, self.student_steps // 2, self.label_dropout, self.schedule
        )

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0, labels = batch
        labels = drop_labels(labels, self.student.null_label, self.label_dropout)
        # t on the student's grid 1/N, 2/N, ..., 1; the teacher stops halfway
        step = 1 / self.student_steps
        t = torch.randint(1, self.student_steps + 1, (len(x0),), device=x0.device) * step
        alpha_bar, alpha_bar_mid, alpha_bar_next = (
            per_sample(self.schedule.alpha_bar(times), x0) for times in (t, t - step / 2, t - step)
        )
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * torch.randn_like(x0)
        with torch.no_grad():
            x_mid = ddim_step(x_t, self.teacher(x_t, t, labels), alpha_bar, alpha_bar_mid)
            eps_mid = self.teacher(x_mid, t - step / 2, labels)
            x_next = ddim_step(x_mid, eps_mid, alpha_bar_mid, alpha_bar_next)
            # the x0 whose single DDIM step from x_t lands on the teacher's x_next
            sigma_ratio = ((1 - alpha_bar_next) / (1 - alpha_bar)).sqrt()
            x0_target = (x_next - sigma_ratio * x_t) / (alpha_bar_next.sqrt() - sigma_ratio * alpha_bar.sqrt())
        x0_student = predict_x0(x_t, self.student(x_t, t, labels), alpha_bar)
        # truncated SNR weighting max(SNR, 1): the x0 error where signal dominates, the eps error elsewhere
        weight = (alpha_bar / (1 - alpha_bar)).clamp(min=1)
        loss = (weight * (x0_student - x0_target).square()).flatten(1).mean(1)
        return {"loss": loss.mean()}

    def compile(self, **kwargs) -> None:
        """torch.compile teacher and student; the DDIM arithmetic between them stays eager."""
        self.teacher.compile(**kwargs)
        self.student.compile(**kwargs)


@torch.no_grad()
def make_reflow_pairs(
    teacher: nn.Module,
    sampler: Callable[..., torch.Tensor],
    labels: torch.Tensor,
    latent_shape: tuple[int, ...],
    steps: int,
    guidance: float,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, teacher sample from that noise) for each label: the coupling reflow straightens.

    With guidance > 1 the guided distribution is distilled into the student, which then samples
    with guidance = 1. The caller sets the teacher's eval mode and the seed.
    """
    noises, samples = [], []
    for batch_labels in labels.split(batch_size):
        noise = torch.randn(len(batch_labels), *latent_shape, device=labels.device)
        noises.append(noise)
        samples.append(sampler(teacher, noise, batch_labels, steps, guidance))
    return torch.cat(noises), torch.cat(samples)


class ReflowTraining(nn.Module):
    """Trains a student (a copy of the teacher) on straight paths between the teacher's pairs:
    forward((noise, samples, labels)) -> {"loss"}."""

    def __init__(self, student: nn.Module, flow: RectifiedFlow):
        super().__init__()
        self.student = student
        self.flow = flow

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        noise, samples, labels = batch
        return {"loss": self.flow(self.student, samples, labels, noise=noise).mean()}

    def compile(self, **kwargs) -> None:
        self.student.compile(**kwargs)


class ConsistencyDistillation(nn.Module):
    """Consistency distillation (Song et al. 2023, Algorithm 2): x0 noised to a level σ of the
    N-level ρ-schedule, the frozen EDM teacher takes one Heun step of its (guided) ODE down to
    the next level σ'; the student's consistency function at (x, σ) regresses the target's at the
    teacher's (x', σ'). The target is an EMA of the student, updated after each optimizer step;
    both start as copies of the teacher's U-Net. forward((x0, labels)) -> {"loss"}."""

    def __init__(
        self, teacher: EDMPrecond, student: nn.Module, schedule: KarrasSchedule, levels: int,
        target_decay: float, guidance: float,
    ):
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student.requires_grad_(True)
        self.target = EMA(student, target_decay)
        self.schedule, self.guidance = schedule, guidance
        self.register_buffer("sigmas", torch.tensor(schedule.sigmas(levels)[:-1]), persistent=False)

    def consistency(self, net: nn.Module) -> ConsistencyPrecond:
        return ConsistencyPrecond(net, self.teacher.sigma_data, self.schedule.sigma_min)

    def train(self, mode: bool = True) -> ConsistencyDistillation:
        super().train(mode)
        self.teacher.eval()
        self.target.eval()
        return self

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0, labels = batch
        level = torch.randint(0, len(self.sigmas) - 1, (len(x0),), device=x0.device)
        sigma, sigma_next = self.sigmas[level], self.sigmas[level + 1]
        x = x0 + per_sample(sigma, x0) * torch.randn_like(x0)
        with torch.no_grad():
            x_next = edm_heun_step(self.teacher, x, sigma, sigma_next, labels, self.guidance)
            target = self.consistency(self.target.module)(x_next, sigma_next, labels)
        prediction = self.consistency(self.student)(x, sigma, labels)
        return {"loss": (prediction - target).square().flatten(1).mean(1).mean()}

    def after_step(self, step: int, steps: int) -> None:
        """The training loop's hook: the target follows the student."""
        self.target.update(self.student)

    def compile(self, **kwargs) -> None:
        """torch.compile teacher and student; the Heun step between them stays eager."""
        self.teacher.net.compile(**kwargs)
        self.student.compile(**kwargs)
