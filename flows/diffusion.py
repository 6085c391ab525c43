"""diffusion: a class-conditional U-Net (or DiT, `backbone: dit`) over the VAE's scaled latents,
trained as a rectified flow, DDPM or EDM with label dropout for classifier-free guidance (with
`repa.weight` > 0, also aligned to the frozen SSL encoder's embeddings: REPA); its EMA weights are
exported and sampled into a per-class grid at each guidance scale, decoded by the VAE. With
`condition: text` the U-Net is conditioned on each image's caption instead, through cross-attention
to the clip stage's frozen text encoder (tasks/conditions.py), and the grids' rows are captions. With
`classifier.epochs` > 0 a noise-aware classifier of the noised latents is trained after it and
exported beside it, for classifier guidance (models/guidance.py)."""

import torch
from prefect import flow

from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.artifacts import artifacts_dir, unreadable
from tasks.captions import CAPTIONS_PER_CLASS
from tasks.conditions import caption_features, split_conditions
from tasks.data import PREPARED, load_manifest
from tasks.diffusion import (
    Denoiser,
    attribute_grid,
    build_denoiser_training,
    check_latent_grid,
    class_grid,
    export_denoiser,
    load_denoiser,
    step_rows,
)
from tasks.encoder import load_embeddings
from tasks.guidance import build_classifier_training, export_classifier
from tasks.images import captioned, save_png
from tasks.params import DiffusionParams, ParamsError
from tasks.training import TrainingContext, TrainResult
from tasks.vae import decoder_files, load_decoder, load_latents


def caption_conditioning(
    params: DiffusionParams, device: torch.device
) -> tuple[list[str], tuple[torch.Tensor, torch.Tensor] | None]:
    """condition: text's caption table and its token features (tasks/conditions.py), after checking
    caption_grid_class names a class; ([], None) for class."""
    if params.condition != "text":
        return [], None
    class_names = load_manifest()["class_names"]
    if params.caption_grid_class >= len(class_names):
        raise ParamsError(f"params/diffusion.yaml: caption_grid_class {params.caption_grid_class} is not a class "
                          f"(0 to {len(class_names) - 1})")
    texts, *tokens = caption_features(class_names, device)
    return texts, tuple(tokens)


def train_denoiser(
    params: DiffusionParams, run: StageRun, caption_tokens: tuple[torch.Tensor, torch.Tensor] | None
) -> TrainResult:
    latents = load_latents(artifacts_dir("vae"), run.device)
    scaled, labels = latents.scaled(), latents.labels
    check_latent_grid(params, tuple(scaled.shape[1:]))
    if caption_tokens is not None:  # each latent's label becomes its image's caption (the same, prepared, order)
        captions = split_conditions("train", run.device)
        if len(captions) != len(scaled) or bool((captions // CAPTIONS_PER_CLASS != labels).any()):
            raise unreadable(PREPARED / "train_captions.json", "its captions do not name the train latents' classes in "
                                                               "order: from another prepare run? `dvc repro`")
        labels = captions
    # REPA's targets: the frozen SSL encoder's embeddings of the same training images, in the same (prepared) order
    targets = [load_embeddings(artifacts_dir("encoder"), "train", len(scaled), run.device)] if params.repa.weight > 0 else []
    torch.manual_seed(params.seed)
    training = build_denoiser_training(
        params, scaled.shape[1], latents.num_classes, *(t.shape[1] for t in targets), caption_tokens=caption_tokens
    )
    trainer, batches = TrainingContext.of(run).trainer(training, params.train, len(scaled), params.seed, params.formulation)
    return trainer.fit(step_rows(batches, scaled, labels, *targets))


def train_classifier(params: DiffusionParams, run: StageRun) -> TrainResult:
    """Classifier guidance's noise-aware classifier on the same latents, noised as the denoiser's
    formulation noises them; its step metrics go to MLflow as classifier/<metric>."""
    latents = load_latents(artifacts_dir("vae"), run.device)
    scaled, labels = latents.scaled(), latents.labels
    torch.manual_seed(params.seed)
    training = build_classifier_training(params, scaled.shape[1], latents.num_classes)
    context = TrainingContext.of(run).logged_as("classifier.")
    trainer, batches = context.trainer(training, params.classifier.train(), len(scaled), params.seed, "classifier")
    return trainer.fit(step_rows(batches, scaled, labels))


@flow(name="diffusion", log_prints=True)
def diffusion(params: DiffusionParams) -> None:
    with StageRun("diffusion", params) as run:
        texts, caption_tokens = caption_conditioning(params, run.device)
        result = stage_task(train_denoiser, name="train")(params, run, caption_tokens)
        classifier = stage_task(train_classifier, name="train-classifier")(params, run) if params.classifier.epochs > 0 else None
        if not run.is_main:
            return
        trained = result.ema if result.ema is not None else result.module
        latent_shape = load_latents(artifacts_dir("vae")).latents.shape[1:]
        export_denoiser(Denoiser.from_params(trained.net, params, latent_shape, texts), run.outputs.artifacts)
        denoiser = load_denoiser(run.outputs.artifacts, run.device)  # what later stages get
        decoder = load_decoder(artifacts_dir("vae"), run.device)
        classes = torch.arange(denoiser.num_classes, device=run.device)
        run.log_model(
            "denoiser", "generator", denoiser.requests(classes, "train", params.seed), steps=params.sample_steps,
            guidance=params.guidance_scales[-1], seed=params.seed, with_files=decoder_files(artifacts_dir("vae")),
        )
        grids = {}
        for guidance in params.guidance_scales:
            if texts:
                grids[f"guidance {guidance:g}"], images_per_s = stage_task(attribute_grid, name="sample-grids")(
                    denoiser, decoder, params.caption_grid_class, params.samples_per_class, params.sample_steps, guidance,
                    params.seed,
                )
            else:
                grids[f"guidance {guidance:g}"], images_per_s = stage_task(class_grid, name="sample-grids")(
                    denoiser, decoder, params.samples_per_class, params.sample_steps, guidance, params.seed
                )
            run.metrics[f"sampling_images_per_s.guidance_{guidance:g}"] = round(images_per_s, 1)
        save_png(captioned(grids), run.outputs.plots / "samples.png")
        if classifier is not None:
            export_classifier(classifier.module.classifier, run.outputs.artifacts)
            run.metrics.update({"classifier.steps": classifier.steps, "classifier.train_seconds": round(classifier.seconds, 2)})
        run.metrics.update(
            steps=result.steps, train_seconds=round(result.seconds, 2), images_per_s=round(result.images_per_s, 1),
            parameters=sum(p.numel() for p in denoiser.net.parameters()),
        )
        print(f"diffusion/{params.formulation}: {result.steps} steps in {result.seconds:.1f} s "
              f"({result.images_per_s:.0f} latents/s); grids at guidance {params.guidance_scales}")


if __name__ == "__main__":
    main("diffusion", diffusion)
