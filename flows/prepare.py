"""prepare: raw dataset -> uint8 train/val/test splits, their captions and tokens, manifest and sample grids."""

from pathlib import Path

from prefect import flow

from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.artifacts import write_json
from tasks.captions import caption_grid, caption_splits, write_captions
from tasks.datasets import fetch_missing, load_source
from tasks.images import class_grid, save_png
from tasks.params import PrepareParams
from tasks.prepare import make_splits, manifest, write_splits

fetch_raw = stage_task(fetch_missing, name="fetch-raw")
read_raw = stage_task(load_source, name="read-raw")
split = stage_task(make_splits, name="split")
caption = stage_task(caption_splits, name="caption")


@flow(name="prepare", log_prints=True)
def prepare(params: PrepareParams) -> None:
    root = Path(params.root or f"data/raw/{params.source}")
    fetch_raw(params.source, root, params.download)  # before the run records its deps (data/raw)
    with StageRun("prepare", params) as run:
        raw = read_raw(params.source, root, download=params.download, channels=params.channels,
                       size=params.image_size, fit=params.fit)
        splits = split(raw, params)
        folder = run.outputs.artifacts
        write_splits(splits, folder)
        captions = caption(splits, raw.class_names)
        write_captions(captions, folder)
        info = manifest(splits, raw, params, folder) | {"captions": captions.summary()}
        write_json(folder / "manifest.json", info)
        save_png(class_grid(*splits["train"], per_class=10, seed=params.seed), run.outputs.plots / "samples.png")
        save_png(caption_grid(splits["train"][0], captions.texts["train"], seed=params.seed), run.outputs.plots / "captions.png")
        run.metrics.update({f"{name}_images": len(labels) for name, (_, labels) in splits.items()})
        run.metrics["classes"] = len(raw.class_names)
        run.metrics.update(captions.metrics())
        shape = "x".join(map(str, info["image_shape"]))
        print(f"prepared {params.source}: {run.metrics} images of {shape}")


if __name__ == "__main__":
    main("prepare", prepare)
