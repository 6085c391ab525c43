"""Helper processes that live as long as a pipeline run's invocation (a `dvc repro`, or the
pipeline flow): started once by whichever stage needs them first, found again by the others
through a file named after the invocation, gone when the invocation ends.

Those files live in a directory only this user can enter (`$TMPDIR/latentlab-<uid>`, mode 0700),
so what is found there was put there by this user's own processes.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from runtime.invocation import Invocation
from tasks.errors import StageError


class UnsafeHelpersDir(StageError):
    """The helpers' directory exists but is not this user's private directory."""


def helpers_dir() -> Path:
    """This user's private directory for the helpers' files, created if need be; refused when
    another user owns it, others may enter it, or it is not a plain directory."""
    path = Path(tempfile.gettempdir()) / f"latentlab-{os.getuid()}"
    with suppress(FileExistsError):
        path.mkdir(mode=0o700)
    found = path.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise UnsafeHelpersDir(
            f"{path} is not a private directory of yours ({stat.filemode(found.st_mode)}, owner uid {found.st_uid}, "
            f"you are {os.getuid()}): remove it, or point TMPDIR elsewhere"
        )
    return path


def published(kind: str, invocation: Invocation, suffix: str) -> Path:
    """Where the `kind` helper of `invocation` publishes itself (an address file or a socket)."""
    return helpers_dir() / f"{kind}-{invocation.key}{suffix}"


def start_once(kind: str, module: str, invocation: Invocation) -> None:
    """Start `python -m <module> PID STARTED` in the background unless someone already did; its
    output goes to `<kind>-<key>.log` beside its address (removed when empty)."""
    claim = published(kind, invocation, ".started")
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return
    with open(published(kind, invocation, ".log"), "wb") as log:
        subprocess.Popen(
            [sys.executable, "-m", module, str(invocation.pid), repr(invocation.started)],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
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
    log = published(kind, invocation, ".log")
    if log.exists() and not log.stat().st_size:
        log.unlink()
