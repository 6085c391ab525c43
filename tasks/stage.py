"""One execution of a stage: its outputs (atomic), its MLflow run, its device and wall time."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

from pydantic import BaseModel

from tasks.artifacts import StageOutputs, checkpoint_path, plots_dir
from tasks.lineage import dep_hashes
from tasks.tracking import StageTracker
from tasks.training import Distributed, pick_device


class StageRun:
    """Context manager around a stage's work.

    On success the outputs are renamed into place, `metrics` (plus `wall_seconds`) become
    metrics/<stage>.json and MLflow metrics, the plots are uploaded, and the stage's
    resumable checkpoint is removed. On failure nothing is put in place and the MLflow run
    is marked FAILED. Only rank 0 of a torchrun launch writes or tracks anything.
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
        self.started = time.perf_counter()
        self.outputs = StageOutputs(self.stage) if self.is_main else None
        self.tracker = StageTracker(
            self.stage, self.params, deps=self.deps, device=str(self.device), enabled=self.is_main
        )
        return self

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Step metrics to MLflow (e.g. the training loop's `log` callback)."""
        self.tracker.log_metrics(metrics, step)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.is_main:
            return False
        if exc is not None:
            self.outputs.discard()
            self.tracker.finish(ok=False)
            return False
        self.metrics["wall_seconds"] = round(time.perf_counter() - self.started, 3)
        self.outputs.metrics = self.metrics
        self.outputs.commit()
        self.tracker.log_metrics(self.metrics)
        self.tracker.log_artifacts(plots_dir(self.stage), "plots")
        self.tracker.finish(ok=True)
        shutil.rmtree(checkpoint_path(self.stage).parent, ignore_errors=True)
        return False
