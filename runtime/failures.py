"""How a stage's failure is told apart: a network failure is transient (the stage exits
TRANSIENT_EXIT and the pipeline flow retries it), a full disk is said in one line, anything else
is a failure with its traceback."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

TRANSIENT_EXIT = 75  # EX_TEMPFAIL: the pipeline flow retries a stage that exits with it
LOW_SPACE = 4 << 20  # bytes free below which a failure is put down to the full disk


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
