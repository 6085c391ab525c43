"""Few-step students of a diffusion teacher, each trained by the one loop: progressive distillation
rounds for a DDPM teacher, reflow for a rectified-flow or EDM teacher, consistency distillation
for an EDM teacher (tasks/students.py exports and loads them)."""

from __future__ import annotations

import copy
import dataclasses

import torch
from tqdm import tqdm

from models.diffusion import EDMPrecond, RectifiedFlow
from models.distill import (
    ConsistencyDistillation,
    ProgressiveDistillation,
    ReflowTraining,
    make_reflow_pairs,
)
from models.samplers import KarrasSchedule
from tasks.artifacts import freeze
from tasks.device import autocast
from tasks.diffusion import Denoiser, balanced_labels, step_rows
from tasks.errors import StageError
from tasks.params import DistillParams, FlowParams
from tasks.students import Student
from tasks.training import TrainingContext, TrainResult


def distill_method(method: str, formulation: str) -> str:
    """What `distill.method` means for a teacher of `formulation`: consistency when asked, else
    (auto) progressive distillation for DDPM, reflow for the flow and EDM (it needs only the
    teacher's deterministic sampler)."""
    if method == "consistency":
        return "consistency"
    return "progressive" if formulation == "ddpm" else "reflow"


def progressive_students(
    teacher: Denoiser, params: DistillParams, latents: torch.Tensor, labels: torch.Tensor, training: TrainingContext
) -> tuple[list[Student], list[TrainResult]]:
    """Rounds from progressive.teacher_steps down to the fewest student steps, each student a copy
    of its teacher taking half its DDIM steps; the students asked for in student_steps."""
    rounds = params.progressive
    teacher_net, students, results = teacher.net, [], []
    steps = rounds.teacher_steps // 2
    while steps >= min(params.student_steps):
        distillation = ProgressiveDistillation(teacher_net, copy.deepcopy(teacher_net), steps, label_dropout=rounds.label_dropout)
        trainer, batches = training.trainer(
            distillation, rounds.train, len(latents), params.seed + steps, f"student_{steps}_steps"
        )
        result = trainer.fit(step_rows(batches, latents, labels))
        teacher_net = freeze((result.ema or result.module).student)
        if steps in params.student_steps:
            students.append(Student(steps, teacher.with_net(teacher_net, "ddim"), params.guidance))
        results.append(result)
        steps //= 2
    return students, results


def reflow_student(
    teacher: Denoiser, params: DistillParams, training: TrainingContext, batch_size: int = 500
) -> tuple[list[Student], list[TrainResult]]:
    """A copy of the teacher trained on straight paths from noise to the teacher's guided samples
    (drawn with reflow.sampler; a text-conditioned teacher's asked for train captions, class-balanced);
    it samples with Euler at every count in student_steps, unguided. Any deterministic teacher
    works: an EDM teacher's student is a rectified flow (the flow params' default t) that starts from
    the teacher's network weights."""
    reflow = params.reflow
    torch.manual_seed(params.seed)
    labels = teacher.requests(balanced_labels(reflow.pairs, teacher.num_classes, training.device), "train", params.seed)
    teacher_net, sampler = (teacher if reflow.sampler == "own" else teacher.with_net(teacher.net, "heun")).sampling()
    noise, samples = [], []
    for chunk in tqdm(labels.split(batch_size), desc="distill/reflow pairs", disable=not training.is_main):
        with autocast(training.device):
            pair = make_reflow_pairs(
                teacher_net, sampler, chunk, teacher.latent_shape, reflow.teacher_steps,
                params.guidance, batch_size=batch_size,
            )
        noise.append(pair[0])
        samples.append(pair[1])
    noise, samples = torch.cat(noise), torch.cat(samples)
    flow_time = teacher.flow_time or FlowParams().model_dump(include={"time_mean", "time_std"})  # an EDM teacher has none
    flow = RectifiedFlow(**flow_time, label_dropout=0.0)
    student = copy.deepcopy(teacher.net).requires_grad_(True)
    trainer, batches = training.trainer(ReflowTraining(student, flow), reflow.train, len(labels), params.seed, "reflow")
    result = trainer.fit(step_rows(batches, noise, samples, labels))
    net = dataclasses.replace(
        teacher, net=freeze((result.ema or result.module).student), formulation="flow", sampler="euler",
        flow_time={"time_mean": flow.time_mean, "time_std": flow.time_std}, edm={},
    )
    return [Student(steps, net, 1.0) for steps in params.student_steps], [result]


def consistency_student(
    teacher: Denoiser, params: DistillParams, latents: torch.Tensor, labels: torch.Tensor, training: TrainingContext
) -> tuple[list[Student], list[TrainResult]]:
    """A consistency model distilled from an EDM teacher at `guidance`; its target network (the
    EMA of the student) samples unguided at every count in student_steps."""
    if teacher.formulation != "edm":
        raise StageError(
            f"distill.method consistency needs an edm teacher; artifacts/diffusion holds a {teacher.formulation} one "
            "(set diffusion.formulation: edm, or distill.method: auto)"
        )
    edm, rounds = teacher.edm, params.consistency
    schedule = KarrasSchedule(edm["sigma_min"], edm["sigma_max"], edm["rho"])
    distillation = ConsistencyDistillation(
        EDMPrecond(teacher.net, edm["sigma_data"]), copy.deepcopy(teacher.net), schedule, rounds.levels,
        rounds.target_decay, params.guidance,
    )
    trainer, batches = training.trainer(distillation, rounds.train, len(latents), params.seed, "consistency")
    result = trainer.fit(step_rows(batches, latents, labels))
    net = freeze((result.ema or result.module).target.module)
    student = dataclasses.replace(teacher, net=net, formulation="consistency", sampler="multistep")
    return [Student(steps, student, 1.0) for steps in params.student_steps], [result]
