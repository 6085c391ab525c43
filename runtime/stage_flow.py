"""A stage's Prefect flow run: its own, or a subflow run of the pipeline flow's run when that
started the stage; and `stage_task`, the task runs inside it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from runtime.env import FLOW_RUN_TAGS_ENV, PARENT_TASK_RUN_ENV
from runtime.server import drain_clients


def stage_task(fn: Callable, name: str):
    """A Prefect task over `fn`, its runs named `name`. Stage tasks pass arrays and modules around:
    no input hashing, no result persistence (DVC already caches the stage's outputs)."""
    return task(fn, name=name, task_run_name=name, cache_policy=NO_CACHE, persist_result=False)


def run_flow(stage: str, flow, params: BaseModel) -> None:
    """The stage's flow run, named after the stage (and the experiment, under `dvc exp run`).
    Started by the pipeline flow (`PARENT_TASK_RUN_ENV` set), it is a subflow run of the pipeline's
    flow run, tagged with it; its logs then go to the API only, since the pipeline task logs this
    process's console output. Otherwise a flow run of its own. Its last logs are sent before this
    returns: a stage process forked by the warm host ends with `os._exit`, which runs no exit handlers.
    It sends no heartbeats: their thread costs up to a second's join at the flow's end, and they act
    only through an automation a user writes; the pipeline's own flow run keeps them."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    try:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
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
