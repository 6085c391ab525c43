"""MLflow records of stage runs: params, step metrics, artifacts and lineage tags.

Uses `MlflowClient` with explicit run ids rather than the fluent API, which is not
thread-safe (Prefect runs tasks in threads). The store is `MLFLOW_TRACKING_URI`, else a
SQLite file `mlflow.db` in the working directory; a run is the child of the run named by
`LATENTLAB_PARENT_RUN_ID` when that is set.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from pydantic import BaseModel

from tasks.lineage import git_state
from tasks.params import flatten

EXPERIMENT = "latentlab"
PARENT_ENV = "LATENTLAB_PARENT_RUN_ID"
_BATCH = 100  # MLflow's limit of params per log_batch call


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())


def experiment_id(mlflow_client, name: str | None = None) -> str:
    """The experiment's id, created with artifacts under ./mlartifacts when it is new."""
    name = name or os.environ.get("LATENTLAB_EXPERIMENT", EXPERIMENT)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = Path("mlartifacts").resolve().as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


class StageTracker:
    """The MLflow run of one stage execution (a no-op on DDP ranks other than 0)."""

    def __init__(
        self, stage: str, params: BaseModel, *, deps: dict[str, str], device: str = "cpu", enabled: bool = True
    ):
        self.stage = stage
        self.enabled = enabled
        self.run_id: str | None = None
        if not enabled:
            return
        import torch
        from mlflow.entities import Param

        self._client = client()
        tags = {
            "stage": stage,
            "device": device,
            "torch.version": torch.__version__,
            "host.python": platform.python_version(),
            **git_state(),
            **{f"dvc.dep.{path}": digest for path, digest in deps.items()},
        }
        tags["mlflow.source.git.commit"] = tags["git.commit"]
        parent = os.environ.get(PARENT_ENV)
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self._client.create_run(experiment_id(self._client), run_name=stage, tags=tags)
        self.run_id = run.info.run_id
        params_flat = [Param(k, str(v)) for k, v in flatten(params, stage).items()]
        for start in range(0, len(params_flat), _BATCH):
            self._client.log_batch(self.run_id, params=params_flat[start : start + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):
            self._client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        """Upload every file under `folder` (e.g. the stage's plots)."""
        if self.enabled and Path(folder).is_dir() and any(Path(folder).iterdir()):
            self._client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, ok: bool) -> None:
        if self.enabled:
            self._client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
