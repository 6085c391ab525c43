"""One execution of a stage: `StageRun` holds its outputs (atomic), its MLflow run, its device,
step curves and wall time. What happens when it ends is `runtime.stage_end`; what
`python -m flows.<stage>` does around it, `runtime.stage_process`."""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel

from runtime.dag import dep_hashes
from runtime.stage_end import end
from runtime.tracking import StageTracker, current_pipeline_run
from tasks.artifacts import StageOutputs
from tasks.curves import StepCurves
from tasks.device import Distributed, pick_device


class StageRun:
    """Context manager around a stage's work. Inside it the stage writes into `outputs` (moved into
    place only if it succeeds), fills `metrics`, and logs step metrics (`log`) and the networks to
    register (`log_model`); its MLflow run, the child of the pipeline run it belongs to
    (`PipelineRun`), is set up in the background meanwhile. On leaving, `runtime.stage_end.end`
    checks the inputs and puts the outputs in place and tracks them, or discards them. Only rank 0 of a
    torchrun launch writes or tracks."""

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
        self.models: list[tuple] = []  # (name, kind, network, with_files, example, params) of `log_model`
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

    def log_model(
        self, name: str, kind: str, example, network: str | None = None, with_files: list[Path] = (),
        **params: float,
    ) -> None:
        """The network this stage exported as artifacts/<stage>/<network>.{safetensors,json}
        (`network` defaults to `name`), and `with_files` it needs (a generator: the VAE decoder's), as
        the MLflow logged model `name` of its run, a pyfunc of `kind` (`runtime/network_pyfunc.py`:
        encoder, classifier, vae or generator) with `example` as its input example and `params` as predict's
        defaults; logged when the stage succeeds, outside its `wall_seconds`."""
        example = example.cpu().numpy() if hasattr(example, "cpu") else example
        self.models.append((name, kind, network or name, list(with_files), example, params))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.is_main:
            return False
        if exc is None:
            self.metrics["wall_seconds"] = round(time.perf_counter() - self.started, 3)
        end(self, exc)
        return False
