"""What `python -m flows.<stage>` does: validate params before anything starts, run the flow,
and turn a user-facing error into one clear message and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import StageError
from tasks.params import load_params
from tasks.training import Distributed


def stage_task(fn: Callable, name: str):
    """A Prefect task over `fn`. Stage tasks pass arrays and modules around: no input hashing,
    no result persistence (DVC already caches the stage's outputs)."""
    return task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)


def main(stage: str, flow: Callable) -> None:
    try:
        params = load_params(stage)
        if Distributed.from_env().is_main:
            flow(params)
        else:  # other torchrun ranks compute alongside rank 0 without their own flow runs
            flow.fn(params)
    except StageError as err:
        print(f"error in stage '{stage}':\n{err}", file=sys.stderr)
        sys.exit(2)
