"""StageRun refuses to label outputs with inputs they did not come from: a params file, a dep or
the stage's code that changes while it runs fails the stage, and nothing is put in place."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from runtime.stage import StageRun
from runtime.stage_end import InputsChanged
from tasks.params import load_params


@pytest.fixture(scope="module", autouse=True)
def one_tracking_store(tmp_path_factory):
    """One MLflow store for the module (a new SQLite store costs seconds of migrations)."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
        yield


def stage_folder(deps: list[str]) -> None:
    """A working directory with params/probe.yaml and a dvc.yaml giving probe `deps`."""
    Path("params").mkdir()
    Path("params/probe.yaml").write_text("knn_k: 20\n")
    Path("dvc.yaml").write_text(yaml.safe_dump({"stages": {"probe": {"cmd": "true", "deps": deps}}}))


def nothing_in_place() -> None:
    for folder in ("artifacts", "plots", "metrics"):
        assert not Path(folder).exists() or not any(Path(folder).rglob("*")), folder


def run_probe(change) -> None:
    with StageRun("probe", load_params("probe")) as run:
        (run.outputs.artifacts / "report.json").write_text("{}")
        (run.outputs.plots / "confusion.png").write_bytes(b"png")
        run.metrics["probe_top1"] = 0.5
        change()


def test_a_params_edit_while_the_stage_runs_fails_it_naming_the_key(in_tmp):
    stage_folder([])
    with pytest.raises(InputsChanged, match=r"params/probe.yaml changed \(probe.knn_k: 20 -> 5\)"):
        run_probe(lambda: Path("params/probe.yaml").write_text("knn_k: 5\n"))
    nothing_in_place()


def test_a_params_file_that_stops_validating_while_the_stage_runs_fails_it(in_tmp):
    stage_folder([])
    with pytest.raises(InputsChanged, match=r"params/probe.yaml changed \(it no longer validates\)"):
        run_probe(lambda: Path("params/probe.yaml").write_text("knn_k: -1\n"))
    nothing_in_place()


def test_an_edit_that_keeps_the_values_is_no_change(in_tmp):
    stage_folder([])
    run_probe(lambda: Path("params/probe.yaml").write_text("# a comment\nknn_k: 20\n"))
    assert Path("metrics/probe.json").exists() and Path("artifacts/probe/report.json").exists()


def test_a_data_dep_changed_while_the_stage_runs_fails_it(in_tmp):
    stage_folder(["data/features"])
    Path("data/features").mkdir(parents=True)
    Path("data/features/a.npy").write_bytes(b"1")
    with pytest.raises(InputsChanged, match=r"data/features changed"):
        run_probe(lambda: Path("data/features/b.npy").write_bytes(b"2"))
    nothing_in_place()


def test_code_edited_after_the_process_loaded_it_fails_the_stage(in_tmp):
    """The warm stage host imports every stage's code when the pipeline starts: a later edit is not
    what runs, even when the file hashes the same at the stage's start and end."""
    stage_folder(["tasks/probe.py"])
    Path("tasks").mkdir()
    Path("tasks/probe.py").write_text("x = 1\n")
    an_hour_ago = time.time() - 3600
    os.utime("tasks/probe.py", (an_hour_ago, an_hour_ago))
    with pytest.raises(InputsChanged, match=r"tasks/probe.py changed after this process loaded it"):
        run_probe(lambda: Path("tasks/probe.py").write_text("x = 1\n"))
    nothing_in_place()


def test_a_ctrl_c_whose_exception_python_dropped_still_stops_the_stage(in_tmp, monkeypatch):
    """Python drops a KeyboardInterrupt raised inside a weakref callback ("Exception ignored in"):
    the stage's signal handler remembers it, and the stage's end refuses to put outputs in place."""
    import signal

    from mlflow import MlflowClient

    from runtime.stage_end import STOPPED_BY
    from runtime.tracking import tracking_uri

    stage_folder([])
    monkeypatch.setattr("runtime.stage_end.STOPPED_BY", [*STOPPED_BY, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt), StageRun("probe", load_params("probe")) as run:
        (run.outputs.artifacts / "report.json").write_text("{}")
        run_id = run.tracker.run_id
    nothing_in_place()
    assert MlflowClient(tracking_uri()).get_run(run_id).info.status == "KILLED"


def test_a_model_that_does_not_log_puts_nothing_in_place_and_fails_the_run(in_tmp):
    """The run's records are sent before the outputs go in place: one that cannot be (here a model
    whose files are missing) leaves nothing changed and the MLflow run FAILED."""
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from runtime.tracking import tracking_uri

    stage_folder([])
    with pytest.raises(MlflowException, match="not-exported.safetensors"), StageRun("probe", load_params("probe")) as run:
        (run.outputs.artifacts / "report.json").write_text("{}")
        run.log_model("probe", "classifier", np.zeros((1, 4), np.float32), network="not-exported")
        run_id = run.tracker.run_id
    nothing_in_place()
    assert MlflowClient(tracking_uri()).get_run(run_id).info.status == "FAILED"
