"""The last pipeline runs side by side, from MLflow: the stages each ran, the params that differ
between them and the headline metrics, best first. Only runs that ran a stage are results: a run
that found every stage up to date leaves no parent run (`PipelineRun.finish`), and one recorded
before that rule (`stages_run` 0) is left out too."""

from __future__ import annotations

import pandas as pd

from runtime.tracking import HEADLINE, PIPELINE_TAG, client, experiment_name, tracking_uri

HIGHER_IS_BETTER = {"probe_top1", "kd_student_top1", "kd_gain"}


def pipeline_runs(last: int = 10, sort: str = "fid_student_4") -> pd.DataFrame:
    """One row per pipeline run that ran a stage (the MLflow parent runs), newest `last` of them,
    sorted by `sort`."""
    import mlflow

    if sort not in HEADLINE:
        raise ValueError(f"cannot sort by '{sort}'; choose one of {', '.join(HEADLINE)}")
    none = pd.DataFrame(columns=["run", *HEADLINE])
    experiment = client().get_experiment_by_name(experiment_name())
    if experiment is None:
        return none
    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = 'true' AND metrics.stages_run > 0",
        order_by=["attributes.start_time DESC"], max_results=last,
    )
    if runs.empty:
        return none
    table = pd.DataFrame({
        "run": runs["tags.mlflow.runName"],
        "started": runs["start_time"].dt.strftime("%Y-%m-%d %H:%M"),
        "trigger": runs.get("tags.trigger"),
        "status": runs["status"],
        "dvc_experiment": runs.get("tags.dvc.experiment"),
        "ran": runs.get("tags.stages.ran"),
    })
    params = runs.filter(like="params.")
    differing = [c for c in params.columns if params[c].astype(str).nunique(dropna=False) > 1]
    table = table.join(params[differing].rename(columns=lambda c: c.removeprefix("params.")))
    for metric in HEADLINE:
        table[metric] = runs.get(f"metrics.{metric}")
    table = table.sort_values(sort, ascending=sort not in HIGHER_IS_BETTER, na_position="last", kind="stable")
    return table.dropna(axis="columns", how="all").reset_index(drop=True)
