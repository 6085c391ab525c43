"""Sweeps: a grid of params queued on DVC's own experiment queue, run by its worker, and ranked."""

import sys
import time

import pytest

from runtime.profiles import profile_params
from runtime.sweep import points, ranking, refusal
from tests.conftest import run
from tests.test_pipeline import mlflow_client


def test_all_objectives_are_thirteen_points_and_the_patch_token_ones_get_the_vit_recipe():
    grid = points(["ssl.objective=all"])
    assert len(grid) == 13
    recipe = ["ssl.backbone=vit", "ssl.vit.pool=mean", "ssl.train.lr=0.001"]
    assert ["ssl.objective=mae", *recipe] in grid and ["ssl.objective=ijepa", *recipe] in grid
    assert ["ssl.objective=simclr"] in grid
    crossed = points(["ssl.objective=mae,simclr", "params/ssl.yaml:backbone=resnet,vit", "ssl.train.lr=0.002"])
    assert len(crossed) == 4 and ["ssl.objective=simclr", "params/ssl.yaml:backbone=vit", "ssl.train.lr=0.002"] in crossed
    chosen = ["ssl.objective=mae", "params/ssl.yaml:backbone=resnet", "ssl.train.lr=0.002", "ssl.vit.pool=mean"]
    assert chosen in crossed  # what the point sets is kept, the rest of the recipe added


def test_a_point_the_stages_would_refuse_is_named_with_the_reason():
    current = profile_params("default")  # MNIST: grayscale
    assert "colorization" in refusal(["ssl.objective=colorization"], current)
    assert "needs backbone: vit" in refusal(["ssl.objective=mae", "ssl.backbone=resnet"], current)
    assert refusal(["ssl.objective=colorization", "prepare.source=cifar10"], current) is None
    assert refusal(["ssl.objective=jigsaw"], current) is None


def finished(name, backbone, probe_top1, random_top1):
    """An experiment as `experiments()` reads it from `dvc exp show --json`."""
    probe = {"probe_top1": probe_top1, "random_encoder.probe_top1": random_top1, "raw_pixels.probe_top1": 0.9}
    return {"name": name, "params": {"params/ssl.yaml:backbone": backbone, "params/ssl.yaml:objective": name},
            "metrics": {"metrics/probe.json": probe, "metrics/ssl.json": {"images_per_s": 100.0}}}


def test_each_ranked_row_has_its_own_random_baseline_and_each_backbone_its_line():
    table = ranking([finished("ijepa", "vit", 0.80, 0.74), finished("simclr", "resnet", 0.97, 0.78), finished("mae", "vit", 0.85, 0.72)])
    assert table["experiment"].tolist() == ["simclr", "mae", "ijepa", "(raw pixels)", "(random resnet)", "(random vit)"]
    assert table["random_same_arch"].tolist()[:3] == [0.78, 0.72, 0.74]
    lines = table.set_index("experiment")["probe_top1"]
    assert lines["(random vit)"] == 0.72 and lines["(random resnet)"] == 0.78 and lines["(raw pixels)"] == 0.9  # the best vit's


@pytest.mark.slow
def test_a_queued_sweep_runs_on_dvcs_queue_and_ranks_against_the_baselines(reproduced):
    repo = reproduced
    run(["dvc", "repro", "probe"], repo)
    run(["git", "add", "-A"], repo)  # dvc.lock, metrics and plots: the baseline the experiments start from
    run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "baseline"], repo)
    queued = run([sys.executable, "-m", "flows", "sweep", "ssl.objective=dae,colorization", "--start"], repo).stdout
    assert "queued dae-" in queued and "skipped ssl.objective=colorization" in queued, queued
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Success" in status, status

    ranked = run([sys.executable, "-m", "flows", "rank", "--csv", "ranking.csv", "--plot", "ranking.png"], repo).stdout
    import pandas as pd

    table = pd.read_csv(repo / "ranking.csv")
    assert table["experiment"].tolist()[0].startswith("dae-"), ranked
    assert table.loc[0, "rank"] == 1 and 0 < table.loc[0, "probe_top1"] <= 1 and table.loc[0, "ssl_images_per_s"] > 0
    assert table["experiment"].tolist()[1:] == ["(raw pixels)", "(random resnet)"]
    assert table.loc[0, "random_same_arch"] == table.loc[2, "probe_top1"]  # one experiment: its own baseline
    assert (repo / "ranking.png").stat().st_size > 0
    # its MLflow runs are in this checkout's store, not in the queue's deleted copy
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("latentlab")
    name = table["experiment"][0]
    parent, = client.search_runs([experiment.experiment_id], f"tags.`dvc.experiment` = '{name}'")
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name for r in runs} == {"ssl", "encoder", "probe"}, [r.info.run_name for r in runs]
    probe = next(r for r in runs if r.info.run_name == "probe")
    assert probe.data.metrics["probe_top1"] == pytest.approx(table.loc[0, "probe_top1"])
