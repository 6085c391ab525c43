"""What `python -m flows.<stage>` does: validate params before anything starts, find the Prefect
API, run the flow, and turn a user-facing error into one clear message and a non-zero exit."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.server import ensure_api
from tasks.errors import StageError
from tasks.params import load_params
from tasks.training import Distributed

TRANSIENT_EXIT = 75  # EX_TEMPFAIL: the pipeline flow retries a stage that exits with it


def stage_task(fn: Callable, name: str):
    """A Prefect task over `fn`. Stage tasks pass arrays and modules around: no input hashing,
    no result persistence (DVC already caches the stage's outputs)."""
    return task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)


def is_transient(err: BaseException) -> bool:
    """A network failure (e.g. the tracking or Prefect server briefly unreachable), anywhere in
    the chain of causes."""
    import httpx
    import requests

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConnectionError | TimeoutError | httpx.TransportError | requests.ConnectionError | requests.Timeout):
            return True
        if "Max retries exceeded" in str(err) or "Connection refused" in str(err):
            return True  # MLflow's REST client flattens the requests error into its message
        err = err.__cause__ or err.__context__
    return False


def main(stage: str, flow: Callable) -> None:
    try:
        params = load_params(stage)
        if Distributed.from_env().is_main:
            ensure_api()
            flow(params)
        else:  # other torchrun ranks compute alongside rank 0 without their own flow runs
            flow.fn(params)
    except StageError as err:
        print(f"error in stage '{stage}':\n{err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if not is_transient(err):
            raise
        traceback.print_exc()
        print(f"error in stage '{stage}' (transient, worth a retry): {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(TRANSIENT_EXIT)
