"""gan: a class-conditional WGAN-GP over the VAE's scaled latents (the ones diffusion trains on),
the baseline diffusion replaced: critic and generator updates alternate in the one training loop;
the generator is exported and sampled into a per-class grid, decoded by the VAE."""

import torch
from prefect import flow

from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.artifacts import artifacts_dir
from tasks.gan import (
    alternating_batches,
    build_gan_training,
    export_generator,
    gan_class_grid,
    load_generator,
)
from tasks.images import save_png
from tasks.params import GanParams
from tasks.training import TrainingContext, TrainResult
from tasks.vae import decoder_files, load_decoder, load_latents


def train_gan(params: GanParams, run: StageRun) -> TrainResult:
    latents = load_latents(artifacts_dir("vae"), run.device)
    scaled = latents.scaled()
    torch.manual_seed(params.seed)
    training = build_gan_training(params, tuple(scaled.shape[1:]), latents.num_classes)
    trainer, batches = TrainingContext.of(run).trainer(training, params.train, len(scaled), params.seed)
    return trainer.fit(alternating_batches(batches, scaled, latents.labels, params.critic_steps))


@flow(name="gan", log_prints=True)
def gan(params: GanParams) -> None:
    with StageRun("gan", params) as run:
        result = stage_task(train_gan, name="train")(params, run)
        if not run.is_main:
            return
        export_generator(result.module.generator, run.outputs.artifacts)
        generator = load_generator(run.outputs.artifacts, run.device)  # what the fid stage gets
        decoder = load_decoder(artifacts_dir("vae"), run.device)
        run.log_model(
            "gan_generator", "gan", torch.arange(generator.config.num_classes), network="generator", seed=params.seed,
            with_files=decoder_files(artifacts_dir("vae")),
        )
        samples, images_per_s = stage_task(gan_class_grid, name="sample-grid")(
            generator, decoder, params.samples_per_class, params.seed
        )
        save_png(samples, run.outputs.plots / "samples.png")
        generator_steps = result.steps // (params.critic_steps + 1)
        run.metrics.update(
            steps=result.steps, generator_steps=generator_steps, train_seconds=round(result.seconds, 2),
            images_per_s=round(result.images_per_s, 1), sampling_images_per_s=round(images_per_s, 1),
            parameters=sum(p.numel() for p in generator.parameters()),
        )
        print(f"gan: {result.steps} steps ({generator_steps} of the generator) in {result.seconds:.1f} s "
              f"({result.images_per_s:.0f} latents/s)")


if __name__ == "__main__":
    main("gan", gan)
