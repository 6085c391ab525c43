"""The machinery that runs stages: launching under dvc, the warm stage host, the Prefect server,
the pipeline's DVC queries, and the stage and pipeline runs (MLflow parent and children).

A stage, from dvc.yaml's command to its end:
  launch         `python -m runtime.launch <stage>`: runs the stage's process (warm host, torchrun)
  outcome        ... and, when it fails or is stopped, puts back its last good outputs
  host           the warm host that forks stage processes with torch, Prefect, MLflow imported
  stage_process  `python -m flows.<stage>`: params, lock, flow run, errors to exit codes
  stage_flow     the stage's Prefect flow run (a subflow run under the pipeline flow), stage_task
  stage          StageRun: the outputs, MLflow run, device and curves of one execution
  stage_end      what happens when a stage ends: inputs checked, outputs put in place and tracked
  failures       transient (retried), full disk, or a failure: how an error is told apart
  logs           what the Prefect logs leave out (errors reported once), warnings into them
Processes and their lifetime:
  env            every LATENTLAB_* variable, what sets and reads it
  invocation     the process a pipeline run belongs to (a `dvc repro`, the pipeline flow)
  lifetime       nothing outlives what started it (parent-death signal, `end_with`)
  background     helper processes (host, Prefect server) that live as long as an invocation
  server         one Prefect server for all the stages of a run
Tracking and the pipeline:
  tracking       MLflow stage runs and the pipeline's parent run
  mlflow_models, network_pyfunc   the trained networks as MLflow models; lineage  the git state
  dag            dvc.yaml and DVC: stages, deps, order, staleness; code_deps  each stage's code
  profiles, sweep, compare, team  `python -m flows` commands' machinery
"""

import os

# Quiet, offline-friendly defaults; set them before Prefect, DVC or MLflow is imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
