"""MLflow records of stage runs: params, step metrics, artifacts and lineage tags.

Uses `MlflowClient` with explicit run ids rather than the fluent API, which is not
thread-safe (Prefect runs tasks in threads). The store is `MLFLOW_TRACKING_URI`, else a
SQLite file `mlflow.db` in the working directory; a run is the child of the run named by
`LATENTLAB_PARENT_RUN_ID` when that is set, else of the parent run of the `dvc repro` it runs
under (one `PipelineRun` per pipeline run, whoever started it).
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from runtime.invocation import Invocation, current_invocation
from runtime.lineage import git_state
from tasks.artifacts import metrics_path, read_json
from tasks.params import STAGE_PARAMS, flatten, load_params

EXPERIMENT = "latentlab"
PARENT_ENV = "LATENTLAB_PARENT_RUN_ID"
_BATCH = 100  # MLflow's limit of params per log_batch call


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


class TrackingUnreachable(ConnectionError):
    """The MLflow tracking server does not answer: a transient failure (the stage exits 75)."""


def check_reachable(timeout: float = 5) -> None:
    """Fail within seconds when an HTTP tracking server does not answer, rather than after MLflow's
    ~4 minutes of retries; any HTTP answer will do."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise TrackingUnreachable(
            f"the MLflow tracking server {uri} does not answer ({type(err).__name__}); start it, or unset "
            "MLFLOW_TRACKING_URI to use the local store"
        ) from err


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())


def experiment_name() -> str:
    return os.environ.get("LATENTLAB_EXPERIMENT", EXPERIMENT)


def experiment_id(mlflow_client, name: str | None = None) -> str:
    """The experiment's id, created with artifacts under ./mlartifacts when it is new."""
    name = name or experiment_name()
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
        self, stage: str, params: BaseModel, *, deps: dict[str, str], device: str = "cpu", enabled: bool = True,
        parent: str | None = None,
    ):
        self.stage = stage
        self.enabled = enabled
        self.run_id: str | None = None
        if not enabled:
            return
        import torch

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
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self._client.create_run(experiment_id(self._client), run_name=stage, tags=tags)
        self.run_id = run.info.run_id
        _log_params(self._client, self.run_id, flatten(params, stage))

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

    def log_model(self, module, name: str) -> None:
        """`module` (a CPU copy) as an MLflow PyTorch model at `models/<name>`, loadable with
        `mlflow.pytorch.load_model("runs:/<run id>/models/<name>")`; it carries the `models` package."""
        if not self.enabled:
            return
        import mlflow.pytorch
        import torch

        import models

        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pytorch.save_model(
                copy.deepcopy(module).cpu().eval(), Path(tmp) / name,
                serialization_format="pickle", code_paths=[str(Path(models.__file__).parent)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
            self._client.log_artifacts(self.run_id, str(Path(tmp) / name), f"models/{name}")

    def finish(self, ok: bool) -> None:
        if self.enabled:
            self._client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _log_params(mlflow_client, run_id: str, values: dict) -> None:
    from mlflow.entities import Param

    flat = [Param(k, str(v)) for k, v in values.items()]
    for start in range(0, len(flat), _BATCH):
        mlflow_client.log_batch(run_id, params=flat[start : start + _BATCH])


def headline_metrics() -> dict[str, float]:
    """probe top-1, FID of the teacher at its most steps and of the 4-step student, where present."""

    def read(stage: str) -> dict[str, float]:
        return read_json(metrics_path(stage)) if metrics_path(stage).exists() else {}

    probe, fid = read("probe"), read("fid")
    headline = {}
    if "probe_top1" in probe:
        headline["probe_top1"] = probe["probe_top1"]
    teacher = {int(key.rpartition("_")[2]): value for key, value in fid.items() if key.startswith("fid.teacher.steps_")}
    if teacher:
        headline["fid_teacher"] = teacher[max(teacher)]
    if "fid.student.steps_4" in fid:
        headline["fid_student_4"] = fid["fid.student.steps_4"]
    return headline


PIPELINE_TAG = "latentlab.pipeline"
INVOCATION_TAG = "latentlab.invocation"


class PipelineRun:
    """The parent MLflow run of one pipeline run: every stage's params, a child run per stage that
    ran, and the headline metrics (probe top-1, FIDs, wall and compute time, overhead share).

    The Prefect pipeline flow starts one and hands its id to the stages in `LATENTLAB_PARENT_RUN_ID`;
    under a plain `dvc repro` the first stage that runs starts it, keyed on the `dvc` process, and
    each stage after it finds it again.
    """

    def __init__(self, run_id: str, mlflow_client=None, *, stages_finish_it: bool = False):
        self.run_id = run_id
        self.stages_finish_it = stages_finish_it  # no flow around a plain `dvc repro` to finish it
        self._client = mlflow_client or client()

    @classmethod
    def start(
        cls, name: str, trigger: str, tags: dict[str, str] | None = None, start_ms: int | None = None,
        stages_finish_it: bool = False,
    ) -> PipelineRun:
        mlflow_client = client()
        tags = {PIPELINE_TAG: "true", "trigger": trigger, **git_state(), **(tags or {})}
        tags["mlflow.source.git.commit"] = tags["git.commit"]
        run = mlflow_client.create_run(experiment_id(mlflow_client), start_time=start_ms, run_name=name, tags=tags)
        params = {key: value for stage in STAGE_PARAMS for key, value in flatten(load_params(stage), stage).items()}
        _log_params(mlflow_client, run.info.run_id, params)
        return cls(run.info.run_id, mlflow_client, stages_finish_it=stages_finish_it)

    @classmethod
    def from_env(cls) -> PipelineRun | None:
        run_id = os.environ.get(PARENT_ENV)
        return cls(run_id) if run_id else None

    @classmethod
    def for_invocation(cls, invocation: Invocation) -> PipelineRun:
        """The parent run of this `dvc repro` (or `dvc exp run`), started by its first stage."""
        mlflow_client = client()
        found = mlflow_client.search_runs(
            [experiment_id(mlflow_client)], f"tags.`{INVOCATION_TAG}` = '{invocation.key}'", max_results=1
        )
        if found:
            return cls(found[0].info.run_id, mlflow_client, stages_finish_it=True)
        experiment = os.environ.get("DVC_EXP_NAME")
        tags = {INVOCATION_TAG: invocation.key, **({"dvc.experiment": experiment} if experiment else {})}
        name = experiment or time.strftime("dvc-repro-%Y%m%d-%H%M%S", time.localtime(invocation.started))
        return cls.start(name, "dvc repro", tags, start_ms=int(invocation.started * 1000), stages_finish_it=True)

    def finish(self, ok: bool, tags: dict[str, str] | None = None) -> None:
        """Headline metrics as the workspace holds them now; wall time since the run started, the
        summed `wall_seconds` of its stage runs, and the share of the wall time that was neither."""
        from mlflow.entities import Metric, RunTag

        run = self._client.get_run(self.run_id)
        wall = time.time() - run.info.start_time / 1000
        children = self._client.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}'", max_results=1000
        )
        compute = sum(child.data.metrics.get("wall_seconds", 0.0) for child in children)
        metrics = {
            **headline_metrics(), "total_wall_seconds": wall, "compute_seconds": compute,
            "overhead_fraction": max(0.0, 1 - compute / wall), "stages_run": len(children),
        }
        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )
        self._client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def current_pipeline_run() -> PipelineRun | None:
    """The parent a stage run belongs to: the one named in the environment, else the one of the
    `dvc` process it runs under (None for a stage run on its own)."""
    named = PipelineRun.from_env()
    if named is not None:
        return named
    invocation = current_invocation()
    return PipelineRun.for_invocation(invocation) if invocation else None
