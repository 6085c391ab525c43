"""ssl: self-supervised pretraining of a backbone on the prepared training split."""

import json

import torch
from prefect import flow

from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.data import load_manifest, load_split
from tasks.params import SslParams
from tasks.ssl import build_ssl, check_fits_the_data, knn_monitor
from tasks.training import TrainingContext, TrainResult


def train_ssl(params: SslParams, run: StageRun) -> TrainResult:
    channels, image_size, _ = load_manifest()["image_shape"]
    train, val = load_split("train", run.device), load_split("val", run.device)
    torch.manual_seed(params.seed)
    objective = build_ssl(params, channels, image_size)
    trainer, batches = TrainingContext.of(run).trainer(objective, params.train, len(train), params.seed, params.objective)
    return trainer.fit(
        lambda step: train.floats(batches(step)),
        evaluate=knn_monitor(train, val),
        evaluate_every=params.knn_every_epochs * batches.steps_per_epoch,
    )


@flow(name="ssl", log_prints=True)
def ssl(params: SslParams) -> None:
    manifest = load_manifest()
    check_fits_the_data(params, manifest.get("source", "unknown"), manifest["image_shape"][0])
    with StageRun("ssl", params) as run:
        result = stage_task(train_ssl, name="train")(params, run)
        if not run.is_main:
            return
        objective = result.module
        torch.save(objective.state_dict(), run.outputs.artifacts / "objective.pt")
        config = {"objective": params.objective, "backbone": objective.backbone.config}
        (run.outputs.artifacts / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        run.metrics.update(result.evaluation)
        run.metrics.update(steps=result.steps, train_seconds=round(result.seconds, 2), images_per_s=round(result.images_per_s, 1))
        print(f"ssl/{params.objective}: {result.steps} steps in {result.seconds:.1f} s ({result.images_per_s:.0f} images/s)")


if __name__ == "__main__":
    main("ssl", ssl)
