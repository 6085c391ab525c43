"""`dvc repro` of the whole pipeline on the smoke profile in a fresh copy of the repo, with real
Prefect, MLflow and DVC; the tests below inspect that one run."""

import json
import sys

import pytest
import yaml

from tasks.lineage import dvc_hash
from tests.conftest import copy_repo, run

STAGES = ["prepare", "ssl", "encoder", "probe"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_api):
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    run([sys.executable, "-m", "flows", "profile", "smoke"], repo)
    first = run(["dvc", "repro"], repo)
    return repo, first


def metrics(repo, stage):
    return json.loads((repo / "metrics" / f"{stage}.json").read_text())


def mlflow_runs(repo):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentlab")
    return client, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def test_every_stage_ran_and_wrote_its_outputs(pipeline):
    repo, first = pipeline
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
        assert (repo / "artifacts" / stage).is_dir() and (repo / "metrics" / f"{stage}.json").exists()


def test_ssl_probe_beats_the_random_encoder_probe(pipeline):
    repo, _ = pipeline
    probe = metrics(repo, "probe")
    assert probe["probe_top1"] > probe["random_encoder.probe_top1"], probe
    assert probe["probe_top1"] > 0.5 and probe["raw_pixels.probe_top1"] > 0.5
    assert metrics(repo, "ssl")["knn_top1"] > 0.3  # the online monitor ran
    assert metrics(repo, "encoder")["dead_fraction"] < 0.5


def test_mlflow_holds_a_finished_run_per_stage_with_lineage(pipeline):
    repo, _ = pipeline
    client, runs = mlflow_runs(repo)
    assert sorted(runs) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    prepare = runs["prepare"]
    assert prepare.data.params["prepare.source"] == "digits"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in STAGES:
        for dep in lock[stage]["deps"]:  # lineage tags carry the hashes DVC recorded
            assert runs[stage].data.tags[f"dvc.dep.{dep['path']}"] == dep["md5"] == dvc_hash(repo / dep["path"])
    assert len(prepare.data.tags["git.commit"]) == 40
    assert prepare.data.tags["git.dirty"] == "true"  # the smoke profile edited params/
    assert "plots/samples.png" in [a.path for a in client.list_artifacts(prepare.info.run_id, "plots")]
    history = client.get_metric_history(runs["ssl"].info.run_id, "train/loss")
    assert len(history) > 3 and history[0].step < history[-1].step  # step metrics


def test_second_repro_does_nothing_and_a_param_change_reruns_downstream_only(pipeline):
    repo, _ = pipeline
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout
    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "probe.knn_k=5"], repo)
    rerun = run(["dvc", "repro"], repo).stdout
    assert "Running stage 'probe'" in rerun
    assert all(f"Running stage '{stage}'" not in rerun for stage in ["prepare", "ssl", "encoder"])
    assert "up to date" in run(["dvc", "status"], repo).stdout
