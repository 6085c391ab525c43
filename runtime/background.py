"""Helper processes that live as long as a pipeline run's invocation (a `dvc repro`, or the
pipeline flow): started once by whichever stage needs them first, found again by the others
through a file named after the invocation, gone when the invocation ends."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.invocation import Invocation


def published(kind: str, invocation: Invocation, suffix: str) -> Path:
    """Where the `kind` helper of `invocation` publishes itself (an address file or a socket)."""
    return Path(tempfile.gettempdir()) / f"latentlab-{kind}-{invocation.key}{suffix}"


def start_once(kind: str, module: str, invocation: Invocation) -> None:
    """Start `python -m <module> PID STARTED` in the background unless someone already did."""
    claim = published(kind, invocation, ".started")
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    subprocess.Popen(
        [sys.executable, "-m", module, str(invocation.pid), repr(invocation.started)],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def wait_for(path: Path, seconds: float) -> bool:
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.1)
    return path.exists()


def invocation_from_argv() -> Invocation:
    return Invocation(int(sys.argv[1]), float(sys.argv[2]))


def clean_up(kind: str, invocation: Invocation, suffix: str) -> None:
    published(kind, invocation, suffix).unlink(missing_ok=True)
    published(kind, invocation, ".started").unlink(missing_ok=True)
