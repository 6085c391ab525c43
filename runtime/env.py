"""Every `LATENTLAB_*` environment variable: what sets it, what reads it.

Most are hand-overs between the processes of one pipeline run (the pipeline flow, `dvc`, the
launcher, the warm host, a stage and its torchrun ranks); `STAGE_HOST_ENV`, `EXPERIMENT_ENV` and
`CHECKOUT_ENV` are the ones a user may set.
"""

INVOCATION_ENV = "LATENTLAB_INVOCATION"
"""`PID:STARTED` of the process a pipeline run belongs to (`runtime.invocation.Invocation.env`): set
by the pipeline flow for its `dvc repro --single-item` and by the launcher for a stage it hands to the
warm host; without it a stage finds its `dvc` among its ancestors (`current_invocation`)."""

LAUNCHER_ENV = "LATENTLAB_LAUNCHER"
"""`PID:STARTED` of the launcher (`runtime.launch`) a torchrun rank lives by: each rank ends when it
goes (`runtime.lifetime.end_with_starters`)."""

STAGE_HOST_ENV = "LATENTLAB_STAGE_HOST"
"""`off`: the launcher runs each stage as a fresh `python -m flows.<stage>` instead of forking it
from the run's warm host (`runtime.host`)."""

PARENT_RUN_ENV = "LATENTLAB_PARENT_RUN_ID"
"""The MLflow parent run (`runtime.tracking.PipelineRun`) the pipeline flow started, handed to its
stages, whose runs become its children; under a plain `dvc repro` the first stage starts one."""

PARENT_TASK_RUN_ENV = "LATENTLAB_PARENT_TASK_RUN_ID"
"""The pipeline flow's task run a stage runs for: the stage's flow run becomes a subflow run under
it (`runtime.stage_flow.run_flow`)."""

FLOW_RUN_TAGS_ENV = "LATENTLAB_FLOW_RUN_TAGS"
"""Comma-separated Prefect tags of a stage's flow run under the pipeline flow
(`pipeline:<its flow run>`)."""

EXPERIMENT_ENV = "LATENTLAB_EXPERIMENT"
"""The MLflow experiment runs are tracked in (default `latentlab`)."""

CHECKOUT_ENV = "LATENTLAB_CHECKOUT"
"""Where a team worker's flow runs work (`python -m flows team worker` sets it; prefect.yaml's
pull step changes into it)."""
