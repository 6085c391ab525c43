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
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    try:
        with open(published(kind, invocation, ".log"), "wb") as log:
            helper = subprocess.Popen(
                [sys.executable, "-m", module, str(invocation.pid), repr(invocation.started)],
                start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        os.write(fd, str(helper.pid).encode())  # who the waiters wait on (`wait_for`)
    finally:
        os.close(fd)


def wait_for(kind: str, invocation: Invocation, suffix: str, seconds: float) -> bool:
    """Wait until the `kind` helper of `invocation` has published its `suffix` file; False after
    `seconds`, or as soon as the helper that claimed it is gone (its log says why)."""
    path = published(kind, invocation, suffix)
    claim = published(kind, invocation, ".started")
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and _alive(claim):
        time.sleep(0.1)
    return path.exists()


def _alive(claim: Path) -> bool:
    """Whether the helper whose PID `claim` holds still runs (True while it is being started)."""
    import psutil

    try:
        pid = claim.read_text()
    except OSError:  # cleaned up: the helper has ended
        return False
    try:
        return not pid or psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def invocation_from_argv() -> Invocation:
    return Invocation(int(sys.argv[1]), float(sys.argv[2]))


def clean_up(kind: str, invocation: Invocation, suffix: str) -> None:
    published(kind, invocation, suffix).unlink(missing_ok=True)
    published(kind, invocation, ".started").unlink(missing_ok=True)
    log = published(kind, invocation, ".log")
    if log.exists() and not log.stat().st_size:
        log.unlink()
