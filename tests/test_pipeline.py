"""`dvc repro` of the whole pipeline on the smoke profile in a fresh copy of the repo, with real
Prefect, MLflow and DVC; the tests below inspect that one run."""

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tasks.lineage import dvc_hash
from tests.conftest import copy_repo, run

STAGES = ["prepare", "ssl", "encoder", "probe", "vae", "diffusion", "distill", "fid"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_api):
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    run([sys.executable, "-m", "flows", "profile", "smoke"], repo)
    first = run(["dvc", "repro"], repo)
    return repo, first


def metrics(repo, stage):
    return json.loads((repo / "metrics" / f"{stage}.json").read_text())


def load_params_of(repo, stage):
    return yaml.safe_load((repo / "params" / f"{stage}.yaml").read_text())


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
