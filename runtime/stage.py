"""One execution of a stage: `main` is what `python -m flows.<stage>` does (validate params, find the
Prefect API, run the flow — as a subflow run of the pipeline flow's task run when that started it —,
turn errors into one message and an exit code); `StageRun` holds the
run's outputs (atomic), its MLflow run, its device, trainers and wall time."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from pydantic import BaseModel

from runtime.dag import changed_deps, dep_hashes, dvc_hash, stage_outs
from runtime.invocation import Invocation, current_invocation, lineage
from runtime.launch import LAUNCHER_ENV
from runtime.lifetime import end_with
from runtime.mlflow_models import network_files
from runtime.server import drain_clients, stage_api
from runtime.tracking import (
    OUT_TAG,
    StageTracker,
    TrackingUnreachable,
    check_reachable,
    current_pipeline_run,
    tracking_uri,
)
from tasks.artifacts import (
    CHECKPOINTS,
    StageOutputs,
    artifacts_dir,
    checkpoint_path,
    plots_dir,
    without_float_noise,
)
from tasks.curves import StepCurves
from tasks.device import Distributed, pick_device
from tasks.errors import StageError
from tasks.params import ParamsError, flatten, load_params, params_path

TRANSIENT_EXIT = 75  # EX_TEMPFAIL: the pipeline flow retries a stage that exits with it
CODE_LOADED_AT = time.time()  # this module is imported before any stage's code (also in the warm host)


class InputsChanged(StageError):
    """The stage's params or deps changed while it ran: its outputs would carry the wrong label."""


PARENT_TASK_RUN_ENV = "LATENTLAB_PARENT_TASK_RUN_ID"  # the pipeline flow's task run this stage runs for
FLOW_RUN_TAGS_ENV = "LATENTLAB_FLOW_RUN_TAGS"  # comma-separated tags of the stage's flow run there


class StageRun:
    """Context manager around a stage's work.

    The MLflow run is the child of the pipeline run this stage belongs to (`PipelineRun`). On
    success the outputs are renamed into place, `metrics` (plus `wall_seconds`, the stage's own
    work without tracking) become metrics/<stage>.json and MLflow metrics, the run is tagged with
    the DVC hash of each out (`dvc.out.<path>`, what a later pipeline run that reuses them links
    to), the logged step metrics become curves in plots/<stage>/train.csv and eval.csv, the plots
    and models are uploaded, and the stage's resumable checkpoint is removed. On failure nothing is put in place and the
    MLflow run is marked FAILED. A pipeline run that a `dvc repro` started is brought up to date
    (headline metrics, times) after each stage. Only rank 0 of a torchrun launch writes or tracks.

    Before putting anything in place, the run checks that params/<stage>.yaml holds the values it
    ran with and that its deps hash as they did when it started (and that no code dep is newer than
    the code this process loaded): DVC records those files in dvc.lock after the stage, so a change
    under a running stage would label its outputs with inputs they did not come from.
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
        self._models: list[tuple] = []
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
        self._models.append((name, kind, network or name, list(with_files), example, params))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.is_main:
            return False
        if exc is None:
            self.metrics["wall_seconds"] = round(time.perf_counter() - self.started, 3)
        try:
            tracker = self.tracker  # a tracking failure (e.g. server unreachable) fails the stage
            tracker.flush()
        except BaseException:
            self.outputs.discard()
            raise
        changed = self._changed_inputs() if exc is None else []
        if exc is not None or changed or tracker.unreachable:
            self.outputs.discard()
            if tracker.unreachable is None:
                killed = isinstance(exc, (KeyboardInterrupt, TerminationSignal))
                with suppress(Exception):  # recording a failure must not hide its cause (a full disk)
                    tracker.finish("KILLED" if killed else "FAILED")
                    self._update_pipeline(ok=False, killed=killed)
            if changed:
                raise InputsChanged(
                    f"inputs changed while the stage ran: {'; '.join(changed)}. Its outputs came from the inputs it "
                    "started with, so nothing was put in place (dvc.lock keeps the last good run); run the stage again"
                )
            if exc is None:
                raise TrackingUnreachable(
                    f"the MLflow tracking server {tracking_uri()} stopped answering while the stage ran "
                    f"({type(tracker.unreachable).__name__}), so its run {tracker.run_id} lacks metrics; nothing was "
                    "put in place. Start the server again (or unset MLFLOW_TRACKING_URI) and rerun the stage"
                ) from tracker.unreachable
            return False
        self.metrics = without_float_noise(self.metrics)
        self.outputs.metrics = self.metrics
        self.curves.write(self.outputs.plots)
        self.outputs.commit()
        tracker.log_metrics(self.metrics)
        tracker.flush()
        tracker.set_tags({f"{OUT_TAG}{out}": dvc_hash(Path(out)) for out in stage_outs(self.stage)})
        tracker.log_artifacts(plots_dir(self.stage), "plots")
        for name, kind, network, with_files, example, params in self._models:
            files = network_files(artifacts_dir(self.stage), network) + with_files
            tracker.log_model(name, kind, files, example, params)
        tracker.finish("FINISHED")
        shutil.rmtree(checkpoint_path(self.stage).parent, ignore_errors=True)
        self._update_pipeline(ok=True)
        return False

    def _changed_inputs(self) -> list[str]:
        """What changed since the run started: the params file's values, deps' hashes, code deps
        edited after this process imported them."""
        changed = [f"{dep} changed" for dep in changed_deps(self.stage, self.deps)]
        changed += [
            f"{dep} changed after this process loaded it"
            for dep in self.deps
            if dep.endswith(".py") and Path(dep).exists() and Path(dep).stat().st_mtime > CODE_LOADED_AT
            and f"{dep} changed" not in changed
        ]
        path = params_path(self.stage)
        if path.exists():
            try:
                now = flatten(load_params(self.stage), self.stage)
            except ParamsError:
                return [f"{path} changed (it no longer validates)", *changed]
            ran = flatten(self.params, self.stage)
            keys = [f"{key}: {ran.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(ran) | set(now)) if ran.get(key) != now.get(key)]
            if keys:
                changed.insert(0, f"{path} changed ({', '.join(keys)})")
        return changed

    def _update_pipeline(self, ok: bool, killed: bool = False) -> None:
        if self.pipeline is not None and self.pipeline.stages_finish_it:
            self.pipeline.finish(ok, killed=killed)


def stage_task(fn: Callable, name: str):
    """A Prefect task over `fn`, its runs named `name`. Stage tasks pass arrays and modules around:
    no input hashing, no result persistence (DVC already caches the stage's outputs)."""
    return task(fn, name=name, task_run_name=name, cache_policy=NO_CACHE, persist_result=False)


def is_transient(err: BaseException) -> bool:
    """A network failure (the tracking or Prefect server unreachable, timing out, or failing every
    retry), anywhere in the chain of causes. MLflow's REST client raises an `MlflowException`
    while handling the `requests` error, so that error is its `__context__`."""
    import httpx
    import requests

    network = (
        ConnectionError, TimeoutError, httpx.TransportError,
        requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError,
    )
    return any(isinstance(cause, network) for cause in causes(err))


LOW_SPACE = 4 << 20  # bytes free below which a failure is put down to the full disk


def disk_full(err: BaseException) -> str | None:
    """What to say when `err`, or an error it came from, is a full disk: ENOSPC, SQLite's
    "database or disk is full", or any error while the working directory's disk is all but full
    (torch.save says only "unexpected pos"); None otherwise."""
    chain = list(causes(err))
    named = [cause for cause in chain if isinstance(cause, OSError) and cause.errno == errno.ENOSPC]
    where = Path(named[0].filename).resolve().parent if named and named[0].filename else Path.cwd().resolve()
    free = shutil.disk_usage(where).free
    if not named and free >= LOW_SPACE and not any("database or disk is full" in str(cause) for cause in chain):
        return None
    return (f"No space left on device in {where} ({free / 2**20:.1f} MiB free; the stage writes artifacts/, "
            "checkpoints/, plots/, metrics/ and the tracking store there); free some space and run it again")


def causes(err: BaseException | None) -> Iterator[BaseException]:
    """`err` and the errors it came from (`__cause__`, else `__context__`), each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


@contextmanager
def stage_lock(stage: str) -> Iterator[None]:
    """Hold this folder's lock of `stage` for the duration, or refuse with a StageError naming its
    holder: two runs of a stage would share its checkpoint and temporary outputs. The kernel
    releases it when the process ends, however it ends, so it never goes stale."""
    path = CHECKPOINTS / f".{stage}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
            raise StageError(
                f"stage '{stage}' is already running in {os.getcwd()}: {holder} holds {path}; "
                "wait for it to finish, or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)


INTERRUPTED = ("aborted by an interrupt signal", "aborted by a termination signal")  # Prefect's crash messages


class ReportedOnce(logging.Filter):
    """Prefect logs a failing task's and flow's exception with its traceback, then again in each
    final state: for a StageError, a message meant for the user, and a full disk, `main` prints it
    once instead; an interrupt, the launcher reports (`runtime.outcome`). Records repeating
    `messages` (reported already) are left out too."""

    def __init__(self, *messages: str):
        super().__init__()
        self.messages: set[str] = set(messages)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (KeyboardInterrupt, TerminationSignal)) or any(m in record.getMessage() for m in INTERRUPTED):
            return False
        if isinstance(error, StageError) or (error is not None and disk_full(error)):
            self.messages.add(str(error))
            return False
        return not any(message in record.getMessage() for message in self.messages)


def _warnings_to_run_logs() -> None:
    """Python warnings raised in a flow or task run go to its logs at WARNING, so the UI's level
    filter finds them; others print as usual."""
    show = warnings.showwarning

    def log_or_show(message, category, filename, lineno, file=None, line=None):
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            logger = get_run_logger()
        except MissingContextError:
            return show(message, category, filename, lineno, file, line)
        logger.warning("%s: %s", category.__name__, message)

    warnings.showwarning = log_or_show


def _terminate(number: int, _frame) -> None:
    raise TerminationSignal(number)


def run_flow(stage: str, flow, params: BaseModel) -> None:
    """The stage's flow run, named after the stage (and the experiment, under `dvc exp run`).
    Started by the pipeline flow (`PARENT_TASK_RUN_ENV` set), it is a subflow run of the pipeline's
    flow run, tagged with it; its logs then go to the API only, since the pipeline task logs this
    process's console output. Otherwise a flow run of its own. Its last logs are sent before this
    returns: a stage process forked by the warm host ends with `os._exit`, which runs no exit handlers."""
    try:
        if parent := os.environ.get(PARENT_TASK_RUN_ENV):
            _run_as_subflow(stage, flow, params, parent)
        else:
            flow.with_options(flow_run_name=flow_run_name(stage))(params)
    finally:
        drain_clients()


def flow_run_name(stage: str) -> str:
    """`stage`, or `stage@experiment` in a run of `dvc exp run` (DVC names the experiment)."""
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"{stage}@{experiment}" if experiment else stage


def _run_as_subflow(stage: str, flow, params: BaseModel, stage_task_run_id: str) -> None:
    """Run `flow` as a subflow run of the stage task run's flow run, under a task run of its own
    that takes the stage task run as its input: Prefect's Task Runs tab leaves out a task run
    with a subflow run (it shows in the graph and the Subflow Runs tab), so the stage task run
    stays listed, with its own state and duration."""
    from uuid import uuid4

    from prefect import Task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import TaskRunResult
    from prefect.flow_engine import run_flow as run_flow_run

    for run_logger in ("prefect.flow_runs", "prefect.task_runs"):  # their API handler sends them
        logging.getLogger(run_logger).propagate = False
    parameters = {"params": params}
    with get_client(sync_client=True) as client:
        pipeline_run_id = client.read_task_run(stage_task_run_id).flow_run_id
        tracking = client.create_task_run(
            Task(name=flow.name, fn=flow.fn), pipeline_run_id, dynamic_key=uuid4().hex, name=stage,
            task_inputs={"stage": [TaskRunResult(id=stage_task_run_id)]},
        )
        flow_run = client.create_flow_run(
            flow, name=flow_run_name(stage), parameters=flow.serialize_parameters(parameters),
            parent_task_run_id=tracking.id,
            tags=[tag for tag in os.environ.get(FLOW_RUN_TAGS_ENV, "").split(",") if tag],
        )
    run_flow_run(flow, flow_run=flow_run, parameters=parameters)


def main(stage: str, flow: Callable) -> None:
    """What `python -m flows.<stage>` does. A stage run under `dvc` (or the pipeline flow) ends
    when that ends; Ctrl-C or SIGTERM end it quietly with 128 + the signal's number (its
    launcher, `runtime.outcome`, says so and puts back the last good outputs)."""
    once = ReportedOnce()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(once)
    signal.signal(signal.SIGTERM, _terminate)  # Prefect's flow engine raises the same while it runs
    try:
        params = load_params(stage)
        if (invocation := current_invocation()) is not None:
            end_with(lineage(invocation), what=f"stage '{stage}'")
        if (launcher := Invocation.handed(LAUNCHER_ENV)) is not None:  # a torchrun rank of `runtime.launch`
            end_with([launcher], what=f"stage '{stage}' rank {os.environ.get('RANK')}")
        if Distributed.from_env().is_main:
            check_reachable()
            _warnings_to_run_logs()
            with stage_lock(stage), stage_api():
                run_flow(stage, flow, params)
        else:  # other torchrun ranks compute alongside rank 0 without their own flow runs
            flow.fn(params)
    except StageError as err:
        print(f"error in stage '{stage}':\n{err}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, TerminationSignal) as err:
        sys.exit(128 + getattr(err, "signal", signal.SIGINT))
    except Exception as err:
        if full := disk_full(err):
            print(f"error in stage '{stage}':\n{full}", file=sys.stderr)
            sys.exit(2)
        if not is_transient(err):
            raise
        if not isinstance(err, TrackingUnreachable):
            traceback.print_exc()
        print(f"error in stage '{stage}' (transient, worth a retry): {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(TRANSIENT_EXIT)
