"""The whole pipeline on the smoke profile in a fresh copy of the repo, run as the Prefect pipeline
flow (`python -m flows run`) under a real Prefect server, with a real MLflow store and real DVC;
most tests below inspect that one run, the last ones rerun it."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from runtime.dag import dvc_hash
from tests.conftest import copy_repo, run

STAGES = ["prepare", "ssl", "encoder", "probe", "vae", "diffusion", "distill", "fid"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_api):
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    first = run([sys.executable, "-m", "flows", "run", "--profile", "smoke"], repo)
    return repo, first


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
        out = next(out for out in lock[stage]["outs"] if out["path"] == f"artifacts/{stage}")
        assert runs[stage].data.tags[f"dvc.out.artifacts/{stage}"] == out["md5"]  # what a rerun that reuses it links to
    assert parent.data.tags["stages.ran"] == ",".join(STAGES) and parent.data.tags["stages.reused"] == ""
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # a model-training experiment
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


# Run in a fresh process outside the repo: loads models through the registry with every way of
# unpickling disabled, predicts, and saves the outputs and each model's file list.
LOAD_FROM_REGISTRY = textwrap.dedent("""
    import json, pathlib, pickle, sys
    import mlflow.pyfunc
    import numpy as np
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class Refused(pickle.Unpickler):
        __init__ = refuse

    pickle.load = pickle.loads = torch.load = refuse
    pickle.Unpickler = Refused

    uris, images, labels, out = json.loads(sys.argv[1]), np.load(sys.argv[2]), np.load(sys.argv[3]), sys.argv[4]
    files = {}
    for key, uri in uris.items():
        model = mlflow.pyfunc.load_model(uri)
        np.save(f"{out}/{key}.npy", model.predict(labels if key in ("denoiser", "student") else images))
        local = mlflow.artifacts.download_artifacts(uri)
        files[key] = sorted(str(p.relative_to(local)) for p in pathlib.Path(local).rglob("*") if p.is_file())
    import tasks
    files["tasks_from"] = tasks.__file__
    print(json.dumps(files))
""")


def load_in_fresh_process(repo, tmp_path, uris: dict[str, str], images, labels) -> dict:
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_FROM_REGISTRY, json.dumps(uris), str(tmp_path / "images.npy"),
         str(tmp_path / "labels.npy"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_models_tab_lists_each_network_with_its_stage_run(pipeline):
    repo, _ = pipeline
    client, runs = mlflow_runs(repo)
    experiment = client.get_experiment_by_name("latentlab")
    models = {model.name: model for model in client.search_logged_models([experiment.experiment_id])}
    made_by = {"encoder": "encoder", "vae": "vae", "denoiser": "diffusion", "student_1_steps": "distill",
               "student_2_steps": "distill", "student_4_steps": "distill"}
    assert set(models) == set(made_by)
    for name, stage in made_by.items():
        model = models[name]
        assert model.source_run_id == runs[stage].info.run_id and model.status.name == "READY"
        assert model.model_id in {output.model_id for output in runs[stage].outputs.model_outputs}  # the run's Models tab
        assert model.tags["stage"] == stage and model.params[f"{stage}.seed"] == str(load_params_of(repo, stage)["seed"])
    assert client.get_logged_model(models["vae"].model_id).metrics  # the stage's metrics, on the model too


def test_registered_models_load_in_a_fresh_process_without_unpickling_and_reproduce_the_stages(pipeline, tmp_path):
    """`models:/latentlab-encoder@current` and `models:/latentlab-student@current` (the lowest-FID
    student), the VAE and the denoiser by model id: loaded in a new process outside the repo with
    pickle and torch.load disabled, each gives what its stage saved."""
    from tasks.images import grid, to_uint8

    repo, _ = pipeline
    client, runs = mlflow_runs(repo)
    encoder = client.get_model_version_by_alias("latentlab-encoder", "current")
    student = client.get_model_version_by_alias("latentlab-student", "current")
    assert encoder.run_id == runs["encoder"].info.run_id and student.run_id == runs["distill"].info.run_id
    fid = metrics(repo, "fid")
    scores = {int(key.rpartition("_")[2]): value for key, value in fid.items() if key.startswith("fid.student.steps_")}
    steps = min(scores, key=scores.get)
    assert student.tags["steps"] == str(steps)
    experiment = client.get_experiment_by_name("latentlab").experiment_id
    models = {model.name: model.model_id for model in client.search_logged_models([experiment])}
    assert student.source == f"models:/{models[f'student_{steps}_steps']}" and encoder.source == f"models:/{models['encoder']}"
    linked = json.loads(client.get_logged_model(models["encoder"]).tags["mlflow.modelVersions"])  # its "Registered models"
    assert linked == [{"name": "latentlab-encoder", "version": int(encoder.version)}]

    distill, diffusion = load_params_of(repo, "distill"), load_params_of(repo, "diffusion")
    num_classes = len(json.loads((repo / "artifacts/prepare/manifest.json").read_text())["class_names"])
    assert distill["samples_per_class"] == diffusion["samples_per_class"]
    per_class = distill["samples_per_class"]
    labels = np.repeat(np.arange(num_classes), per_class)
    test_images = np.load(repo / "artifacts/prepare/test_images.npy")[:8].astype(np.float32) / 127.5 - 1
    uris = {"encoder": "models:/latentlab-encoder@current", "student": "models:/latentlab-student@current",
            "vae": f"models:/{models['vae']}", "denoiser": f"models:/{models['denoiser']}"}
    files = load_in_fresh_process(repo, tmp_path, uris, test_images, labels)

    np.testing.assert_allclose(np.load(tmp_path / "encoder.npy"), np.load(repo / "artifacts/encoder/test_embeddings.npy")[:8], atol=1e-5)
    from tasks.vae import encode_means, load_vae

    saved_vae = load_vae(repo / "artifacts/vae")
    np.testing.assert_allclose(np.load(tmp_path / "vae.npy"), encode_means(saved_vae, torch.from_numpy(test_images)).numpy(), atol=1e-5)
    sampled = {"denoiser": f"plots/diffusion/samples_guidance_{diffusion['guidance_scales'][-1]:g}.png",
               "student": f"plots/distill/samples_student_{steps}_steps.png"}
    for key, png in sampled.items():  # the default params redraw the stage's own sample grid
        drawn = grid(to_uint8(torch.from_numpy(np.load(tmp_path / f"{key}.npy"))), ncols=per_class)
        assert np.array_equal(np.asarray(Image.open(repo / png)), drawn[..., 0]), key
    for key, listed in files.items():
        if key == "tasks_from":  # the model's own copy of the loaders, not the checkout's
            assert listed.endswith("/code/tasks/__init__.py") and not listed.startswith(str(repo / "tasks")), listed
            continue
        assert "MLmodel" in listed and any(name.endswith(".safetensors") for name in listed), listed
        suffixes = {name.rpartition(".")[2] for name in listed if "." in name}
        assert suffixes <= {"py", "json", "yaml", "txt", "safetensors"}, listed  # no pickle, no .pt
    for mlmodel in (repo / "mlartifacts").rglob("MLmodel"):  # a pyfunc from code, not a cloudpickled one
        flavors = yaml.safe_load(mlmodel.read_text())["flavors"]
        assert set(flavors) == {"python_function"} and "python_model" not in flavors["python_function"]


def test_reruns_skip_what_is_up_to_date_link_what_they_reused_and_compare_shows_what_differed(pipeline):
    """Runs after the first (this test changes the copy): the flow again (all skipped: no parent
    run), the flow with one distill override (distill and fid rerun, the rest linked as reused),
    and a plain `dvc repro` after a probe change."""
    from mlflow.entities import ViewType

    repo, _ = pipeline
    client = mlflow_client(repo)
    first = pipeline_runs(repo)[0]
    first_children = children(repo, first)
    run([sys.executable, "-m", "flows", "run"], repo)
    assert len(pipeline_runs(repo)) == 1  # a run that ran nothing leaves no parent run...
    [noop] = client.search_runs([first.info.experiment_id], "tags.`latentlab.pipeline` = 'true'", run_view_type=ViewType.DELETED_ONLY)
    assert task_states(noop.data.tags["prefect.flow_run_id"]) == dict.fromkeys(STAGES, "Skipped")  # ...but its flow run shows

    run([sys.executable, "-m", "flows", "run", "--set", "params/distill.yaml:seed=1"], repo)
    parent, states = last_flow(repo)
    assert {s for s, state in states.items() if state == "Completed"} == {"distill", "fid"}, states
    partial = children(repo, parent)
    assert set(partial) == {"distill", "fid"}
    assert parent.info.run_name in run(["dvc", "exp", "list", "--name-only"], repo).stdout
    tags = parent.data.tags
    upstream = STAGES[:-2]
    assert tags["stages.ran"] == "distill,fid" and tags["stages.reused"] == ",".join(upstream)
    assert {stage: tags[f"reused.{stage}"] for stage in upstream} == {s: first_children[s].info.run_id for s in upstream}
    assert first_children["diffusion"].info.run_id in tags["mlflow.note.content"]  # the description links them
    assert parent.data.metrics["stages_run"] == 2
    fid_files = {a.path for a in client.list_artifacts(parent.info.run_id, "fid")}
    assert "fid/fid_table.md" in fid_files and any(path.startswith("fid/fid_vs_steps") for path in fid_files), fid_files
    table = client.download_artifacts(parent.info.run_id, "fid/fid_table.md")
    assert Path(table).read_text() == (repo / "artifacts/fid/fid_table.md").read_text()
    assert client.get_model_version_by_alias("latentlab-student", "current").run_id == partial["distill"].info.run_id
    assert len(client.search_model_versions("name = 'latentlab-encoder'")) == 1  # the same encoder: no new version

    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "distill.seed=1", "--set", "probe.knn_k=5"], repo)
    rerun = run(["dvc", "repro"], repo).stdout
    assert [stage for stage in STAGES if f"Running stage '{stage}'" in rerun] == ["probe"]
    parent = pipeline_runs(repo)[-1]  # a plain `dvc repro` has its parent run too
    assert parent.data.tags["trigger"] == "dvc repro" and set(children(repo, parent)) == {"probe"}
    assert parent.data.metrics["probe_top1"] == metrics(repo, "probe")["probe_top1"]
    assert parent.data.tags["reused.fid"] == partial["fid"].info.run_id  # the newest outputs' maker
    assert parent.data.tags["reused.encoder"] == first_children["encoder"].info.run_id and "reused.probe" not in parent.data.tags
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout
    assert "up to date" in run(["dvc", "status"], repo).stdout
    assert len(pipeline_runs(repo)) == 3

    out = run([sys.executable, "-m", "flows", "compare", "--csv", "runs.csv"], repo).stdout
    table = pd.read_csv(repo / "runs.csv")
    assert len(table) == 3 and "fid_student_4" in out  # the no-op run is not a result
    assert sorted(table["ran"]) == sorted([",".join(STAGES), "distill,fid", "probe"])
    assert {"distill.seed", "probe.knn_k"} <= set(table.columns)
    assert "prepare.source" not in table.columns  # the same in every run
    assert sorted(table["probe.knn_k"].tolist()) == [5, 20, 20]
