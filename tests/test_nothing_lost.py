"""Nothing lost, through the user's door (`dvc repro` in a copy of the smoke run): DVC's run cache holds
every stage run and restores instead of recomputing; whatever ends a stage (Ctrl-C, SIGTERM, a
`kill -9` of its `dvc`, a tracking server that dies, a full disk) its last good metrics, plots and
artifacts stay in place, it says so in one line, and no MLflow run stays RUNNING."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest
import yaml

from runtime.server import free_port
from tests.conftest import copy_reproduced, empty_store, run, run_env, wait_or_show_stacks

pytestmark = pytest.mark.slow

SSL_OUTPUTS = ("metrics/ssl.json", "plots/ssl", "artifacts/ssl")
PREPARE_OUTPUTS = ("metrics/prepare.json", "plots/prepare", "artifacts/prepare")
PUT_BACK_SECONDS = 60  # after its `dvc` is gone, the stage's launcher puts the outputs back on its own


def snapshot(repo: Path, *paths: str) -> dict[str, bytes]:
    """{file: bytes} of every file under `paths` (files or folders)."""
    files = [f for p in paths for f in ([repo / p] if (repo / p).is_file() else sorted((repo / p).rglob("*")))]
    return {str(f.relative_to(repo)): f.read_bytes() for f in files if f.is_file()}


@pytest.fixture
def own_store(tmp_path, monkeypatch) -> str:
    """The tracking store the test's commands write to, and it reads."""
    uri = empty_store(tmp_path / "mlflow.db")  # made here: the test's polling never migrates it beside a stage
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def store(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def runs(client, where: str = "") -> list:
    experiment = client.get_experiment_by_name("latentlab")
    return client.search_runs([experiment.experiment_id], where, max_results=1000) if experiment else []


def restore(repo: Path, files: dict[str, bytes], lock: str) -> None:
    """Put back `files` (a `snapshot`) and dvc.lock as they were."""
    for name, data in files.items():
        (repo / name).write_bytes(data)
    (repo / "dvc.lock").write_text(lock)


STARTED: list[subprocess.Popen] = []


def as_a_terminal_runs_it() -> None:
    """Ctrl-C at its default, as in a terminal's foreground job, even where the tests were started
    with it ignored (`cmd &` in a script without job control; Python then never raises
    KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], repo: Path, log: Path, **env: str | None) -> subprocess.Popen:
    """A command in a session of its own (as a terminal would run it), its output in `log`."""
    with open(log, "w") as out:
        STARTED.append(subprocess.Popen(args, cwd=repo, env=run_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=as_a_terminal_runs_it))
    return STARTED[-1]


@pytest.fixture(autouse=True)
def none_left_running():
    """A test that fails half-way leaves no `dvc repro` running in its copy of the smoke run."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until_training(process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600
    while "ssl/simclr:" not in log.read_text():
        assert process.poll() is None, f"exited {process.returncode} before training:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(0.5)  # a few steps in (the smoke ssl trains for ~2 s on a quiet machine)


def wait_for(condition, seconds: float = PUT_BACK_SECONDS) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.5)
    return condition()


def test_every_stage_run_is_in_dvc_run_cache(smoke_snapshot):
    repo = smoke_snapshot
    entries = {entry.parent.name for entry in (repo / ".dvc" / "cache" / "runs").glob("*/*/*") if entry.is_file()}
    assert len(entries) >= len(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]) == 12


def test_a_param_changed_and_changed_back_is_restored_from_the_run_cache(reproduced, own_store):
    repo = reproduced
    outputs = ("metrics/probe.json", "plots/probe", "artifacts/probe")
    first, params = snapshot(repo, *outputs), repo / "params" / "probe.yaml"
    good = params.read_text()
    try:
        params.write_text(good.replace("knn_k: 20", "knn_k: 7"))
        assert "Running stage 'probe'" in run(["dvc", "repro", "probe"], repo).stdout
        assert snapshot(repo, *outputs) != first
    finally:
        params.write_text(good)
    probe_runs = len(runs(store(own_store), "tags.stage = 'probe'"))
    back = run(["dvc", "repro", "probe"], repo)
    assert "Stage 'probe' is cached - skipping run, checking out outputs" in back.stdout, back.stdout
    assert "Running stage 'probe'" not in back.stdout
    assert snapshot(repo, *outputs) == first
    assert len(runs(store(own_store), "tags.stage = 'probe'")) == probe_runs  # nothing trained, nothing tracked
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}


def test_outputs_a_stopped_stage_put_in_place_before_its_dvc_recorded_them_are_put_back(reproduced, monkeypatch):
    """A stage stopped after putting its outputs in place, before its `dvc` wrote dvc.lock (a Ctrl-C
    test's fast ssl finished in that window): its launcher puts back what dvc.lock records, so
    "nothing was changed" holds and `dvc status` is clean."""
    from runtime.outcome import put_back

    repo = reproduced
    before = snapshot(repo, *SSL_OUTPUTS)
    (repo / "metrics" / "ssl.json").write_text('{"wall_seconds": 1.0}')
    (repo / "artifacts" / "ssl" / "stray.bin").write_bytes(b"from the run dvc never recorded")
    monkeypatch.chdir(repo)
    assert sorted(put_back("ssl")) == ["artifacts/ssl", "metrics/ssl.json"]
    assert snapshot(repo, *SSL_OUTPUTS) == before
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}
    assert put_back("ssl") == []  # what matches dvc.lock stays as it is


@pytest.mark.parametrize(
    "sig, to, says",
    [
        (signal.SIGINT, "group", "stage 'ssl' was interrupted (SIGINT, Ctrl-C): nothing was changed"),
        (signal.SIGTERM, "group", "stage 'ssl' was stopped"),  # (SIGTERM), or its dvc gone: whichever is seen first
        (signal.SIGKILL, "dvc", "stage 'ssl' was stopped: the `dvc` (or pipeline flow) it ran under is gone"),
        (signal.SIGKILL, "stage", "stage 'ssl' was killed (SIGKILL: `kill -9`, or the kernel's out-of-memory killer)"),
    ],
    ids=["ctrl-c", "sigterm", "kill-9-dvc", "kill-9-stage"],
)
def test_an_interrupted_stage_keeps_its_last_good_outputs_and_says_so_once(reproduced, tmp_path, own_store, sig, to, says):
    """Ctrl-C reaches the whole process group; `kill` and `kill -9` reach `dvc`, which dies at once
    (DVC handles neither), and the stage's launcher, seeing it gone, stops the stage and puts back."""
    repo = reproduced
    before, lock = snapshot(repo, *SSL_OUTPUTS), (repo / "dvc.lock").read_text()
    dvc = start(["dvc", "repro", "--force", "--single-item", "ssl"], repo, log := tmp_path / "dvc.log")
    assert wait_for(lambda: dvc.poll() is not None or runs(store(own_store), "tags.stage = 'ssl'"), 600)  # its MLflow run has started...
    wait_until_training(dvc, log)  # ...and its training (or it says why not): stopped there, not after
    if to == "group":
        os.killpg(dvc.pid, sig)
    elif to == "dvc":
        dvc.send_signal(sig)
    else:  # the stage's own process, as the out-of-memory killer would: it holds the stage's lock
        holder = (repo / "checkpoints" / ".ssl.lock").read_text()
        os.kill(int(holder.split()[1]), sig)
    wait_or_show_stacks(dvc, repo, 120)
    assert wait_for(lambda: says in log.read_text()), log.read_text()[-3000:]
    assert wait_for(lambda: snapshot(repo, *SSL_OUTPUTS) == before), sorted(snapshot(repo, *SSL_OUTPUTS))
    text = log.read_text()
    assert text.count(says) == 1 and "Traceback" not in text, text[-3000:]
    assert (repo / "dvc.lock").read_text() == lock
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}

    client = store(own_store)
    newest = max(runs(client, "tags.stage = 'ssl'"), key=lambda r: r.info.start_time)
    if sig == signal.SIGINT:  # a stage with a chance ends its run itself
        assert wait_for(lambda: client.get_run(newest.info.run_id).info.status == "KILLED", 30)
    prepare, lock = snapshot(repo, *PREPARE_OUTPUTS), (repo / "dvc.lock").read_text()
    run(["dvc", "repro", "--force", "--single-item", "prepare"], repo)  # the next start ends what was left
    restore(repo, prepare, lock)  # as the shared run's other tests expect it
    assert [r.data.tags.get("stage", r.info.run_name) for r in runs(client, "attributes.status = 'RUNNING'")] == []
    assert client.get_run(newest.info.run_id).info.status == "KILLED"


def test_ctrl_c_in_every_stage_keeps_its_last_good_outputs(reproduced, tmp_path, own_store):
    """Ctrl-C as each stage's flow run begins, prepare to fid: N/N interrupted with one line,
    their outputs as they were, dvc.lock unchanged."""
    repo = reproduced
    order = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    lock, survived = (repo / "dvc.lock").read_text(), []
    for stage in order:
        outputs = (f"metrics/{stage}.json", f"plots/{stage}", f"artifacts/{stage}")
        before = snapshot(repo, *outputs)
        dvc = start(["dvc", "repro", "--force", "--single-item", stage], repo, log := tmp_path / f"{stage}.log")
        deadline = time.monotonic() + 300
        while "Beginning flow run" not in log.read_text() and dvc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(dvc.pid, signal.SIGINT)
        wait_or_show_stacks(dvc, repo, 300)
        text = log.read_text()
        says = f"stage '{stage}' was interrupted (SIGINT, Ctrl-C): nothing was changed"
        if text.count(says) == 1 and "Traceback" not in text and snapshot(repo, *outputs) == before:
            survived.append(stage)
        else:
            print(f"{stage}: {text[-2000:]}")
    print(f"Ctrl-C survived with a clear message: {len(survived)}/{len(order)}")  # the note's figure
    assert survived == order
    assert (repo / "dvc.lock").read_text() == lock


def mlflow_server(folder: Path, port: int, log: Path) -> subprocess.Popen:
    from runtime.team import MLFLOW_SERVER_ENV, mlflow_server_command

    folder.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        server = subprocess.Popen(mlflow_server_command(folder, port), env=run_env(**MLFLOW_SERVER_ENV),
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    import requests

    def answers() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok
        except requests.RequestException:
            return False

    assert wait_for(answers, 120), log.read_text()[-2000:]
    return server


def test_a_tracking_server_that_dies_mid_stage_costs_seconds_and_loses_nothing(reproduced, tmp_path):
    repo = reproduced
    before, lock = snapshot(repo, *SSL_OUTPUTS), (repo / "dvc.lock").read_text()
    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "ssl.train.epochs=100"], repo)  # long enough to die in
    port = free_port()
    server = mlflow_server(tmp_path / "mlflow", port, tmp_path / "mlflow.log")
    try:
        uri = f"http://127.0.0.1:{port}"
        dvc = start(["dvc", "repro", "--force", "--single-item", "ssl"], repo, log := tmp_path / "dvc.log",
                    MLFLOW_TRACKING_URI=uri)
        wait_until_training(dvc, log)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    killed = time.monotonic()
    dvc.wait(timeout=600)
    print(f"the stage ended {time.monotonic() - killed:.1f} s after its tracking server died")  # the note's figure
    text = log.read_text()
    assert dvc.returncode != 0
    assert "stage 'ssl' trains on without sending metrics" in text, text[-3000:]
    assert f"the MLflow tracking server {uri} stopped answering while the stage ran" in text, text[-3000:]
    assert "stage 'ssl' failed: nothing was changed, its last good outputs are in place" in text
    assert snapshot(repo, *SSL_OUTPUTS) == before
    assert (repo / "dvc.lock").read_text() == lock


def test_a_tracking_server_that_dies_as_the_stage_ends_puts_nothing_in_place(in_tmp, tmp_path, monkeypatch):
    """After the last step, before the outputs go in place: the stage's records are all sent first,
    so it fails with nothing changed (it used to put its outputs in place, then fail)."""
    from runtime.stage import StageRun
    from runtime.tracking import TrackingUnreachable
    from tasks.params import load_params

    (in_tmp / "params").mkdir()
    (in_tmp / "params" / "probe.yaml").write_text("knn_k: 20\n")
    (in_tmp / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"probe": {"cmd": "true", "outs": ["artifacts/probe"]}}}))
    server = mlflow_server(tmp_path / "mlflow", port := free_port(), tmp_path / "mlflow.log")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri := f"http://127.0.0.1:{port}")
    said = f"the MLflow tracking server {uri} stopped answering"
    with pytest.raises(TrackingUnreachable, match=said), StageRun("probe", load_params("probe")) as stage:
        (stage.outputs.artifacts / "report.json").write_text("{}")
        stage.metrics["probe_top1"] = 0.5
        assert stage.tracker.run_id  # its MLflow run started
        os.killpg(server.pid, signal.SIGKILL)  # its last step done
        server.wait()
    assert not any((in_tmp / folder).exists() for folder in ("artifacts/probe", "plots/probe", "metrics/probe.json"))


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MiB tmpfs (root only: CI runs as root), unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_named_with_its_folder_and_loses_nothing(small_disk, smoke_snapshot):
    repo = copy_reproduced(smoke_snapshot, small_disk / "repo")
    before, lock = snapshot(repo, *SSL_OUTPUTS), (repo / "dvc.lock").read_text()
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - (256 << 10)))  # a quarter MiB left
    done = run(["dvc", "repro", "--force", "--single-item", "ssl"], repo, check=False)
    (small_disk / "filler").unlink()
    assert done.returncode != 0
    assert f"No space left on device in {small_disk.resolve()}" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert snapshot(repo, *SSL_OUTPUTS) == before
    assert (repo / "dvc.lock").read_text() == lock
