"""`dvc repro` of the pipeline in a fresh copy of the repo, with real Prefect, MLflow and DVC."""

import yaml

from tasks.lineage import dvc_hash
from tests.conftest import run


def mlflow_runs(repo):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentlab")
    return client, client.search_runs([experiment.experiment_id])


def test_dvc_repro_runs_then_has_nothing_to_do(repo_copy):
    first = run(["dvc", "repro"], repo_copy)
    assert "Running stage 'prepare'" in first.stdout
    second = run(["dvc", "repro"], repo_copy)
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo_copy).stdout

    client, runs = mlflow_runs(repo_copy)
    assert [r.info.run_name for r in runs] == ["prepare"]  # the second repro ran nothing
    record = runs[0]
    assert record.info.status == "FINISHED"
    assert record.data.params["prepare.source"] == "digits"
    assert record.data.metrics["train_images"] > 0
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]["prepare"]
    for dep in lock["deps"]:  # lineage tags carry the hashes DVC recorded
        assert record.data.tags[f"dvc.dep.{dep['path']}"] == dep["md5"] == dvc_hash(repo_copy / dep["path"])
    assert len(record.data.tags["git.commit"]) == 40
    assert record.data.tags["git.dirty"] == "true"  # the smoke profile edited params/
    artifacts = [a.path for a in client.list_artifacts(record.info.run_id, "plots")]
    assert "plots/samples.png" in artifacts


def test_a_param_change_reruns_the_stage(repo_copy):
    run(["dvc", "repro"], repo_copy)
    run(["python", "-m", "flows", "profile", "smoke", "--set", "prepare.seed=3"], repo_copy)
    assert "prepare" in run(["dvc", "status"], repo_copy).stdout
    assert "Running stage 'prepare'" in run(["dvc", "repro"], repo_copy).stdout
