"""The pipeline flow: dvc.yaml's stages in DVC's order, each a task run in the Prefect UI.

A stage DVC considers up to date ends as a `Skipped` (completed) task run; a stale one runs as
`dvc repro --single-item <stage>`, so DVC still decides, caches and locks everything (`dvc status`
is clean afterwards). The stage's own flow run is a subflow run of this one that follows its task
run, named after the stage and tagged with the pipeline run (`runtime.stage_flow.run_flow`); the task
run keeps its own state and duration in the UI's Task Runs tab. The stage's flow run holds its
logs, while the task run holds what the stage process prints besides (progress bars at every
quarter, dvc's own lines). A failed run says why once, as its state message, without a traceback. One MLflow parent run covers the flow run; a run that changed anything is saved as a
DVC experiment of the same name.

No `from __future__ import annotations` here: a served deployment's runs get this flow pickled by
value into a fresh process, where string annotations would no longer resolve.
"""

import logging
import os
import re
import subprocess
from collections import deque
from typing import Literal, get_args

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.states import Completed, Failed, State

from runtime.dag import is_stale, save_experiment, stage_order
from runtime.env import FLOW_RUN_TAGS_ENV, PARENT_RUN_ENV, PARENT_TASK_RUN_ENV
from runtime.failures import TRANSIENT_EXIT
from runtime.invocation import Invocation
from runtime.lifetime import child_dies_with_us
from runtime.logs import ReportedOnce
from runtime.profiles import profile_names, profile_params, set_overrides, write_params
from runtime.tracking import PipelineRun, headline_metrics
from tasks.errors import StageError
from tasks.params import (
    STAGE_PARAMS,
    DiffusionParams,
    PrepareParams,
    SslParams,
    load_params,
)

KEEP = "keep"  # the run form's default choice: leave params/*.yaml's value as it is


def _choices(annotation) -> object:
    """A run-form drop-down: `keep`, then the allowed values of a params field."""
    return Literal[(KEEP, *get_args(annotation))]


Profile = Literal[(KEEP, *profile_names())]
Source = _choices(PrepareParams.model_fields["source"].annotation)
Objective = _choices(SslParams.model_fields["objective"].annotation)
Formulation = _choices(DiffusionParams.model_fields["formulation"].annotation)
LOG_TAIL = 12  # lines of a failed stage's output in its error


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str):
        self.transient = returncode == TRANSIENT_EXIT
        kind = "transient failure, retried" if self.transient else "failed"
        super().__init__(f"stage '{stage}' {kind} (exit {returncode}); its last lines:\n{tail}")


def _retry_transient(task, task_run, state: State) -> bool:
    return isinstance(state.data, StageFailed) and state.data.transient


PROGRESS = re.compile(r"(?P<bar>.*?)\s*(?P<percent>\d+)%\|")  # a tqdm redraw: "<desc>:  42%|████  | 5/12 ..."
DVC_HINTS = re.compile(  # dvc's per-stage bookkeeping and advice, nothing to act on inside the pipeline
    r"(Generating|Updating) lock file|To (track the changes with git|enable auto staging), run:"
    r"|\s*(git add dvc\.lock|dvc config core\.autostage true)$|Use `dvc push`"
)
ERROR_START = re.compile(r"^(error|ERROR|Traceback)|\b(ERROR|\w+Error)\b")


class StageOutput:
    """Which lines of a stage process's console output go into its task run's logs, and at what
    level: a progress bar's redraw only when it reaches a new quarter, no dvc hints, a warning at
    WARNING, an error and every line after it at ERROR. The stage's own Prefect logs are not on
    the console under the pipeline (they go to its flow run), so nothing is logged twice."""

    def __init__(self):
        self.quarters: dict[str, int] = {}  # the last quarter shown, by progress bar
        self.failing = False
        self.tail: deque[str] = deque(maxlen=LOG_TAIL)

    def level(self, line: str) -> int | None:
        """The level to log `line` at; None to leave it out."""
        if progress := PROGRESS.match(line):
            quarter = min(int(progress["percent"]), 100) // 25
            if self.quarters.get(progress["bar"]) == quarter:
                return None
            self.quarters[progress["bar"]] = quarter
            return logging.INFO
        self.tail.append(line)
        if DVC_HINTS.match(line):
            return None
        self.failing = self.failing or bool(ERROR_START.search(line))
        if self.failing:
            return logging.ERROR
        return logging.WARNING if "warning" in line.lower() else logging.INFO


def _stage_env(task_run_id: str, parent_run_id: str) -> dict[str, str]:
    """The stage process's environment: this one without the runner's hand-over to this flow run's
    process (PREFECT__*), plus the pipeline run's invocation (the stages share one warm host), its
    MLflow parent run, the Prefect API, and the task run the stage's flow run hangs under."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT__")}
    return {
        **env, **Invocation.of(os.getpid()).env(),
        PARENT_RUN_ENV: parent_run_id, "PREFECT_API_URL": get_current_settings().api.url or "",
        PARENT_TASK_RUN_ENV: task_run_id, FLOW_RUN_TAGS_ENV: f"pipeline:{flow_run.get_name()}",
    }


@task(
    name="stage", task_run_name="{stage}", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE, persist_result=False,
)
def run_stage(stage: str, parent_run_id: str) -> State | None:
    """`dvc repro --single-item <stage>` if DVC says the stage is stale; a Skipped state if not; a
    Failed one, holding the StageFailed, if the stage fails."""
    if not is_stale(stage):
        return Completed(name="Skipped", message=f"'{stage}' is up to date (dvc status)")
    logger = get_run_logger()
    process = subprocess.Popen(
        ["dvc", "repro", "--single-item", stage], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_stage_env(str(TaskRunContext.get().task_run.id), parent_run_id),
        **child_dies_with_us(),  # killed with this flow run's process (its stage then goes too)
    )
    output = StageOutput()
    for line in process.stdout:  # text mode: a progress bar's carriage returns end lines too
        if (line := line.rstrip()) and (level := output.level(line)) is not None:
            logger.log(level, line)
    if process.wait():  # its lines are in the logs already: the reason once, without a traceback
        error = StageFailed(stage, process.returncode, "\n".join(output.tail))
        return Failed(message=str(error), data=error)
    return None


def apply_params(
    profile: str, source: str, ssl_objective: str, diffusion_formulation: str, overrides: tuple[str, ...],
) -> list[str]:
    """Write params/*.yaml: a profile (`keep`: the files as they are), the form's choices (`keep`
    leaves a value as it is), then the free-form overrides. Every value is validated before any
    file is written."""
    full = profile_params(profile) if profile != KEEP else {s: load_params(s).model_dump(mode="json") for s in STAGE_PARAMS}
    chosen = {"prepare.source": source, "ssl.objective": ssl_objective, "diffusion.formulation": diffusion_formulation}
    sets = [f"{key}={value}" for key, value in chosen.items() if value != KEEP]
    return write_params(set_overrides(full, sets + list(overrides)))


def _failed(reason: str) -> State:
    """The flow run's end for `reason`, logged already: its state message, without a traceback;
    Prefect's closing "Finished in state Failed(...)" line, which would repeat it, is left out."""
    logging.getLogger("prefect.flow_runs").addFilter(ReportedOnce(reason.splitlines()[0]))  # that line quotes it
    return Failed(message=reason)


@flow(name="pipeline", log_prints=True)
def pipeline(
    profile: Profile = KEEP,
    source: Source = KEEP,
    ssl_objective: Objective = KEEP,
    diffusion_formulation: Formulation = KEEP,
    overrides: tuple[str, ...] = (),
) -> dict[str, float]:
    """Run dvc.yaml's stages, skipping the up-to-date ones.

    Args:
        profile: rewrite every params file from this profile first; keep: the files as they are.
        source: dataset (prepare.source); keep: as the params files say.
        ssl_objective: ssl.objective; keep: as the params files say.
        diffusion_formulation: diffusion.formulation (flow, ddpm or edm); keep: as the params files say.
        overrides: DVC-style `params/<stage>.yaml:key=value` (or `stage.key=value`) values, applied last.
    """
    try:
        changed = apply_params(profile, source, ssl_objective, diffusion_formulation, overrides)
    except StageError as err:
        get_run_logger().error(str(err))
        return _failed(str(err))
    if changed:
        print(f"params changed: {', '.join(f'params/{s}.yaml' for s in changed)}")
    name = flow_run.get_name() or "pipeline"
    parent = PipelineRun.start(name, "prefect", tags={"prefect.flow_run_id": str(flow_run.get_id())})
    ran, skipped = [], []
    try:
        for stage in stage_order():
            state = run_stage(stage, parent.run_id, return_state=True)
            if state.is_failed():  # a failed stage fails the flow with its reason (its task run logged it)
                parent.finish("FAILED")
                return _failed(state.message)
            (skipped if state.name == "Skipped" else ran).append(stage)
        experiment = save_experiment(name) if ran else None
    except BaseException as err:
        parent.finish("KILLED" if isinstance(err, (KeyboardInterrupt, TerminationSignal)) else "FAILED")
        raise
    parent.finish("FINISHED", tags={"dvc.experiment": experiment} if experiment else None)  # deleted if nothing ran
    headline = headline_metrics()
    print(f"ran {ran or 'nothing'}, skipped {skipped or 'nothing'}; "
          f"{'saved as DVC experiment ' + experiment if experiment else 'no new experiment'}; {headline}")
    return headline
