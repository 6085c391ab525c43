"""distill: few-step students of the diffusion teacher, progressive distillation for DDPM (each
round halves the steps, the student starting from its teacher), reflow for the rectified flow
and EDM, or (distill.method: consistency) consistency distillation of EDM; a per-class sample
grid of each student at its step count, decoded by the VAE. A text-conditioned teacher's students
are asked for captions as it was."""

import torch
from prefect import flow

from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.artifacts import artifacts_dir
from tasks.conditions import split_conditions
from tasks.diffusion import class_grid, load_denoiser
from tasks.distill import consistency_student, distill_method, progressive_students, reflow_student
from tasks.images import captioned, save_png, steps_caption
from tasks.params import DistillParams
from tasks.students import export_students, load_students, student_network
from tasks.training import TrainingContext
from tasks.vae import decoder_files, load_decoder, load_latents


def train_students(params: DistillParams, run: StageRun):
    teacher = load_denoiser(artifacts_dir("diffusion"), run.device)
    latents = load_latents(artifacts_dir("vae"), run.device)
    labels = split_conditions("train", run.device) if teacher.captions else latents.labels  # what the teacher was trained on
    method = distill_method(params.method, teacher.formulation)
    if method == "consistency":
        return method, *consistency_student(teacher, params, latents.scaled(), labels, TrainingContext.of(run))
    if method == "progressive":
        return method, *progressive_students(teacher, params, latents.scaled(), labels, TrainingContext.of(run))
    return method, *reflow_student(teacher, params, TrainingContext.of(run))


@flow(name="distill", log_prints=True)
def distill(params: DistillParams) -> None:
    with StageRun("distill", params) as run:
        method, students, results = stage_task(train_students, name="train")(params, run)
        if not run.is_main:
            return
        folder = run.outputs.artifacts
        export_students(students, method, params.guidance, folder)
        students, _ = load_students(folder, run.device)  # what the fid stage gets
        decoder = load_decoder(artifacts_dir("vae"), run.device)
        sample = stage_task(class_grid, name="sample-grids")
        grids = {}
        for student in students:
            denoiser = student.denoiser
            classes = torch.arange(denoiser.num_classes, device=run.device)
            run.log_model(
                f"student_{student.steps}_steps", "generator", denoiser.requests(classes, "train", params.seed),
                network=student_network(method, student.steps), steps=student.steps, guidance=student.guidance,
                seed=params.seed, with_files=decoder_files(artifacts_dir("vae")),
            )
            grids[f"{steps_caption(student.steps)}, guidance {student.guidance:g}"], images_per_s = sample(
                denoiser, decoder, params.samples_per_class, student.steps, student.guidance, params.seed,
            )
            run.metrics[f"sampling_images_per_s.steps_{student.steps}"] = round(images_per_s, 1)
        save_png(captioned(grids), run.outputs.plots / "samples.png")
        seconds = sum(result.seconds for result in results)
        run.metrics.update(
            steps=sum(result.steps for result in results), train_seconds=round(seconds, 2),
            images_per_s=round(sum(result.images_per_s * result.seconds for result in results) / max(seconds, 1e-9), 1),
        )
        print(f"distill/{method}: students at {[s.steps for s in students]} steps, "
              f"{run.metrics['steps']} training steps in {seconds:.1f} s")


if __name__ == "__main__":
    main("distill", distill)
