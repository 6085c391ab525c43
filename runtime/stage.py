"""One execution of a stage: `main` is what `python -m flows.<stage>` does (validate params, find the
Prefect API, run the flow, turn errors into one message and an exit code); `StageRun` holds the
run's outputs (atomic), its MLflow run, its device, trainers and wall time."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from runtime.dag import dep_hashes
from runtime.server import ensure_api
from runtime.tracking import StageTracker, current_pipeline_run
from tasks.artifacts import StageOutputs, checkpoint_path, plots_dir
from tasks.curves import StepCurves
from tasks.device import Distributed, pick_device
from tasks.errors import StageError
from tasks.params import load_params

TRANSIENT_EXIT = 75  # EX_TEMPFAIL: the pipeline flow retries a stage that exits with it


class StageRun:
    """Context manager around a stage's work.

    The MLflow run is the child of the pipeline run this stage belongs to (`PipelineRun`). On
    success the outputs are renamed into place (with the logged step metrics as curves in
    plots/<stage>/train.csv and eval.csv), `metrics` (plus `wall_seconds`, the stage's own
    work without tracking) become metrics/<stage>.json and MLflow metrics, the plots are uploaded,
    and the stage's resumable checkpoint is removed. On failure nothing is put in place and the
    MLflow run is marked FAILED. A pipeline run that a `dvc repro` started is brought up to date
    (headline metrics, times) after each stage. Only rank 0 of a torchrun launch writes or tracks.
    """

    def __init__(self, stage: str, params: BaseModel):
        self.stage = stage
        self.params = params
        self.dist = Distributed.from_env()
        self.device = pick_device(self.dist)
        self.metrics: dict[str, float] = {}
        self.deps = dep_hashes(stage)
        identity = json.dumps([params.model_dump(mode="json"), self.deps, self.dist.world], sort_keys=True)
        self.fingerprint = hashlib.sha256(identity.encode()).hexdigest()  # what a checkpoint must match

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def __enter__(self) -> StageRun:
        self.outputs = StageOutputs(self.stage) if self.is_main else None
        self.pipeline = None
        self.curves = StepCurves()
        self._models: list[tuple[object, str]] = []
        pool = ThreadPoolExecutor(1)
        self._tracking = pool.submit(self._start_tracking)  # MLflow set-up overlaps the stage's work
        pool.shutdown(wait=False)
        self.started = time.perf_counter()
        return self

    def _start_tracking(self) -> StageTracker:
        self.pipeline = current_pipeline_run() if self.is_main else None
        return StageTracker(
            self.stage, self.params, deps=self.deps, device=str(self.device), enabled=self.is_main,
            parent=self.pipeline.run_id if self.pipeline else None,
        )

    @property
    def tracker(self) -> StageTracker:
        return self._tracking.result()

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Step metrics to MLflow and the stage's curves (e.g. the training loop's `log` callback)."""
        self.tracker.log_metrics(metrics, step)
        if step is not None:
            self.curves.add(metrics, step)

    def log_model(self, module, name: str) -> None:
        """A trained network to MLflow (`mlflow.pytorch`), beside the DVC-tracked export; logged
        when the stage succeeds, outside its `wall_seconds`."""
        self._models.append((module, name))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.is_main:
            return False
        if exc is None:
            self.metrics["wall_seconds"] = round(time.perf_counter() - self.started, 3)
        try:
            tracker = self.tracker  # a tracking failure (e.g. server unreachable) fails the stage
        except BaseException:
            self.outputs.discard()
            raise
        if exc is not None:
            self.outputs.discard()
            tracker.finish(ok=False)
            self._update_pipeline(ok=False)
            return False
        self.outputs.metrics = self.metrics
        self.curves.write(self.outputs.plots)
        self.outputs.commit()
        tracker.log_metrics(self.metrics)
        tracker.log_artifacts(plots_dir(self.stage), "plots")
        for module, name in self._models:
            tracker.log_model(module, name)
        tracker.finish(ok=True)
        shutil.rmtree(checkpoint_path(self.stage).parent, ignore_errors=True)
        self._update_pipeline(ok=True)
        return False

    def _update_pipeline(self, ok: bool) -> None:
        if self.pipeline is not None and self.pipeline.stages_finish_it:
            self.pipeline.finish(ok)


def stage_task(fn: Callable, name: str):
    """A Prefect task over `fn`. Stage tasks pass arrays and modules around: no input hashing,
    no result persistence (DVC already caches the stage's outputs)."""
    return task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)


def is_transient(err: BaseException) -> bool:
    """A network failure (e.g. the tracking or Prefect server briefly unreachable), anywhere in
    the chain of causes."""
    import httpx
    import requests

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConnectionError | TimeoutError | httpx.TransportError | requests.ConnectionError | requests.Timeout):
            return True
        if "Max retries exceeded" in str(err) or "Connection refused" in str(err):
            return True  # MLflow's REST client flattens the requests error into its message
        err = err.__cause__ or err.__context__
    return False


def main(stage: str, flow: Callable) -> None:
    try:
        params = load_params(stage)
        if Distributed.from_env().is_main:
            ensure_api()
            flow(params)
        else:  # other torchrun ranks compute alongside rank 0 without their own flow runs
            flow.fn(params)
    except StageError as err:
        print(f"error in stage '{stage}':\n{err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if not is_transient(err):
            raise
        traceback.print_exc()
        print(f"error in stage '{stage}' (transient, worth a retry): {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(TRANSIENT_EXIT)
