"""The whole pipeline on the smoke profile in a fresh copy of the repo, run as the Prefect pipeline
flow (`python -m flows run`) under a real Prefect server, with a real MLflow store and real DVC;
most tests below inspect that one run, the last ones rerun it."""

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from runtime.dag import dvc_hash
from tests.conftest import run

STAGES = ["prepare", "ssl", "encoder", "probe", "vae", "diffusion", "distill", "fid"]


def metrics(repo, stage):
    return json.loads((repo / "metrics" / f"{stage}.json").read_text())


def load_params_of(repo, stage):
    return yaml.safe_load((repo / "params" / f"{stage}.yaml").read_text())


def mlflow_client(repo):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def pipeline_runs(repo):
    """The parent runs, oldest first."""
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("latentlab")
    found = client.search_runs([experiment.experiment_id], "tags.`latentlab.pipeline` = 'true'")
    return sorted(found, key=lambda r: r.info.start_time)


def children(repo, parent):
    client = mlflow_client(repo)
    found = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.info.run_name: r for r in found}


def mlflow_runs(repo):
    """The stage runs of the first pipeline run, by stage."""
    return mlflow_client(repo), children(repo, pipeline_runs(repo)[0])


def task_states(flow_run_id: str) -> dict[str, str]:
    """{task run name: state name} of a Prefect flow run, read back from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100,
        )
    return {task_run.name: task_run.state.name for task_run in found}


def last_flow(repo):
    parent = pipeline_runs(repo)[-1]
    return parent, task_states(parent.data.tags["prefect.flow_run_id"])


def test_the_flow_ran_every_stage_as_a_task_run_and_left_dvc_clean(pipeline):
    repo, first = pipeline
    parent, states = last_flow(repo)
    assert states == dict.fromkeys(STAGES, "Completed"), states
    for stage in STAGES:
        assert (repo / "artifacts" / stage).is_dir() and (repo / "metrics" / f"{stage}.json").exists()
    assert "up to date" in run(["dvc", "status"], repo).stdout
    assert parent.info.run_name in run(["dvc", "exp", "list", "--name-only"], repo).stdout  # saved as an experiment
    assert parent.data.tags["dvc.experiment"] == parent.info.run_name


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
    parent = pipeline_runs(repo)[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["trigger"] == "prefect"
    assert parent.data.params["ssl.objective"] == "simclr" and parent.data.params["diffusion.formulation"] == "ddpm"
    headline = parent.data.metrics
    assert headline["probe_top1"] == metrics(repo, "probe")["probe_top1"]
    assert headline["fid_student_4"] == metrics(repo, "fid")["fid.student.steps_4"]
    assert headline["fid_teacher"] == metrics(repo, "fid")["fid.teacher.steps_16"]
    compute = sum(metrics(repo, stage)["wall_seconds"] for stage in STAGES)
    assert headline["total_wall_seconds"] > compute and headline["compute_seconds"] == pytest.approx(compute)
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


def test_vae_latents_have_unit_variance_and_reconstructions_beat_the_mean_image(pipeline):
    repo, _ = pipeline
    from tasks.vae import load_latents

    scaled = load_latents(repo / "artifacts" / "vae").scaled()
    torch.testing.assert_close(scaled.std((0, 2, 3)), torch.ones(scaled.shape[1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(scaled.mean((0, 2, 3)), torch.zeros(scaled.shape[1]), atol=1e-3, rtol=0)
    vae = metrics(repo, "vae")
    assert vae["psnr"] > vae["psnr_mean_image"] + 3 and vae["ssim"] > vae["ssim_mean_image"], vae


def test_teacher_beats_the_prior_and_the_4_step_student_beats_the_4_step_teacher(pipeline):
    repo, _ = pipeline
    fid = metrics(repo, "fid")
    most_steps = max(load_params_of(repo, "fid")["teacher_steps"])
    assert fid[f"fid.teacher.steps_{most_steps}"] < fid["fid.prior_vs_test"], fid
    assert fid["fid.student.steps_4"] < fid["fid.teacher.steps_4"], fid
    teacher = [value for key, value in fid.items() if key.startswith("fid.teacher.")]
    assert fid["fid.floor_train_vs_test"] < min(teacher), fid
    for row in ("teacher.steps_4", "student.steps_1", "student.steps_2", "student.steps_4"):
        assert math.isfinite(fid[f"kid.{row}"]) and fid[f"images_per_s.{row}"] > 0
    assert fid["images_per_s.student.steps_1"] > fid["images_per_s.teacher.steps_16"]
    for stage in ("vae", "diffusion", "distill"):
        assert metrics(repo, stage)["images_per_s"] > 0  # training throughput


def test_stage_outputs_rebuild_the_vae_and_the_denoiser(pipeline, monkeypatch):
    repo, _ = pipeline
    monkeypatch.chdir(repo)
    from tasks.data import load_split
    from tasks.diffusion import class_grid, load_denoiser
    from tasks.params import load_params
    from tasks.vae import encode_means, load_decoder, load_latents

    decoder = load_decoder("artifacts/vae")  # the VAE re-encodes the training split to the saved latents
    saved = load_latents("artifacts/vae").latents
    torch.testing.assert_close(encode_means(decoder.vae, load_split("train").floats()), saved, atol=1e-5, rtol=0)
    params = load_params("diffusion")  # the denoiser redraws the stage's sample grid
    denoiser = load_denoiser("artifacts/diffusion")
    guidance = params.guidance_scales[-1]
    image, _ = class_grid(denoiser, decoder, denoiser.net.config.num_classes, params.samples_per_class,
                          params.sample_steps, guidance, params.seed)
    stored = np.asarray(Image.open(f"plots/diffusion/samples_guidance_{guidance:g}.png"))
    assert np.array_equal(stored, image[..., 0])


def test_generative_results_reach_dvc_metrics_plots_and_mlflow(pipeline):
    repo, _ = pipeline
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    workspace = next(iter(shown.values()))["data"]
    fid = workspace["metrics/fid.json"]["data"]
    assert {"fid.teacher.steps_4", "fid.student.steps_4", "fid.floor_train_vs_test", "kid.prior_vs_test"} <= set(fid)
    assert (repo / "plots" / "fid" / "fid_vs_steps.png").exists()
    assert (repo / "artifacts" / "fid" / "fid_table.md").read_text().startswith("| row |")
    client, runs = mlflow_runs(repo)
    plots = {stage: [a.path for a in client.list_artifacts(runs[stage].info.run_id, "plots")] for stage in ("vae", "diffusion", "fid")}
    assert "plots/reconstructions.png" in plots["vae"] and "plots/prior_samples.png" in plots["vae"]
    assert any(path.startswith("plots/samples_guidance_") for path in plots["diffusion"])
    assert "plots/fid_vs_steps.png" in plots["fid"]
    assert runs["fid"].data.metrics["fid.student.steps_4"] == fid["fid.student.steps_4"]
    assert len(client.get_metric_history(runs["diffusion"].info.run_id, "train/loss")) > 3


def test_trained_models_load_back_from_mlflow(pipeline):
    import mlflow.pytorch

    repo, _ = pipeline
    _, runs = mlflow_runs(repo)
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        encoder = mlflow.pytorch.load_model(f"runs:/{runs['encoder'].info.run_id}/models/encoder")
        images = torch.from_numpy(np.load(repo / "artifacts/prepare/test_images.npy")[:8]).float() / 127.5 - 1
        embedded = np.load(repo / "artifacts/encoder/test_embeddings.npy")[:8]
        torch.testing.assert_close(encoder(images), torch.from_numpy(embedded), atol=1e-4, rtol=1e-4)
        vae = mlflow.pytorch.load_model(f"runs:/{runs['vae'].info.run_id}/models/vae")
        denoiser = mlflow.pytorch.load_model(f"runs:/{runs['diffusion'].info.run_id}/models/denoiser")
        student = mlflow.pytorch.load_model(f"runs:/{runs['distill'].info.run_id}/models/student_4_steps")
    finally:
        mlflow.set_tracking_uri(None)
    assert sum(p.numel() for p in vae.parameters()) > 0
    assert type(denoiser).__name__ == type(student).__name__ == "UNet"


def test_reruns_skip_what_is_up_to_date_and_compare_shows_what_differed(pipeline):
    """Runs after the first (this test changes the copy): the flow again (all skipped), the flow
    with one distill override (distill and fid rerun), and a plain `dvc repro` after a probe change."""
    repo, _ = pipeline
    run([sys.executable, "-m", "flows", "run"], repo)
    parent, states = last_flow(repo)
    assert states == dict.fromkeys(STAGES, "Skipped"), states
    assert children(repo, parent) == {} and "dvc.experiment" not in parent.data.tags

    run([sys.executable, "-m", "flows", "run", "--set", "params/distill.yaml:seed=1"], repo)
    parent, states = last_flow(repo)
    assert {s for s, state in states.items() if state == "Completed"} == {"distill", "fid"}, states
    assert set(children(repo, parent)) == {"distill", "fid"}
    assert parent.info.run_name in run(["dvc", "exp", "list", "--name-only"], repo).stdout

    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "distill.seed=1", "--set", "probe.knn_k=5"], repo)
    rerun = run(["dvc", "repro"], repo).stdout
    assert [stage for stage in STAGES if f"Running stage '{stage}'" in rerun] == ["probe"]
    parent = pipeline_runs(repo)[-1]  # a plain `dvc repro` has its parent run too
    assert parent.data.tags["trigger"] == "dvc repro" and set(children(repo, parent)) == {"probe"}
    assert parent.data.metrics["probe_top1"] == metrics(repo, "probe")["probe_top1"]
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout
    assert "up to date" in run(["dvc", "status"], repo).stdout

    out = run([sys.executable, "-m", "flows", "compare", "--csv", "runs.csv"], repo).stdout
    table = pd.read_csv(repo / "runs.csv")
    assert len(table) == 4 and "fid_student_4" in out
    assert {"distill.seed", "probe.knn_k"} <= set(table.columns)
    assert "prepare.source" not in table.columns  # the same in every run
    assert sorted(table["probe.knn_k"].tolist()) == [5, 20, 20, 20]
