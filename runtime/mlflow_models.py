"""The trained networks in MLflow: each one a logged model of the stage run that made it (the run's
and the experiment's Models tab), and the pipeline's current encoder and best student in the model
registry under the alias `current`.

A logged model is an MLflow pyfunc built from code (`runtime/network_pyfunc.py`) over the network's
safetensors weights and JSON config, with the `tasks` and `models` packages it loads them with: no
file in it is unpickled on load, unlike the `mlflow.pytorch` flavour's pickle format (its `pt2`
format is a traced graph that `torch.export.load` unpickles parts of, and cannot run the samplers).
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

import numpy as np

from tasks.artifacts import artifacts_dir

PYFUNC = Path(__file__).with_name("network_pyfunc.py")
ENCODER_MODEL = "latentlab-encoder"  # the encoder of the pipeline's current outputs
STUDENT_MODEL = "latentlab-student"  # the lowest-FID student of the pipeline's current outputs
ALIAS = "current"
REQUIREMENTS = ("torch", "numpy", "safetensors", "pydantic", "pyyaml", "mlflow")


def network_files(folder: Path, network: str) -> list[Path]:
    """`<network>.safetensors` and `.json`."""
    return [folder / f"{network}.safetensors", folder / f"{network}.json"]


def log_network(
    mlflow_client, run_id: str, name: str, kind: str, files: list[Path], example: np.ndarray,
    params: dict | None = None, tags: dict[str, str] | None = None,
) -> str:
    """Log `files` as the pyfunc model `name` of run `run_id` (in its experiment, with its params)
    and return the model's id. `example` is the input example the signature is inferred from;
    `params` are `predict`'s parameters with their defaults (a generator's steps, guidance, seed)."""
    import mlflow
    from mlflow.models import Model

    import models
    import tasks

    run = mlflow_client.get_run(run_id)
    model = mlflow_client.create_logged_model(
        run.info.experiment_id, name, source_run_id=run_id, tags=tags, params=run.data.params, model_type=kind
    )
    mlflow.set_tracking_uri(mlflow_client.tracking_uri)  # Model.log writes through the fluent client
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)  # not "Inferring model signature" per model
    info = Model.log(
        artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
        python_model=str(PYFUNC), artifacts={file.name: str(file) for file in files},
        model_config={"device": "cpu", name: {"kind": kind, "network": files[0].stem}},  # see network_pyfunc
        code_paths=[str(Path(tasks.__file__).parent), str(Path(models.__file__).parent)],
        input_example=(example, params) if params else example,
        pip_requirements=[f"{package}=={version(package).split('+')[0]}" for package in REQUIREMENTS],
    )
    if info.signature is None:  # MLflow only warns when the example does not run
        raise RuntimeError(f"the MLflow model '{name}' of run {run_id} did not run on its input example (see the warning above)")
    return model.model_id


def logged_model(client, run, name: str):
    """The logged model `name` of `run`, or None."""
    found = client.search_logged_models(
        [run.info.experiment_id], f"source_run_id = '{run.info.run_id}' AND name = '{name}'", max_results=1
    )
    return found[0] if found else None


def best_student(fid_run) -> tuple[int, float] | None:
    """(steps, FID) of the lowest-FID student in an fid stage run's metrics."""
    prefix = "fid.student.steps_"
    scores = {int(key.removeprefix(prefix)): value for key, value in fid_run.data.metrics.items() if key.startswith(prefix)}
    return min(scores.items(), key=lambda item: item[1]) if scores else None


def register_current(client, sources: dict, pipeline_run_id: str) -> dict[str, str]:
    """Point `latentlab-encoder@current` and `latentlab-student@current` at the models of the runs
    that made the current outputs (`sources`: {stage: run}), registering a version where none holds
    that model yet. The student is the lowest-FID one, once the fid run scored these students.
    Returns {registered model: version} of what it points at."""
    pointed = {}
    if "encoder" in sources and (model := logged_model(client, sources["encoder"], "encoder")):
        pointed[ENCODER_MODEL] = _point(client, ENCODER_MODEL, model, {"pipeline_run": pipeline_run_id})
    distill, fid = sources.get("distill"), sources.get("fid")
    students = artifacts_dir("distill").as_posix()
    scored_these = distill and fid and fid.data.tags.get(f"dvc.dep.{students}") == distill.data.tags.get(f"dvc.out.{students}")
    if scored_these and (best := best_student(fid)) is not None:
        steps, score = best
        if model := logged_model(client, distill, f"student_{steps}_steps"):
            tags = {"pipeline_run": pipeline_run_id, "steps": str(steps), "fid": f"{score:.5g}", "fid_run": fid.info.run_id}
            pointed[STUDENT_MODEL] = _point(client, STUDENT_MODEL, model, tags)
    return pointed


def _point(client, name: str, model, tags: dict[str, str]) -> str:
    import mlflow

    source = f"models:/{model.model_id}"  # what the version records (the SQL registry keeps no model_id)
    existing = [v.version for v in client.search_model_versions(f"name = '{name}'") if v.source == source]
    if existing:
        number = str(existing[0])
    else:  # register_model also links the version on the logged model (its "Registered models")
        mlflow.set_tracking_uri(client.tracking_uri)
        number = str(mlflow.register_model(source, name, await_registration_for=0, tags=tags).version)
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, _DESCRIPTIONS[name])
    client.set_registered_model_alias(name, ALIAS, number)
    return number


_DESCRIPTIONS = {
    ENCODER_MODEL: "The frozen SSL encoder: float32 images (N, C, H, W) in [-1, 1] -> embeddings (N, D). "
    f"`@{ALIAS}`: the one the pipeline's current outputs were made with.",
    STUDENT_MODEL: "The lowest-FID distilled student: int64 class labels (N,) -> decoded images (N, C, H, W) in "
    f"[-1, 1]; params steps, guidance, seed. `@{ALIAS}`: the one of the pipeline's current outputs.",
}
