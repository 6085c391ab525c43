"""clip: CLIP (Radford et al. 2021) in miniature on prepare's captions: a ResNet image encoder and
a transformer text encoder trained together by the symmetric InfoNCE loss over the training
split's (image, caption) pairs; then, on the test split, retrieval recall@1 and @5 both ways over
the distinct test captions and zero-shot classification from the prompts "a zero" … "a nine",
each beside its chance level, and a figure of test images with their top-3 captions."""

import torch
from prefect import flow

from models.clip import ClipTraining
from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.captions import Tokenizer
from tasks.clip import (
    VOCAB,
    CaptionedSplit,
    build_clip,
    evaluate,
    export_clip,
    load_captioned,
    load_clip,
    recall_summary,
    retrieval_figure,
)
from tasks.data import load_manifest
from tasks.params import ClipParams
from tasks.training import TrainingContext, TrainResult


def train_clip(params: ClipParams, run: StageRun, train: CaptionedSplit, tokenizer: Tokenizer) -> TrainResult:
    torch.manual_seed(params.seed)
    channels, image_size = train.images.images.shape[1:3]
    training = ClipTraining(build_clip(params, channels, image_size, tokenizer))
    trainer, batches = TrainingContext.of(run).trainer(training, params.train, len(train), params.seed)

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = batches(step)
        captions = train.captions[index]
        return train.images.floats(index), train.tokens[captions], captions

    return trainer.fit(next_batch)


@flow(name="clip", log_prints=True)
def clip(params: ClipParams) -> None:
    with StageRun("clip", params) as run:
        tokenizer = Tokenizer.read(VOCAB)
        train = load_captioned("train", tokenizer, run.device)
        result = stage_task(train_clip, name="train")(params, run, train, tokenizer)
        if not run.is_main:
            return
        export_clip(result.module.clip, run.outputs.artifacts)
        model = load_clip(run.outputs.artifacts, run.device)  # what a later user of the stage gets
        test = load_captioned("test", tokenizer, run.device)
        scores, similarity = stage_task(evaluate, name="evaluate")(model, test, load_manifest()["class_names"], tokenizer)
        retrieval_figure(test, similarity, params.retrieval_images, params.seed, run.outputs.plots / "retrieval.png")
        run.metrics.update(
            {key: round(value, 5) for key, value in scores.items()}, temperature=round(1 / model.scale.item(), 5),
            steps=result.steps, train_seconds=round(result.seconds, 2), images_per_s=round(result.images_per_s, 1),
            parameters=sum(p.numel() for p in model.parameters()),
        )
        print(f"clip: {result.steps} steps in {result.seconds:.1f} s ({result.images_per_s:.0f} images/s); "
              f"test over {len(test.texts)} distinct captions: {recall_summary(scores)}")


if __name__ == "__main__":
    main("clip", clip)
