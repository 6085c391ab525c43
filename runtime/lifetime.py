"""Nothing a pipeline run starts outlives what started it, even after a `kill -9`.

Two means. A process we start ourselves (`dvc` under the pipeline flow, a Prefect server) gets
the kernel's parent-death signal (Linux `PR_SET_PDEATHSIG`): it is killed the moment the thread
that started it ends. A stage process, whose parent is not what it lives by (the warm host forks
it; `dvc` may run it through a shell), watches what it lives by (its `dvc`, the pipeline flow,
the launcher's connection) and kills itself and its children when one of them goes.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress

from runtime.env import LAUNCHER_ENV
from runtime.invocation import Invocation, current_invocation, lineage

POLL_SECONDS = 0.2
THEN_SECONDS = 30  # for `end_with`'s last words (putting back a stage's outputs)
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent: int) -> None:
    """Be killed when the thread of `parent` that started this process ends (Linux only); called in
    the child, right after the fork. If `parent` is already gone, go now."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def child_dies_with_us() -> dict:
    """`Popen` arguments that make the child die when the calling thread (of this process) ends."""
    if _prctl is None:
        return {}
    parent = os.getpid()
    return {"preexec_fn": lambda: die_with_parent(parent)}


def forward_signals(child: int) -> None:
    """SIGINT and SIGTERM to this process go on to `child` (the stage, in a process group of its
    own), which ends and reports it; this process waits for it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _frame: os.kill(child, number))


def end_with(
    processes: list[Invocation], connection: socket.socket | None = None, what: str = "stage",
    then: Callable[[], None] | None = None,
) -> None:
    """Watch in the background: when one of `processes` ends, or the peer of `connection` closes
    it (it never sends after the request), kill this process's descendants and, after `then`
    (given at most THEN_SECONDS), this process, so nothing more is written."""

    def watch() -> None:
        while all(process.alive() for process in processes):
            if connection is None:
                time.sleep(POLL_SECONDS)
            elif select.select([connection], [], [], POLL_SECONDS)[0]:
                break
        threading.Timer(THEN_SECONDS if then else 1, kill_tree).start()  # even if what follows hangs
        with suppress(OSError):
            os.write(2, f"{what} (PID {os.getpid()}): the process that started it is gone; stopping\n".encode())
        kill_descendants()
        if then is not None:
            with suppress(Exception):
                then()
        kill_tree()

    threading.Thread(target=watch, name="end-with", daemon=True).start()


def end_with_starters(what: str) -> None:
    """A stage process (`what`) ends when what started it goes: the `dvc` (or pipeline flow) it
    runs under and the processes between, and for a torchrun rank, its launcher (`LAUNCHER_ENV`)."""
    if (invocation := current_invocation()) is not None:
        end_with(lineage(invocation), what=what)
    if (launcher := Invocation.handed(LAUNCHER_ENV)) is not None:  # a torchrun rank of `runtime.launch`
        end_with([launcher], what=f"{what} rank {os.environ.get('RANK')}")


def kill_descendants() -> None:
    """SIGKILL this process's descendants. Those in a session of their own (the helpers of
    `runtime.background`) are left alone: they belong to the pipeline run, and end with it."""
    import psutil

    session = os.getsid(0)
    for child in psutil.Process().children(recursive=True):
        with suppress(psutil.Error, OSError):
            if os.getsid(child.pid) == session:
                child.kill()


def kill_tree() -> None:
    """SIGKILL this process's descendants, then itself."""
    kill_descendants()
    os.kill(os.getpid(), signal.SIGKILL)
