"""The whole pipeline on the smoke profile in a fresh copy of the repo, run as the Prefect pipeline
flow (`python -m flows run`) under a real Prefect server, with a real MLflow store and real DVC;
most tests below inspect that one run, the last ones rerun it."""

import json
import math
import re
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from runtime.dag import dvc_hash
from tests.conftest import copy_repo, run

STAGES = ["prepare", "ssl", "encoder", "probe", "vae", "diffusion", "distill", "fid"]


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
        f"guidance {guidance:g}": class_grid(denoiser, decoder, denoiser.net.config.num_classes,
                                             params.samples_per_class, params.sample_steps, guidance, params.seed)[0]
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
    assert (repo / "plots" / "fid" / "fid_vs_steps.png").exists()
    assert (repo / "artifacts" / "fid" / "fid_table.md").read_text().startswith("| row |")
    client, runs = mlflow_runs(repo)
    plots = {stage: [a.path for a in client.list_artifacts(runs[stage].info.run_id, "plots")] for stage in ("vae", "diffusion", "fid")}
    assert "plots/reconstructions.png" in plots["vae"] and "plots/prior_samples.png" in plots["vae"]
    assert "plots/samples.png" in plots["diffusion"] and "plots/train.csv" in plots["diffusion"]
    assert "plots/fid_vs_steps.png" in plots["fid"]
    assert runs["fid"].data.metrics["fid.student.steps_4"] == fid["fid.student.steps_4"]
    assert len(client.get_metric_history(runs["diffusion"].info.run_id, "train/loss")) > 3


CURVES = ["fid_vs_steps", "sampling_speed", "ssl_loss", "ssl_knn", "vae_loss", "diffusion_loss", "distill_loss"]
IMAGES = [
    "plots/prepare/samples.png", "plots/encoder/embedding_2d.png", "plots/probe/confusion.png",
    "plots/probe/label_efficiency.png", "plots/vae/reconstructions.png", "plots/vae/prior_samples.png",
    "plots/diffusion/samples.png", "plots/distill/samples.png", "plots/fid/samples_teacher.png",
    "plots/fid/samples_student.png",
]


@pytest.mark.slow
def test_dvc_plots_show_draws_the_curves_and_the_sample_figures(pipeline):
    repo, _ = pipeline
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert "errors" not in shown, shown["errors"]
    assert list(shown["data"]) == CURVES + IMAGES  # dvc.yaml's plots, in its order, and nothing else
    specs = {name: shown["data"][name][0]["content"] for name in CURVES}
    defined = {name: props for entry in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
               if isinstance(entry, dict) for name, props in entry.items()}
    for name, spec in specs.items():  # dvc.yaml's title and axis labels reach the chart
        assert spec["title"]["text"] == defined[name]["title"]
        text = json.dumps(spec)
        assert f'"title": "{defined[name]["x_label"]}"' in text and f'"title": "{defined[name]["y_label"]}"' in text

    rows = specs["fid_vs_steps"]["data"]["values"]  # teacher and student on one chart, by steps
    assert specs["fid_vs_steps"]["encoding"]["x"]["scale"]["type"] == "log"
    fid = metrics(repo, "fid")
    for kind in ("teacher", "student"):
        points = [(int(r["steps"]), float(r["fid"])) for r in rows if r["filename"] == f"{kind}.csv"]
        steps = sorted(int(key.rpartition("_")[2]) for key in fid if key.startswith(f"fid.{kind}."))
        assert [s for s, _ in points] == steps  # numeric order: 1, 2, 4, 8, 16
        assert all(value == pytest.approx(fid[f"fid.{kind}.steps_{s}"], rel=1e-4, abs=1e-5) for s, value in points)
    floor = [float(r["fid"]) for r in rows if r["filename"] == "floor.csv"]
    assert floor == [pytest.approx(fid["fid.floor_train_vs_test"], rel=1e-4, abs=1e-5)] * 2

    for name in ("ssl_loss", "vae_loss", "diffusion_loss", "distill_loss"):  # a point per logged training step
        steps = [int(r["step"]) for r in specs[name]["data"]["values"] if r.get("field", "loss") == "loss"]
        assert len(steps) > 3 and steps == sorted(set(steps)), (name, steps)
    knn = specs["ssl_knn"]["data"]["values"]
    assert float(knn[-1]["knn_top1"]) == pytest.approx(metrics(repo, "ssl")["knn_top1"], rel=1e-4)

    run(["dvc", "plots", "show"], repo)  # the page: charts first, then the images grouped by stage folder
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "<h2>latentlab</h2>" in page  # .dvc/plots/page.html, the page's template
    assert page.index(specs["distill_loss"]["title"]["text"]) < page.index("<img")
    labels = [label for label in re.findall(r"<p>([^<]+)</p>", page) if label != "workspace"]
    assert labels == sorted(IMAGES)  # DVC orders images by path: a stage folder at a time
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
    assert len(in_workspace) > 20 and "plots/fid/fid_vs_steps.png" in in_workspace
    assert experiment_files(repo, name, "plots", "metrics") == in_workspace  # git tracked none of them before


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


@pytest.mark.slow
def test_dvc_exp_run_keeps_every_plot_file_in_the_experiment(pipeline):
    """`dvc exp run -S` of a param that changes the fid stage's outputs (runs after the reruns above)."""
    repo, _ = pipeline
    run(["dvc", "exp", "run", "-n", "two-teacher-steps", "-S", "params/fid.yaml:teacher_steps=[1,3]"], repo)
    assert "two-teacher-steps" in run(["dvc", "exp", "show", "--md", "--only-changed"], repo).stdout
    assert experiment_files(repo, "two-teacher-steps", "plots", "metrics") == files_under(repo, "plots", "metrics")
    teacher = run(["git", "show", experiment_ref(repo, "two-teacher-steps") + ":plots/fid/teacher.csv"], repo).stdout
    assert [line.split(",")[0] for line in teacher.splitlines()] == ["steps", "1", "3"]
