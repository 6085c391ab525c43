"""The whole pipeline on the smoke profile in a fresh copy of the repo, run as the Prefect pipeline
flow (`python -m flows run`) under a real Prefect server, with a real MLflow store and real DVC;
most tests below inspect that one run, the last ones rerun it."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from runtime.code_deps import stage_code
from runtime.dag import dvc_hash
from tests.conftest import run, run_env

pytestmark = pytest.mark.slow

STAGES = ["prepare", "ssl", "encoder", "probe", "kd", "clip", "vae", "diffusion", "gan", "ar", "distill", "fid"]


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


def task_runs(flow_run_id: str) -> list:
    """The task runs of a Prefect flow run as the UI's Task Runs tab asks for them (`/task_runs/filter`
    by flow run, leaving out task runs with a subflow run), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterSubFlowRuns,
    )
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(subflow_runs=TaskRunFilterSubFlowRuns(exists_=False)),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100,
        )


def task_states(flow_run_id: str) -> dict[str, str]:
    """{task run name: state name} of a Prefect flow run's Task Runs tab."""
    return {task_run.name: task_run.state.name for task_run in task_runs(flow_run_id)}


def last_flow(repo):
    parent = pipeline_runs(repo)[-1]
    return parent, task_states(parent.data.tags["prefect.flow_run_id"])


def test_the_flow_ran_every_stage_as_a_task_run_and_left_dvc_clean(pipeline):
    repo, first = pipeline
    parent, states = last_flow(repo)
    assert states == dict.fromkeys(STAGES, "Completed"), states  # the Task Runs tab: one per stage
    listed = task_runs(parent.data.tags["prefect.flow_run_id"])
    assert len(listed) == len(STAGES) and all(task_run.total_run_time.total_seconds() > 1 for task_run in listed)
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
    for stage in ("ssl", "probe", "kd"):  # accuracies as precise as the split resolves, no float noise
        shares = {key: value for key, value in metrics(repo, stage).items() if "top1" in key or key == "kd_gain"}
        assert shares and all(len(repr(value).partition(".")[2]) <= 5 for value in shares.values()), shares


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
    assert headline["kd_gain"] == metrics(repo, "kd")["kd_gain"]
    assert headline["fid_student_4"] == metrics(repo, "fid")["fid.student.steps_4"]
    assert headline["fid_teacher"] == metrics(repo, "fid")["fid.teacher.steps_16"]
    assert headline["fid_gan"] == metrics(repo, "fid")["fid.gan"]
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
    from tasks.images import captioned
    from tasks.params import load_params
    from tasks.vae import encode_means, load_decoder, load_latents

    decoder = load_decoder("artifacts/vae")  # the VAE re-encodes the training split to the saved latents
    saved = load_latents("artifacts/vae").latents
    torch.testing.assert_close(encode_means(decoder.vae, load_split("train").floats()), saved, atol=1e-5, rtol=0)
    params = load_params("diffusion")  # the denoiser redraws the stage's sample grids
    denoiser = load_denoiser("artifacts/diffusion")
    grids = {
        f"guidance {guidance:g}": class_grid(denoiser, decoder, params.samples_per_class, params.sample_steps, guidance, params.seed)[0]
        for guidance in params.guidance_scales
    }
    stored = np.asarray(Image.open("plots/diffusion/samples.png"))
    assert np.array_equal(stored, captioned(grids)[..., 0])


def test_generative_results_reach_dvc_metrics_plots_and_mlflow(pipeline):
    repo, _ = pipeline
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    workspace = next(iter(shown.values()))["data"]
    fid = workspace["metrics/fid.json"]["data"]
    assert {"fid.teacher.steps_4", "fid.student.steps_4", "fid.floor_train_vs_test", "kid.prior_vs_test"} <= set(fid)
    assert (repo / "plots" / "fid" / "fid_vs_nfe.png").exists()
    assert (repo / "artifacts" / "fid" / "fid_table.md").read_text().startswith("| row |")
    client, runs = mlflow_runs(repo)
    plots = {stage: [a.path for a in client.list_artifacts(runs[stage].info.run_id, "plots")] for stage in ("vae", "diffusion", "fid")}
    assert "plots/reconstructions.png" in plots["vae"] and "plots/prior_samples.png" in plots["vae"]
    assert "plots/samples.png" in plots["diffusion"] and "plots/train.csv" in plots["diffusion"]
    assert "plots/fid_vs_nfe.png" in plots["fid"]
    assert runs["fid"].data.metrics["fid.student.steps_4"] == fid["fid.student.steps_4"]
    assert len(client.get_metric_history(runs["diffusion"].info.run_id, "train/loss")) > 3


def declared_plots(repo) -> dict[str, dict]:
    """{file: props} of every stage's `plots:` in dvc.yaml, in its order."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return {path: props for stage in stages.values() for entry in stage.get("plots", []) for path, props in entry.items()}


@pytest.mark.slow
def test_dvc_plots_show_draws_the_curves_and_the_sample_figures(pipeline):
    repo, _ = pipeline
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert "errors" not in shown, shown["errors"]
    declared = declared_plots(repo)
    assert list(shown["data"]) == list(declared)  # each stage's plots, in dvc.yaml's order, and nothing else
    curves = [path for path in declared if path.endswith(".csv")]
    # the ar stage skips on the smoke run's KL latent: its curve has a header and no points, and
    # `dvc plots show` draws nothing for it (its title says why); every other curve has its chart
    assert [path for path in curves if not shown["data"][path]] == ["plots/ar/train.csv"]
    assert metrics(repo, "ar")["skipped"] == 1
    specs = {path: shown["data"][path][0]["content"] for path in curves if shown["data"][path]}
    for path, spec in specs.items():  # dvc.yaml's title and axis labels reach the chart
        assert spec["title"]["text"] == declared[path]["title"]
        text = json.dumps(spec)
        assert f'"title": "{declared[path]["x_label"]}"' in text and f'"title": "{declared[path]["y_label"]}"' in text
    assert all(shown["data"][path][0]["type"] == "image" for path in declared if path.endswith(".png"))

    rows = specs["plots/fid/fid_vs_nfe.csv"]["data"]["values"]  # every generator on one chart, a line each, by NFE
    assert specs["plots/fid/fid_vs_nfe.csv"]["encoding"]["x"]["scale"]["type"] == "log"
    fid = metrics(repo, "fid")
    for kind, line in (("teacher", "teacher (ddim)"), ("student", "student")):  # smoke: a DDPM teacher, 1 call a step
        points = [(int(r["nfe"]), float(r["fid"])) for r in rows if r["generator"] == line]
        steps = sorted(int(key.rpartition("_")[2]) for key in fid if key.startswith(f"fid.{kind}."))
        assert [s for s, _ in points] == steps  # numeric order: 1, 2, 4, 8, 16
        assert all(value == pytest.approx(fid[f"fid.{kind}.steps_{s}"], rel=1e-4, abs=1e-5) for s, value in points)
    assert [float(r["fid"]) for r in rows if r["generator"] == "gan"] == [pytest.approx(fid["fid.gan"], rel=1e-4, abs=1e-5)]
    floor = [float(r["fid"]) for r in rows if r["generator"] == "floor (real train vs test)"]
    assert floor == [pytest.approx(fid["fid.floor_train_vs_test"], rel=1e-4, abs=1e-5)] * 2
    speed = specs["plots/fid/speed.csv"]["data"]["values"]  # the sampled rows' images/s, the same lines
    assert {r["generator"] for r in speed} == {r["generator"] for r in rows} - {"floor (real train vs test)", "decoded prior"}

    for stage in ("ssl", "vae", "diffusion", "distill"):  # a point per logged training step
        steps = [int(r["step"]) for r in specs[f"plots/{stage}/train.csv"]["data"]["values"]]
        assert len(steps) > 3 and steps == sorted(set(steps)), (stage, steps)
    knn = specs["plots/ssl/eval.csv"]["data"]["values"]
    assert float(knn[-1]["knn_top1"]) == pytest.approx(metrics(repo, "ssl")["knn_top1"], rel=1e-4)
    students = specs["plots/kd/students.csv"]["data"]["values"]  # a line per network
    assert {r["series"] for r in students} == {"with_kd", "without_kd", "teacher"}

    run(["dvc", "plots", "show"], repo)  # the page
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "<h2>latentlab</h2>" in page  # .dvc/plots/page.html, the page's template
    assert all(declared[path]["title"] in page for path in specs)
    labels = [label for label in re.findall(r"<p>([^<]+)</p>", page) if label != "workspace"]
    assert sorted(labels) == sorted(path for path in declared if path.endswith(".png"))
    assert "dvc_plots" not in run(["git", "status", "--porcelain"], repo).stdout  # ignored


def files_under(repo, *folders) -> dict[str, str]:
    """{path: git blob hash} of every file under `folders` in the working tree."""
    paths = sorted(str(p.relative_to(repo)) for folder in folders for p in (repo / folder).rglob("*") if p.is_file())
    hashes = run(["git", "hash-object", "--", *paths], repo).stdout.split()
    return dict(zip(paths, hashes, strict=True))


def experiment_ref(repo, name: str) -> str:
    """The git ref of DVC experiment `name`."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    (ref,) = [ref for ref in refs if ref.endswith(f"/{name}")]
    return ref


def experiment_files(repo, name: str, *folders) -> dict[str, str]:
    """{path: git blob hash} of the files under `folders` in DVC experiment `name`'s commit."""
    listed = run(["git", "ls-tree", "-r", experiment_ref(repo, name), "--", *folders], repo).stdout.splitlines()
    return {line.split("\t")[1]: line.split()[2] for line in listed}


@pytest.mark.slow
def test_the_flow_s_experiment_holds_every_plot_and_metrics_file(pipeline):
    repo, _ = pipeline
    name = pipeline_runs(repo)[0].info.run_name
    in_workspace = files_under(repo, "plots", "metrics")
    assert len(in_workspace) > 20 and "plots/fid/fid_vs_nfe.png" in in_workspace
    assert experiment_files(repo, name, "plots", "metrics") == in_workspace  # git tracked none of them before


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
    repo, first = pipeline
    client, runs = mlflow_runs(repo)
    experiment = client.get_experiment_by_name("latentlab")
    models = {model.name: model for model in client.search_logged_models([experiment.experiment_id])}
    made_by = {"encoder": "encoder", "kd_student": "kd", "vae": "vae", "denoiser": "diffusion", "gan_generator": "gan",
               "student_1_steps": "distill", "student_2_steps": "distill", "student_4_steps": "distill"}
    assert set(models) == set(made_by)
    for name, stage in made_by.items():
        model = models[name]
        assert model.source_run_id == runs[stage].info.run_id and model.status.name == "READY"
        assert model.model_id in {output.model_id for output in runs[stage].outputs.model_outputs}  # the run's Models tab
        assert model.tags["stage"] == stage and model.params[f"{stage}.seed"] == str(load_params_of(repo, stage)["seed"])
    assert client.get_logged_model(models["vae"].model_id).metrics  # the stage's metrics, on the model too
    students = {name: runs["distill"].data.params[f"{name}/network"] for name in made_by if name.startswith("student_")}
    assert len(set(students.values())) == 3  # each student's config logged under its own name...
    assert "Failed to log model config" not in first.stdout + first.stderr  # ...without a collision


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
    from tasks.diffusion import class_grid, load_denoiser
    from tasks.students import load_students
    from tasks.vae import load_decoder

    decoder = load_decoder(repo / "artifacts/vae")
    (chosen,) = [s for s in load_students(repo / "artifacts/distill")[0] if s.steps == steps]
    sampled = {  # the default params draw what the stage's own network draws at its sample-grid settings
        "denoiser": (load_denoiser(repo / "artifacts/diffusion"), diffusion["sample_steps"], diffusion["guidance_scales"][-1]),
        "student": (chosen.denoiser, chosen.steps, chosen.guidance),
    }
    for key, (denoiser, sample_steps, guidance) in sampled.items():
        drawn = grid(to_uint8(torch.from_numpy(np.load(tmp_path / f"{key}.npy"))), ncols=per_class)
        expected, _ = class_grid(denoiser, decoder, per_class, sample_steps, guidance, diffusion["seed"] if key == "denoiser" else distill["seed"])
        assert np.array_equal(expected, drawn), key
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


def snapshot(repo, *paths) -> dict[str, bytes]:
    """{file: bytes} of every file under `paths` (files or folders)."""
    files = [f for p in paths for f in ([repo / p] if (repo / p).is_file() else sorted((repo / p).rglob("*")))]
    return {str(f.relative_to(repo)): f.read_bytes() for f in files if f.is_file()}


def test_a_failed_stage_keeps_the_last_good_outputs(pipeline):
    """`dvc repro` removes a stage's outputs before running it; the metrics and plots are not in
    DVC's cache to check out, so the stage puts every output back when it fails."""
    repo, _ = pipeline
    outputs = ("metrics/probe.json", "plots/probe", "artifacts/probe")
    before, lock = snapshot(repo, *outputs), (repo / "dvc.lock").read_text()
    assert "metrics/probe.json" in before and any(name.startswith("plots/probe/") for name in before)
    params = repo / "params" / "probe.yaml"
    good = params.read_text()
    try:
        params.write_text(good.replace("knn_k: 20", "knn_k: 0"))
        failed = run(["dvc", "repro", "probe"], repo, check=False)
        assert failed.returncode != 0 and "params/probe.yaml: key 'knn_k' = 0" in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
        assert snapshot(repo, *outputs) == before
        assert (repo / "dvc.lock").read_text() == lock
    finally:
        params.write_text(good)
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}


def test_a_params_edit_while_a_stage_trains_fails_it_and_changes_nothing(pipeline):
    """dvc.lock records the params file as it is when the stage ends: an edit while ssl trains
    would label the old run's outputs with the new value."""
    repo, _ = pipeline
    outputs = ("metrics/ssl.json", "artifacts/ssl")
    before, lock = snapshot(repo, *outputs), (repo / "dvc.lock").read_text()
    params = repo / "params" / "ssl.yaml"
    good = params.read_text()
    stage = subprocess.Popen(["dvc", "repro", "--force", "--single-item", "ssl"], cwd=repo, env=run_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((repo / "artifacts").glob(".ssl.tmp*")) and stage.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the stage's outputs are being written: it is training
        params.write_text(good.replace("knn_every_epochs: 10", "knn_every_epochs: 5"))
        out, err = stage.communicate(timeout=300)
    finally:
        params.write_text(good)
    assert stage.returncode != 0, out + err
    assert "inputs changed while the stage ran: params/ssl.yaml changed (ssl.knn_every_epochs: 10 -> 5)" in err, err
    assert snapshot(repo, *outputs) == before
    assert (repo / "dvc.lock").read_text() == lock
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}


@pytest.mark.parametrize(
    "spoilt, stage, message",
    [
        ("artifacts/prepare/train_images.npy", "ssl", "artifacts/prepare/train_images.npy: not a readable .npy array"),
        ("artifacts/encoder/encoder.safetensors", "vae", "artifacts/encoder/encoder.safetensors: does not load with encoder.json"),
    ],
)
def test_an_artifact_truncated_between_stages_stops_the_next_one_naming_it(pipeline, spoilt, stage, message):
    """`dvc repro` would rebuild what changed; run directly, the next stage meets the bad file."""
    repo, _ = pipeline
    outputs = (f"metrics/{stage}.json", f"artifacts/{stage}", f"plots/{stage}")
    before, good = snapshot(repo, *outputs), (repo / spoilt).read_bytes()
    try:
        (repo / spoilt).write_bytes(good[: len(good) // 2])
        done = run([sys.executable, "-m", f"flows.{stage}"], repo, check=False)
    finally:
        (repo / spoilt).write_bytes(good)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count(message) == 1 and "Traceback" not in done.stderr, done.stderr
    assert snapshot(repo, *outputs) == before


def test_a_code_change_makes_exactly_the_stages_importing_it_stale(pipeline):
    """Edit one line of the training loop (the AdamW betas): `dvc status` names exactly the stages
    whose flows import tasks/training.py; put it back and nothing is stale."""
    repo, _ = pipeline
    training = repo / "tasks" / "training.py"
    original = training.read_text()
    assert "betas=(0.9, 0.99)" in original
    importers = {stage for stage in STAGES if "tasks/training.py" in stage_code(repo, stage)}
    assert importers == {"ssl", "kd", "clip", "vae", "diffusion", "gan", "ar", "distill"}
    try:
        training.write_text(original.replace("betas=(0.9, 0.99)", "betas=(0.9, 0.999)"))
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
        assert set(status) == importers, status
        for stage in importers:
            assert {"changed deps": {"tasks/training.py": "modified"}} in status[stage], status
    finally:
        training.write_text(original)
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}


def test_reruns_skip_what_is_up_to_date_link_what_they_reused_and_compare_shows_what_differed(pipeline):
    """Runs after the first (this test changes the copy): the flow again (all skipped: no parent
    run), the flow with one distill override (distill and fid rerun, the rest linked as reused),
    and a plain `dvc repro` after a probe change."""
    from mlflow.entities import ViewType

    repo, _ = pipeline
    client = mlflow_client(repo)
    first = pipeline_runs(repo)[0]
    first_children = children(repo, first)
    earlier = len(pipeline_runs(repo))  # the first, and the failed runs of the tests above
    run([sys.executable, "-m", "flows", "run"], repo)
    assert len(pipeline_runs(repo)) == earlier  # a run that ran nothing leaves no parent run...
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
    assert "fid/fid_table.md" in fid_files and any(path.startswith("fid/fid_vs_nfe") for path in fid_files), fid_files
    table = client.download_artifacts(parent.info.run_id, "fid/fid_table.md")
    assert Path(table).read_text() == (repo / "artifacts/fid/fid_table.md").read_text()
    assert client.get_model_version_by_alias("latentlab-student", "current").run_id == partial["distill"].info.run_id
    assert len(client.search_model_versions("name = 'latentlab-encoder'")) == 1  # the same encoder: no new version

    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "distill.seed=1", "--set", "probe.knn_k=5"], repo)
    rerun = run(["dvc", "repro"], repo).stdout
    assert [stage for stage in STAGES if f"Running stage '{stage}'" in rerun] == ["probe", "fid"]  # fid's request accuracy reads the probe
    parent = pipeline_runs(repo)[-1]  # a plain `dvc repro` has its parent run too
    assert parent.data.tags["trigger"] == "dvc repro" and set(children(repo, parent)) == {"probe", "fid"}
    assert parent.data.metrics["probe_top1"] == metrics(repo, "probe")["probe_top1"]
    assert parent.data.tags["reused.distill"] == partial["distill"].info.run_id  # the newest outputs' maker
    assert parent.data.tags["reused.encoder"] == first_children["encoder"].info.run_id and "reused.probe" not in parent.data.tags
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout
    assert "up to date" in run(["dvc", "status"], repo).stdout
    assert len(pipeline_runs(repo)) == earlier + 2

    out = run([sys.executable, "-m", "flows", "compare", "--csv", "runs.csv"], repo).stdout
    import pandas as pd

    table = pd.read_csv(repo / "runs.csv")
    assert "fid_student_4" in out and set(table["status"]) <= {"FINISHED", "FAILED"}
    table = table[table["status"] == "FINISHED"]  # the failed runs of the tests above show too
    assert len(table) == 3  # the no-op run is not a result
    assert sorted(table["ran"]) == sorted([",".join(STAGES), "distill,fid", "probe,fid"])
    assert {"distill.seed", "probe.knn_k"} <= set(table.columns)
    assert "prepare.source" not in table.columns  # the same in every run
    assert sorted(table["probe.knn_k"].tolist()) == [5, 20, 20]


@pytest.mark.slow
def test_dvc_exp_run_keeps_every_plot_file_in_the_experiment(pipeline):
    """`dvc exp run -S` of a param that changes the fid stage's outputs (runs after the reruns above)."""
    repo, _ = pipeline
    run(["dvc", "exp", "run", "-n", "two-teacher-steps", "-S", "params/fid.yaml:teacher_steps=[1,3]"], repo)
    assert "two-teacher-steps" in run(["dvc", "exp", "show", "--md", "--only-changed"], repo).stdout
    assert experiment_files(repo, "two-teacher-steps", "plots", "metrics") == files_under(repo, "plots", "metrics")
    speed = run(["git", "show", experiment_ref(repo, "two-teacher-steps") + ":plots/fid/speed.csv"], repo).stdout
    teacher = [row.split(",")[1] for row in speed.splitlines() if row.startswith("teacher (ddim),")]
    assert teacher == ["1", "3"]  # generator,nfe,...: the DDPM teacher's DDIM calls its net once a step
