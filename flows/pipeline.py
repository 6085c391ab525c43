"""The pipeline flow: dvc.yaml's stages in DVC's order, each a task run in the Prefect UI.

A stage DVC considers up to date ends as a `Skipped` (completed) task run; a stale one runs as
`dvc repro --single-item <stage>`, its output streamed into the task run's logs, so DVC still
decides, caches and locks everything (`dvc status` is clean afterwards). One MLflow parent run
covers the flow run; a run that changed anything is saved as a DVC experiment of the same name.
"""

from __future__ import annotations

import os
import subprocess
from collections import deque
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.states import Completed, State

from runtime.dag import is_stale, save_experiment, stage_order
from runtime.invocation import Invocation
from runtime.profiles import profile_names, profile_params, set_overrides, write_params
from runtime.stage import TRANSIENT_EXIT
from runtime.tracking import PARENT_ENV, PipelineRun, headline_metrics
from tasks.errors import StageError
from tasks.params import (
    STAGE_PARAMS,
    DiffusionParams,
    PrepareParams,
    SslParams,
    load_params,
)

Profile = Literal[tuple(profile_names())]
Source = PrepareParams.model_fields["source"].annotation
Objective = SslParams.model_fields["objective"].annotation
Formulation = DiffusionParams.model_fields["formulation"].annotation
LOG_TAIL = 12  # lines of a failed stage's output in its error


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str):
        self.transient = returncode == TRANSIENT_EXIT
        kind = "transient failure, retried" if self.transient else "failed"
        super().__init__(f"stage '{stage}' {kind} (exit {returncode}); its last lines:\n{tail}")


def _retry_transient(task, task_run, state: State) -> bool:
    return isinstance(state.data, StageFailed) and state.data.transient


@task(
    name="stage", task_run_name="{stage}", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE, persist_result=False,
)
def run_stage(stage: str, parent_run_id: str) -> State | None:
    """`dvc repro --single-item <stage>` if DVC says the stage is stale; a Skipped state if not."""
    if not is_stale(stage):
        return Completed(name="Skipped", message=f"'{stage}' is up to date (dvc status)")
    logger = get_run_logger()
    env = {
        **os.environ, **Invocation.of(os.getpid()).env(),  # the stages share one warm host (flows.host)
        PARENT_ENV: parent_run_id, "PREFECT_API_URL": get_current_settings().api.url or "",
        "TQDM_MININTERVAL": "10",  # a progress line every 10 s, not a log flood
    }
    process = subprocess.Popen(
        ["dvc", "repro", "--single-item", stage], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    tail = deque(maxlen=LOG_TAIL)
    for line in process.stdout:
        if line := line.rstrip():
            logger.info(line)
            tail.append(line)
    if process.wait():
        raise StageFailed(stage, process.returncode, "\n".join(tail))
    return None


def apply_params(
    profile: str | None, source: str | None, ssl_objective: str | None, diffusion_formulation: str | None,
    overrides: list[str],
) -> list[str]:
    """Write params/*.yaml: a profile (or the files as they are), the form's choices, then the
    free-form overrides. Every value is validated before any file is written."""
    full = profile_params(profile) if profile else {s: load_params(s).model_dump(mode="json") for s in STAGE_PARAMS}
    chosen = {"prepare.source": source, "ssl.objective": ssl_objective, "diffusion.formulation": diffusion_formulation}
    sets = [f"{key}={value}" for key, value in chosen.items() if value is not None]
    return write_params(set_overrides(full, sets + list(overrides)))


@flow(name="pipeline", log_prints=True)
def pipeline(
    profile: Profile | None = None,
    source: Source | None = None,
    ssl_objective: Objective | None = None,
    diffusion_formulation: Formulation | None = None,
    overrides: list[str] | None = None,
) -> dict[str, float]:
    """Run dvc.yaml's stages, skipping the up-to-date ones.

    Args:
        profile: rewrite every params file from this profile first; empty keeps them as they are.
        source: dataset (prepare.source).
        ssl_objective: ssl.objective.
        diffusion_formulation: diffusion.formulation (flow or ddpm).
        overrides: DVC-style `params/<stage>.yaml:key=value` (or `stage.key=value`) values.
    """
    try:
        changed = apply_params(profile, source, ssl_objective, diffusion_formulation, overrides or [])
    except StageError as err:
        raise ValueError(str(err)) from None  # shown in the UI as the flow run's failure
    if changed:
        print(f"params changed: {', '.join(f'params/{s}.yaml' for s in changed)}")
    name = flow_run.get_name() or "pipeline"
    parent = PipelineRun.start(name, "prefect", tags={"prefect.flow_run_id": str(flow_run.get_id())})
    ran, skipped = [], []
    try:
        for stage in stage_order():
            state = run_stage(stage, parent.run_id, return_state=True)
            state.result()  # a failed stage fails the flow with its error
            (skipped if state.name == "Skipped" else ran).append(stage)
        experiment = save_experiment(name) if ran else None
    except BaseException:
        parent.finish(ok=False)
        raise
    parent.finish(ok=True, tags={"dvc.experiment": experiment} if experiment else None)  # deleted if nothing ran
    headline = headline_metrics()
    print(f"ran {ran or 'nothing'}, skipped {skipped or 'nothing'}; "
          f"{'saved as DVC experiment ' + experiment if experiment else 'no new experiment'}; {headline}")
    return headline
