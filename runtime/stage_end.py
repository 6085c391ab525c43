"""What happens when a stage ends (`StageRun.__exit__`, rank 0 only).

First the stage's MLflow metrics are flushed and its inputs checked: params/<stage>.yaml must hold
the values it ran with, its deps must hash as they did when it started, and no code dep may be newer
than the code this process loaded. DVC records those files in dvc.lock after the stage, so a change
under a running stage would label its outputs with inputs they did not come from.

A stage that succeeded (`succeeded`): `metrics` (with `wall_seconds`, the stage's own work without
tracking) become metrics/<stage>.json, the logged step metrics plots/<stage>/train.csv and
eval.csv; the MLflow run gets the metrics, the DVC hash of each out (`dvc.out.<path>`, what a later
pipeline run that reuses them links to), the plots and the models, all from the outputs' temporary
places, and ends FINISHED; only then are the outputs renamed into place (a tracking server that
stops answering before fails the stage with nothing changed), the stage's resumable checkpoint
removed and the pipeline run brought up to date (a server gone by then only skips that, with a
warning). One that did not (`failed`: an error, an interrupt, changed inputs, a tracking
server that stopped answering): nothing is put in place, its MLflow run ends FAILED (KILLED for an
interrupt) and the pipeline run is brought up to date.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from prefect.exceptions import TerminationSignal

from runtime.dag import changed_deps, dvc_hash, stage_outs
from runtime.failures import is_transient
from runtime.mlflow_models import network_files
from runtime.tracking import OUT_TAG, StageTracker, TrackingUnreachable, tracking_uri
from tasks.artifacts import checkpoint_path, without_float_noise
from tasks.errors import StageError
from tasks.params import ParamsError, flatten, load_params, params_path

if TYPE_CHECKING:
    from runtime.stage import StageRun

CODE_LOADED_AT = time.time()  # imported with runtime.stage, before any stage's code (also in the warm host)


class InputsChanged(StageError):
    """The stage's params or deps changed while it ran: its outputs would carry the wrong label."""


STOPPED_BY: list[int] = []  # the signals that stopped this stage process (runtime.stage_process)


def end(run: StageRun, exc: BaseException | None) -> None:
    """End `run`, which raised `exc` (None: it succeeded); raises what the stage's own error does
    not say: a tracking failure, changed inputs, a tracking server that stopped answering, or a
    Ctrl-C or SIGTERM whose exception Python dropped on the way."""
    stopped = None
    if exc is None and STOPPED_BY:  # stopped, though Python dropped the exception on the way
        number = STOPPED_BY[0]
        exc = stopped = KeyboardInterrupt() if number == signal.SIGINT else TerminationSignal(number)
    try:
        tracker = run.tracker  # a tracking failure (e.g. server unreachable) fails the stage
        tracker.flush()
    except BaseException:
        run.outputs.discard()
        raise
    changed = changed_inputs(run) if exc is None else []
    if exc is not None or changed or tracker.unreachable:
        failed(run, tracker, exc, changed)
        if stopped:
            raise stopped
    else:
        succeeded(run, tracker)


def failed(run: StageRun, tracker: StageTracker, exc: BaseException | None, changed: list[str]) -> None:
    run.outputs.discard()
    if tracker.unreachable is None:
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, TerminationSignal)) else "FAILED"
        with suppress(Exception):  # recording a failure must not hide its cause (a full disk)
            tracker.finish(status)
            update_pipeline(run, status)
    if changed:
        raise InputsChanged(
            f"inputs changed while the stage ran: {'; '.join(changed)}. Its outputs came from the inputs it "
            "started with, so nothing was put in place (dvc.lock keeps the last good run); run the stage again"
        )
    if exc is None:
        raise unreachable(tracker)


def unreachable(tracker: StageTracker) -> TrackingUnreachable:
    """The error of a stage whose tracking server stopped answering while it ran."""
    error = TrackingUnreachable(
        f"the MLflow tracking server {tracking_uri()} stopped answering while the stage ran "
        f"({type(tracker.unreachable).__name__}), so its run {tracker.run_id} lacks metrics; nothing was "
        "put in place. Start the server again (or unset MLFLOW_TRACKING_URI) and rerun the stage"
    )
    error.__cause__ = tracker.unreachable
    return error


def succeeded(run: StageRun, tracker: StageTracker) -> None:
    run.metrics = without_float_noise(run.metrics)
    run.outputs.metrics = run.metrics
    run.curves.write(run.outputs.plots)
    try:
        tracker.log_metrics(run.metrics)
        tracker.flush()
        if tracker.unreachable is not None:
            raise unreachable(tracker)
        tracker.set_tags({f"{OUT_TAG}{out}": dvc_hash(run.outputs.staged(Path(out))) for out in stage_outs(run.stage)})
        tracker.log_artifacts(run.outputs.plots, "plots")
        for name, kind, network, with_files, example, params in run.models:
            tracker.log_model(name, kind, network_files(run.outputs.artifacts, network) + with_files, example, params)
        tracker.finish("FINISHED")
    except BaseException as err:
        if is_transient(err):  # the server is gone: nothing more can be recorded
            run.outputs.discard()
        else:  # e.g. a model that does not run on its example: the run ends FAILED
            failed(run, tracker, err, [])
        raise
    run.outputs.commit()
    shutil.rmtree(checkpoint_path(run.stage).parent, ignore_errors=True)
    try:
        update_pipeline(run, "FINISHED")
    except Exception as err:
        if not is_transient(err):
            raise
        print(f"warning: stage '{run.stage}' is done, but MLflow ({tracking_uri()}) stopped answering before its "
              f"pipeline run was brought up to date ({type(err).__name__}); the next stage's end does it", file=sys.stderr)


def changed_inputs(run: StageRun) -> list[str]:
    """What changed since the run started: the params file's values, deps' hashes, code deps
    edited after this process imported them."""
    changed = [f"{dep} changed" for dep in changed_deps(run.stage, run.deps)]
    changed += [
        f"{dep} changed after this process loaded it"
        for dep in run.deps
        if dep.endswith(".py") and Path(dep).exists() and Path(dep).stat().st_mtime > CODE_LOADED_AT
        and f"{dep} changed" not in changed
    ]
    path = params_path(run.stage)
    if path.exists():
        try:
            now = flatten(load_params(run.stage), run.stage)
        except ParamsError:
            return [f"{path} changed (it no longer validates)", *changed]
        ran = flatten(run.params, run.stage)
        keys = [f"{key}: {ran.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(ran) | set(now)) if ran.get(key) != now.get(key)]
        if keys:
            changed.insert(0, f"{path} changed ({', '.join(keys)})")
    return changed


def update_pipeline(run: StageRun, status: str) -> None:
    """The pipeline run a plain `dvc repro` started, brought up to date after each stage."""
    if run.pipeline is not None and run.pipeline.stages_finish_it:
        run.pipeline.finish(status)
