"""encoder: freeze the SSL backbone, export it (safetensors + JSON), embed every split, plot them."""

import numpy as np
from prefect import flow

from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.artifacts import artifacts_dir
from tasks.data import SPLITS, load_manifest, load_split
from tasks.encoder import (
    backbone_from_ssl,
    check_not_collapsed,
    embed,
    export_encoder,
    load_encoder,
    project_2d,
)
from tasks.params import EncoderParams
from tasks.plots import scatter_by_class


@flow(name="encoder", log_prints=True)
def encoder(params: EncoderParams) -> None:
    with StageRun("encoder", params) as run:
        folder = run.outputs.artifacts
        backbone, config = backbone_from_ssl(artifacts_dir("ssl"))
        export_encoder(backbone, config, folder)
        frozen = load_encoder(folder, run.device)  # what later stages get: rebuilt from the two files alone
        splits = {name: load_split(name, run.device) for name in SPLITS}
        run.log_model("encoder", "encoder", splits["test"].floats(slice(0, 2)))
        embeddings = stage_task(lambda: {n: embed(frozen, s, params.batch_size) for n, s in splits.items()}, name="embed")()
        run.metrics.update(check_not_collapsed(embeddings["train"], params.collapse_tolerance))
        for name, features in embeddings.items():
            np.save(folder / f"{name}_embeddings.npy", features.cpu().numpy())
        run.metrics["embedding_dim"] = embeddings["train"].shape[1]

        rng = np.random.default_rng(params.seed)
        test = embeddings["test"].cpu().numpy()
        shown = rng.permutation(len(test))[: params.plot_points]
        points = stage_task(project_2d, name="project-2d")(test[shown], params.plot_method, params.seed)
        labels = splits["test"].labels.cpu().numpy()[shown]
        title = f"test embeddings ({params.plot_method.upper()}, {len(shown)} points)"
        scatter_by_class(points, labels, load_manifest()["class_names"], title, run.outputs.plots / "embedding_2d.png")
        print(f"encoder: {config['name']} -> {run.metrics['embedding_dim']}-d embeddings; {run.metrics}")


if __name__ == "__main__":
    main("encoder", encoder)
