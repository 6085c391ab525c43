"""ar: a class-conditional autoregressive prior over the VQ-VAE's codes: the training set's code
grids in raster order, a causal transformer trained by next-token cross-entropy, its bits per token
on the test split's codes (beside the uniform and the unigram baselines), and a per-class grid of
samples (temperature, top-k) decoded by the VQ-VAE. With a continuous latent (vae.regulariser kl
or mmd) there are no codes: the stage trains nothing and writes that it skipped, so it always
stands in the DAG and costs nothing on the default profile."""

import math

import torch
from prefect import flow

from models.ar import NextTokenTraining
from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.ar import (
    ar_class_grid,
    bits_per_token,
    build_prior,
    code_grids,
    export_prior,
    load_prior,
    skip_reason,
    split_codes,
    unigram_bits_per_token,
    write_skipped,
)
from tasks.artifacts import artifacts_dir, read_json
from tasks.data import load_split
from tasks.images import captioned, save_png
from tasks.params import ArParams
from tasks.training import TrainingContext, TrainResult
from tasks.vae import load_latents, load_vae


def train_ar(
    params: ArParams, run: StageRun, codes: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_classes: int,
    grid_shape: tuple[int, int],
) -> TrainResult:
    torch.manual_seed(params.seed)
    training = NextTokenTraining(build_prior(params, vocab_size, num_classes, grid_shape))
    trainer, batches = TrainingContext.of(run).trainer(training, params.train, len(codes), params.seed)

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = batches(step)
        return codes[index], labels[index]

    return trainer.fit(next_batch)


def skipped(run: StageRun, reason: str) -> None:
    """The stage's outputs when there is nothing to model: the reason, an empty loss curve, a
    captioned blank grid and metrics that say so."""
    write_skipped(run.outputs.artifacts, reason)
    (run.outputs.plots / "train.csv").write_text("step,loss\n")  # dvc.yaml's plot, with no points
    save_png(captioned({"no AR prior: vae.regulariser is not vq": torch.full((8, 8, 1), 255, dtype=torch.uint8).numpy()}),
             run.outputs.plots / "samples.png")
    run.metrics.update(skipped=1)
    print(f"ar: skipped ({reason})")


@flow(name="ar", log_prints=True)
def ar(params: ArParams) -> None:
    with StageRun("ar", params) as run:
        vae_folder = artifacts_dir("vae")
        if reason := skip_reason(read_json(vae_folder / "vae.json")):
            if run.is_main:
                skipped(run, reason)
            return
        vae = load_vae(vae_folder, run.device)
        latents = load_latents(vae_folder, run.device)
        grid_shape = tuple(latents.latents.shape[2:])
        vocab_size = len(vae.quantizer.codebook)
        codes = stage_task(code_grids, name="encode-train")(vae, latents.latents)
        result = stage_task(train_ar, name="train")(
            params, run, codes, latents.labels, vocab_size, latents.num_classes, grid_shape
        )
        if not run.is_main:
            return
        export_prior(result.module.prior, params, run.outputs.artifacts)
        prior, sampling = load_prior(run.outputs.artifacts, run.device)  # what the fid stage gets
        test = load_split("test", run.device)
        test_codes = split_codes(vae, test.floats())
        test_bits = stage_task(bits_per_token, name="evaluate")(prior, test_codes, test.labels)
        samples, images_per_s = stage_task(ar_class_grid, name="sample-grid")(
            prior, vae, params.samples_per_class, params.seed, sampling["temperature"], sampling["top_k"]
        )
        save_png(samples, run.outputs.plots / "samples.png")
        run.metrics.update(
            skipped=0, bits_per_token=round(test_bits, 5), uniform_bits_per_token=round(math.log2(vocab_size), 5),
            unigram_bits_per_token=round(unigram_bits_per_token(codes, test_codes, vocab_size), 5),
            tokens=codes.shape[1], steps=result.steps, train_seconds=round(result.seconds, 2),
            images_per_s=round(result.images_per_s, 1), sampling_images_per_s=round(images_per_s, 1),
            parameters=sum(p.numel() for p in prior.parameters()),
        )
        print(f"ar: {result.steps} steps in {result.seconds:.1f} s; test {test_bits:.3f} bits per token "
              f"(unigram {run.metrics['unigram_bits_per_token']:.3f}, uniform {math.log2(vocab_size):.3f}); "
              f"sampling {images_per_s:.0f} images/s")


if __name__ == "__main__":
    main("ar", ar)
