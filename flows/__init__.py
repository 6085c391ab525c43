"""Prefect flows: one per stage (what dvc.yaml runs), and the `python -m flows` commands."""

import os

# Quiet, offline-friendly defaults; set them before Prefect or DVC is imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
