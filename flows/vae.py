"""vae: a convolutional VAE on the prepared images (beta-KL, InfoVAE's MMD or VQ-VAE's codebook;
L1/L2, optional PatchGAN and a perceptual loss in the frozen SSL encoder's space); the training
set's latents (pre-quantisation for VQ: the decoder snaps them to the codebook) with their
per-channel scale; reconstruction and prior-sample grids; PSNR/SSIM (and codebook use) on the
test split, and how far its scaled latents sit from the N(0, I) prior. A conditional VAE encodes and
decodes with the true labels, and its prior grid has a row per class."""

import numpy as np
import torch
from prefect import flow

from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.artifacts import artifacts_dir
from tasks.data import load_manifest, load_split
from tasks.encoder import load_encoder
from tasks.images import grid, save_png, to_uint8
from tasks.params import VaeParams
from tasks.training import TrainingContext, TrainResult, total_steps
from tasks.vae import (
    Latents,
    LatentScale,
    build_vae_training,
    decode,
    encode_means,
    export_vae,
    load_vae,
    mismatch_report,
    reconstruction_report,
)

GRID_COLUMNS = 10


def train_vae(params: VaeParams, run: StageRun) -> TrainResult:
    train = load_split("train", run.device)
    steps = total_steps(params.train, len(train) // params.train.batch_size)
    encoder = load_encoder(artifacts_dir("encoder"), run.device) if params.perceptual_weight > 0 else None
    manifest = load_manifest()
    torch.manual_seed(params.seed)
    training = build_vae_training(params, manifest["image_shape"], len(manifest["class_names"]), steps, encoder)
    trainer, batches = TrainingContext.of(run).trainer(training, params.train, len(train), params.seed)

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = batches(step)
        return train.floats(index), train.labels[index]

    return trainer.fit(next_batch)


def reconstruction_grid(vae, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Rows of originals, each followed by its row of reconstructions."""
    reconstructions = decode(vae, encode_means(vae, images, labels), labels)
    rows = [torch.cat(pair) for pair in zip(images.split(GRID_COLUMNS), reconstructions.split(GRID_COLUMNS), strict=True)]
    return grid(to_uint8(torch.cat(rows)), ncols=GRID_COLUMNS)


def prior_grid(vae, count: int, latent_shape: torch.Size, seed: int) -> np.ndarray:
    """Decoded N(0, I) draws: `count` of them in rows of GRID_COLUMNS; from a conditional VAE, a row
    per class with the same draw down each column (one style across the classes)."""
    device, classes = next(vae.parameters()).device, vae.config.num_classes
    torch.manual_seed(seed)
    if not classes:
        return grid(to_uint8(decode(vae, torch.randn(count, *latent_shape, device=device))), ncols=GRID_COLUMNS)
    columns = max(1, count // classes)
    styles = torch.randn(columns, *latent_shape, device=device)
    labels = torch.arange(classes, device=device).repeat_interleave(columns)
    return grid(to_uint8(decode(vae, styles.repeat(classes, 1, 1, 1), labels)), ncols=columns)


@flow(name="vae", log_prints=True)
def vae(params: VaeParams) -> None:
    with StageRun("vae", params) as run:
        result = stage_task(train_vae, name="train")(params, run)
        if not run.is_main:
            return
        folder = run.outputs.artifacts
        export_vae(result.module.vae, folder)
        model = load_vae(folder, run.device)  # what later stages get: rebuilt from the two files alone
        train, test = load_split("train", run.device), load_split("test", run.device)
        # a conditional VAE's logged model encodes every image as the class of its `label` param
        run.log_model("vae", "vae", test.floats(slice(0, 2)), **({"label": 0} if params.conditional else {}))
        means = stage_task(encode_means, name="encode-train")(model, train.floats(), train.labels)
        latents = Latents(means, train.labels, LatentScale.fit(means), len(load_manifest()["class_names"]))
        latents.save(folder)
        run.metrics.update(stage_task(reconstruction_report, name="evaluate")(model, test, train.floats().mean(0)))
        mismatch = stage_task(mismatch_report, name="prior-mismatch")
        run.metrics.update(mismatch(model, test, latents.latent_scale, params.mismatch_samples, params.seed))

        shown = min(params.grid_images, len(test))
        save_png(reconstruction_grid(model, test.floats(slice(0, shown)), test.labels[:shown]), run.outputs.plots / "reconstructions.png")
        save_png(prior_grid(model, params.grid_images, means.shape[1:], params.seed), run.outputs.plots / "prior_samples.png")

        run.metrics.update(
            steps=result.steps, train_seconds=round(result.seconds, 2), images_per_s=round(result.images_per_s, 1),
            latent_std_min=means.std((0, 2, 3)).min().item(), latent_std_max=means.std((0, 2, 3)).max().item(),
        )
        grid_shape = "x".join(map(str, means.shape[1:]))
        print(f"vae: {grid_shape} latents; test PSNR {run.metrics['psnr']:.2f} dB "
              f"(mean image {run.metrics['psnr_mean_image']:.2f}), SSIM {run.metrics['ssim']:.3f}; "
              f"MMD to the prior {run.metrics['prior_mmd']:.4f}")


if __name__ == "__main__":
    main("vae", vae)
