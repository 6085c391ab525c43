"""The machinery that runs stages: launching under dvc, the warm stage host, the Prefect server,
the pipeline's DVC queries, and the stage and pipeline runs (MLflow parent and children)."""

import os

# Quiet, offline-friendly defaults; set them before Prefect, DVC or MLflow is imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
