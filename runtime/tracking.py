"""MLflow records of stage runs: params, step metrics, artifacts and lineage tags.

Uses `MlflowClient` with explicit run ids rather than the fluent API, which is not
thread-safe (Prefect runs tasks in threads). The store is `MLFLOW_TRACKING_URI`, else a
SQLite file `mlflow.db` in the checkout (`checkout_root`); a run is the child of the run named by
`LATENTLAB_PARENT_RUN_ID` (`PARENT_RUN_ENV`) when that is set, else of the parent run of the `dvc repro` it runs
under (one `PipelineRun` per pipeline run, whoever started it).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from runtime.dag import locked_outs, stages
from runtime.env import EXPERIMENT_ENV, PARENT_RUN_ENV
from runtime.invocation import Invocation, current_invocation
from runtime.lineage import git_state
from runtime.mlflow_models import log_network, register_current
from tasks.artifacts import artifacts_dir, metrics_path, plots_dir, read_json
from tasks.params import STAGE_PARAMS, flatten, load_params

EXPERIMENT = "latentlab"
_BATCH = 100  # MLflow's limit of params per log_batch call
HEADLINE = [
    "probe_top1", "kd_student_top1", "kd_gain", "fid_teacher", "fid_student_4", "fid_gan", "total_wall_seconds",
    "overhead_fraction",
]
# What MLflow 3's experiment-kind selector writes; the 3.17 UI follows its own "GenAI / Model
# training" switch instead, which `ui_url` sets (docs/doors.md: Tracking).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# A view of the runs table the UI opens with `?viewStateShareKey=headline` (what its Share button
# saves, as plain JSON): the pipeline runs' headline metrics and what ran, as columns.
RUNS_VIEW = "headline"
RUNS_VIEW_STATE = {
    "selectedColumns": [
        *(f"metrics.`{metric}`" for metric in HEADLINE), "tags.`stages.ran`", "tags.`trigger`", "attributes.`Models`",
    ],
}


def checkout_root() -> Path:
    """Where the local store lives: the working directory, or for an experiment that DVC's queue
    runs in a temporary copy (`<checkout>/.dvc/tmp/exps/<copy>`), the checkout it was queued from,
    so that its runs are not deleted with the copy."""
    here = Path.cwd().resolve()
    parts = here.parts
    for index in range(len(parts) - 3):
        if parts[index : index + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:index])
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{checkout_root() / 'mlflow.db'}"


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


# A tracking server that stops answering costs a stage at most about 20 s: 3 tries of 5 s and
# 1-2 s between them, against MLflow's default of 8 tries of 120 s (unless the user set these).
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def client():
    from mlflow import MlflowClient

    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    # MLflow logs a store's database error with its traceback before raising it: the stage reports it once
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    return MlflowClient(tracking_uri())


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV, EXPERIMENT)


def experiment_id(mlflow_client, name: str | None = None) -> str:
    """The experiment's id, created with artifacts under ./mlartifacts when it is new, and marked a
    model-training experiment (`EXPERIMENT_KIND`) unless someone chose another kind."""
    name = name or experiment_name()
    found = mlflow_client.get_experiment_by_name(name)
    view = (f"mlflow.sharedViewState.{RUNS_VIEW}", json.dumps(RUNS_VIEW_STATE))
    if found is None:
        location = None
        if tracking_uri().startswith("sqlite:"):
            location = (checkout_root() / "mlartifacts").as_uri()
        return mlflow_client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND, view]))
    for key, value in (EXPERIMENT_KIND, view):
        if key not in found.tags:  # a store from before the tag, or kept as someone set it
            mlflow_client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def ui_url(base: str = "http://127.0.0.1:5000") -> str:
    """The `mlflow ui` page of the experiment's runs with the headline columns, in the UI's model
    training view (MLflow 3.17 opens in its GenAI view otherwise)."""
    found = client().get_experiment_by_name(experiment_name())
    experiment = found.experiment_id if found else "0"
    return f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW}"


class StageTracker:
    """The MLflow run of one stage execution (a no-op on DDP ranks other than 0)."""

    def __init__(
        self, stage: str, params: BaseModel, *, deps: dict[str, str], device: str = "cpu", enabled: bool = True,
        parent: str | None = None,
    ):
        self.stage = stage
        self.enabled = enabled
        self.run_id: str | None = None
        self.unreachable: Exception | None = None  # the error that cut the server off, if one did
        if not enabled:
            return
        import torch

        self._client = client()
        tags = {
            "stage": stage,
            "device": device,
            "torch.version": torch.__version__,
            "host.python": platform.python_version(),
            **{f"dvc.dep.{path}": digest for path, digest in deps.items()},
            **({"mlflow.parentRunId": parent} if parent else {}),
        }
        self.run_id = _create_run(self._client, stage, tags)
        _log_params(self._client, self.run_id, flatten(params, stage))
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="mlflow-metrics")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send the metrics from a background thread: the training loop never waits on the server.
        Once a send fails (after MLflow's bounded retries, `HTTP_LIMITS`), nothing more is sent."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._sender.submit(self._send, batch)

    def _send(self, batch: list) -> None:
        if self.unreachable is not None:
            return
        try:
            for start in range(0, len(batch), 1000):
                self._client.log_batch(self.run_id, metrics=batch[start : start + 1000])
        except Exception as err:
            self.unreachable = err
            print(f"warning: MLflow ({tracking_uri()}) stopped answering ({type(err).__name__}); stage "
                  f"'{self.stage}' trains on without sending metrics", file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Wait for the metrics sent so far (bounded: a send that fails ends the sending)."""
        if self.enabled:
            self._sender.shutdown(wait=True)
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="mlflow-metrics")

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

    def log_model(
        self, name: str, kind: str, files: list[Path], example: np.ndarray, params: dict | None = None
    ) -> None:
        """The network in `files` (safetensors + JSON) as the MLflow logged model `name` of this
        run: a pyfunc of `kind` (`runtime/network_pyfunc.py`), loadable without unpickling anything."""
        if self.enabled:
            log_network(self._client, self.run_id, name, kind, files, example, params, tags={"stage": self.stage})

    def finish(self, status: str) -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        if self.enabled:
            self._client.set_terminated(self.run_id, status)


def _create_run(mlflow_client, name: str, tags: dict[str, str], start_ms: int | None = None) -> str:
    """A new run `name` of the experiment, tagged with the git state and this process and machine
    (unless `tags` name another process), so that `end_orphans` can end it if the process dies
    first; this machine's orphans are ended before. Its id."""
    tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(), **git_state(), **tags}
    tags["mlflow.source.git.commit"] = tags["git.commit"]
    experiment = experiment_id(mlflow_client)
    end_orphans(mlflow_client, experiment)
    return mlflow_client.create_run(experiment, start_time=start_ms, run_name=name, tags=tags).info.run_id


def _log_params(mlflow_client, run_id: str, values: dict) -> None:
    from mlflow.entities import Param

    flat = [Param(k, str(v)) for k, v in values.items()]
    for start in range(0, len(flat), _BATCH):
        mlflow_client.log_batch(run_id, params=flat[start : start + _BATCH])


def headline_metrics() -> dict[str, float]:
    """probe top-1, the distilled classifier's top-1 and its gain over the same student trained on the
    labels alone, FID of the teacher at its most steps, of the 4-step student and of the GAN, where present."""

    def read(stage: str) -> dict[str, float]:
        return read_json(metrics_path(stage)) if metrics_path(stage).exists() else {}

    probe, kd, fid = read("probe"), read("kd"), read("fid")
    headline = {}
    if "probe_top1" in probe:
        headline["probe_top1"] = probe["probe_top1"]
    if "kd_gain" in kd:
        headline["kd_student_top1"], headline["kd_gain"] = kd["student.with_kd.top1"], kd["kd_gain"]
    teacher = {int(key.rpartition("_")[2]): value for key, value in fid.items() if key.startswith("fid.teacher.steps_")}
    if teacher:
        headline["fid_teacher"] = teacher[max(teacher)]
    if "fid.student.steps_4" in fid:
        headline["fid_student_4"] = fid["fid.student.steps_4"]
    if "fid.gan" in fid:
        headline["fid_gan"] = fid["fid.gan"]
    return headline


PID_TAG = "latentlab.pid"  # the process a run lives in, on
HOST_TAG = "latentlab.host"  # this machine: a run whose process is gone is ended as KILLED


def end_orphans(mlflow_client, experiment: str) -> list[str]:
    """End as KILLED the RUNNING runs of this machine whose process is gone (killed with no chance
    to end its run: `kill -9`, the out-of-memory killer, a lost machine's reboot); their ids."""
    import psutil

    host = socket.gethostname()
    running = mlflow_client.search_runs(
        [experiment], f"attributes.status = 'RUNNING' AND tags.`{HOST_TAG}` = '{host}'", max_results=1000
    )
    ended = []
    for run in running:
        try:  # a process of that PID started after the run did is another one
            alive = psutil.Process(int(run.data.tags[PID_TAG])).create_time() <= run.info.start_time / 1000 + 1
        except (psutil.Error, KeyError, ValueError):
            alive = False
        if not alive:
            mlflow_client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


PIPELINE_TAG = "latentlab.pipeline"
INVOCATION_TAG = "latentlab.invocation"
OUT_TAG = "dvc.out."  # + an out's path: its DVC hash, on the stage run that made it
REUSED_TAG = "reused."  # + a stage: the run that made the outputs a pipeline run reused


class PipelineRun:
    """The parent MLflow run of one pipeline run: every stage's params, a child run per stage that
    ran, and the headline metrics (probe and kd top-1, FIDs, wall and compute time, overhead share).

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
        run_id = _create_run(mlflow_client, name, {PIPELINE_TAG: "true", "trigger": trigger, **(tags or {})}, start_ms)
        params = {key: value for stage in STAGE_PARAMS for key, value in flatten(load_params(stage), stage).items()}
        _log_params(mlflow_client, run_id, params)
        return cls(run_id, mlflow_client, stages_finish_it=stages_finish_it)

    @classmethod
    def from_env(cls) -> PipelineRun | None:
        run_id = os.environ.get(PARENT_RUN_ENV)
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
        tags = {INVOCATION_TAG: invocation.key, PID_TAG: str(invocation.pid), **({"dvc.experiment": experiment} if experiment else {})}
        name = experiment or time.strftime("dvc-repro-%Y%m%d-%H%M%S", time.localtime(invocation.started))
        return cls.start(name, "dvc repro", tags, start_ms=int(invocation.started * 1000), stages_finish_it=True)

    def finish(self, status: str, tags: dict[str, str] | None = None) -> None:
        """Record what the pipeline run did: headline metrics as the workspace holds them now; wall
        time since the run started, the summed `wall_seconds` of its stage runs and the share of the
        wall time that was neither; which stages ran (`stages.ran`) and, for a run that succeeded,
        the run that made each output it reused (`reused.<stage>`, `stages.reused`, the run's
        description), the FID table and plot under `fid/`, and the registry's `@current` models.
        The run ends with `status`: FINISHED, FAILED or KILLED (interrupted); one that finished
        without running any stage recorded no result: it is deleted."""
        from mlflow.entities import Metric, RunTag

        ok = status == "FINISHED"
        run = self._client.get_run(self.run_id)
        experiment = run.info.experiment_id
        children = self._client.search_runs([experiment], f"tags.mlflow.parentRunId = '{self.run_id}'", max_results=1000)
        if ok and not children:  # every stage was up to date (the Prefect flow run still shows it)
            self._client.delete_run(self.run_id)
            return
        ran = [stage for stage in stages() if any(child.data.tags.get("stage") == stage for child in children)]
        sources = output_sources(self._client, experiment, children) if ok else {}
        reused = {stage: source for stage, source in sources.items() if stage not in ran}
        wall = time.time() - run.info.start_time / 1000
        compute = sum(child.data.metrics.get("wall_seconds", 0.0) for child in children)
        metrics = {
            **headline_metrics(), "total_wall_seconds": wall, "compute_seconds": compute,
            "overhead_fraction": max(0.0, 1 - compute / wall), "stages_run": len(ran),
        }
        summary = {
            "stages.ran": ",".join(ran), "stages.reused": ",".join(reused),
            **{REUSED_TAG + stage: source.info.run_id for stage, source in reused.items()},
            "mlflow.note.content": _describe(ran, reused, [s for s in locked_outs() if s not in ran and s not in reused] if ok else []),
        }
        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, str(v)) for k, v in {**summary, **(tags or {})}.items()],
        )
        for key in run.data.tags:  # a plain `dvc repro` finishes after each stage: drop what ran since
            if key.startswith(REUSED_TAG) and key.removeprefix(REUSED_TAG) not in reused:
                self._client.delete_tag(self.run_id, key)
        if ok:
            for path in [artifacts_dir("fid") / "fid_table.md", *sorted(plots_dir("fid").glob("fid_vs_nfe*"))]:
                if path.is_file():
                    self._client.log_artifact(self.run_id, str(path), "fid")
            register_current(self._client, sources, self.run_id)
        self._client.set_terminated(self.run_id, status)


def output_sources(mlflow_client, experiment: str, children) -> dict:
    """`{stage: the finished stage run that made its current outputs}`, in dvc.yaml's order: this
    pipeline run's own stage runs, else the newest run whose `dvc.out.<path>` tags hold the hashes
    dvc.lock records (none for outputs made outside this tracking store)."""
    own = {
        child.data.tags.get("stage"): child
        for child in sorted(children, key=lambda child: child.info.start_time) if child.info.status == "FINISHED"
    }
    locked = locked_outs()
    sources = {}
    for stage in stages():
        if stage in own:
            sources[stage] = own[stage]
        elif outs := locked.get(stage):
            match = " AND ".join(f"tags.`{OUT_TAG}{path}` = '{digest}'" for path, digest in outs.items())
            found = mlflow_client.search_runs(
                [experiment], f"{match} AND attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if found:
                sources[stage] = found[0]
    return sources


def _describe(ran: list[str], reused: dict, untracked: list[str]) -> str:
    """The parent run's description (Markdown, shown on its Overview): what ran, what was reused."""
    lines = [f"**Ran:** {', '.join(ran) or 'nothing'} (the child runs)."]
    if reused:
        links = [
            f"{stage} ([run {source.info.run_id[:8]}](#/experiments/{source.info.experiment_id}/runs/{source.info.run_id}))"
            for stage, source in reused.items()
        ]
        lines.append(f"**Reused the outputs of:** {', '.join(links)}.")
    if untracked:
        lines.append(f"**Reused, made by no run in this tracking store:** {', '.join(untracked)}.")
    return "\n\n".join(lines)


def current_pipeline_run() -> PipelineRun | None:
    """The parent a stage run belongs to: the one named in the environment, else the one of the
    `dvc` process it runs under (None for a stage run on its own)."""
    named = PipelineRun.from_env()
    if named is not None:
        return named
    invocation = current_invocation()
    return PipelineRun.for_invocation(invocation) if invocation else None
