"""Prefect flows: one per stage (what dvc.yaml runs), the pipeline flow, and the `python -m flows` commands."""

import runtime  # noqa: F401  (its quiet, offline defaults come before Prefect or DVC is imported)
