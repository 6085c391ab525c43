"""What `python -m flows.<stage>` does: validate the params, live only as long as what started
it, hold the stage's lock, find the Prefect API, run the flow (as a subflow run of the pipeline
flow's task run when that started it), and turn errors into one message and an exit code."""

from __future__ import annotations

import _imp
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect.exceptions import TerminationSignal

from runtime.failures import TRANSIENT_EXIT, disk_full, is_transient
from runtime.lifetime import end_with_starters
from runtime.logs import ReportedOnce, warnings_to_run_logs
from runtime.server import stage_api
from runtime.stage_end import STOPPED_BY
from runtime.stage_flow import run_flow
from runtime.tracking import TrackingUnreachable, check_reachable
from tasks.artifacts import CHECKPOINTS
from tasks.device import Distributed
from tasks.errors import StageError
from tasks.params import load_params


def main(stage: str, flow: Callable) -> None:
    """What `python -m flows.<stage>` does. A stage run under `dvc` (or the pipeline flow) ends
    when that ends; Ctrl-C or SIGTERM end it quietly with 128 + the signal's number (its
    launcher, `runtime.outcome`, says so and puts back the last good outputs)."""
    once = ReportedOnce()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(once)
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _stop)
    sys.unraisablehook = _stop_dropped
    try:
        params = load_params(stage)
        end_with_starters(f"stage '{stage}'")
        if Distributed.from_env().is_main:
            check_reachable()
            warnings_to_run_logs()
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
        if STOPPED_BY:  # Ctrl-C or SIGTERM, its exception turned into another on the way (in Prefect's crash handling)
            sys.exit(128 + STOPPED_BY[0])
        if full := disk_full(err):
            print(f"error in stage '{stage}':\n{full}", file=sys.stderr)
            sys.exit(2)
        if not is_transient(err):
            raise
        if not isinstance(err, TrackingUnreachable):
            traceback.print_exc()
        print(f"error in stage '{stage}' (transient, worth a retry): {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(TRANSIENT_EXIT)


def _stop(number: int, frame) -> None:
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (TerminationSignal, as Prefect's flow engine raises
    it), raised wherever the stage is; and remembered, for Python drops an exception raised inside
    a weakref callback or `__del__` ("Exception ignored in ..."): the stage's end still knows.
    Not inside importlib's or logging's own locking, though (`_holds_a_lock`): there the signal
    comes again 10 ms later."""
    if _holds_a_lock(frame):
        _signal_again(number)
        return
    STOPPED_BY.append(number)
    raise KeyboardInterrupt if number == signal.SIGINT else TerminationSignal(number)


def _holds_a_lock(frame) -> bool:
    """Whether the signal landed where importlib or logging takes its lock: raised between the
    lock's `acquire()` and its `try`, an exception leaves the lock held for good, and the next
    import or log line in another thread (the MLflow tracker's, Prefect's event loop's) waits
    forever, and so does the stage's end. A Ctrl-C test hung so about once in a hundred runs: on
    the import lock, and later on logging's module lock."""
    if _imp.lock_held() or logging._lock._is_owned():
        return True
    return frame is not None and frame.f_code.co_filename in ("<frozen importlib._bootstrap>", logging.__file__)


def _stop_dropped(unraisable) -> None:
    """Python's hook for an exception it drops (raised inside a weakref callback or `__del__`):
    when that is `_stop`'s, the stage would run on to its end unstopped, so the signal comes
    again 10 ms later, raised wherever the stage is then. Any other goes to the default hook."""
    if isinstance(unraisable.exc_value, (KeyboardInterrupt, TerminationSignal)) and STOPPED_BY:
        _signal_again(STOPPED_BY[-1])
        return
    sys.__unraisablehook__(unraisable)


def _signal_again(number: int) -> None:
    """Send this process the signal `number` 10 ms from now."""
    again = threading.Timer(0.01, os.kill, (os.getpid(), number))
    again.daemon = True
    again.start()


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
