"""Kills and failures: a `kill -9` of `dvc`, of the pipeline flow or of a lone stage leaves no
process running and nothing put in place, and a rerun picks up from the checkpoint; two runs of
one stage never share its checkpoint; the helpers meet in a private directory, check what they
read and survive bad requests; a Ctrl-C never leaves an import lock held; a failure is transient by
its exception types."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from runtime.server import free_port
from tests.conftest import BIN, REPO, processes_in, run

GONE_SECONDS = 20  # how long the processes of a killed run may take to notice


def start(args: list[str], cwd: Path, log: Path, **env: str | None) -> subprocess.Popen:
    """`run`'s environment, in the background, its output in `log`."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    full_env = {key: value for key, value in full_env.items() if value is not None}
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def wait_until_training(process: subprocess.Popen, repo: Path, log: Path) -> None:
    """Until the ssl stage has saved a resumable checkpoint."""
    deadline = time.time() + 900
    while not list((repo / "checkpoints" / "ssl").glob("*.pt")):
        assert process.poll() is None, f"exited {process.returncode} before training:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def running(processes) -> list[str]:
    """The command lines of those of `processes` still running (a zombie has ended)."""
    found = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(" ".join(process.cmdline()))
        except psutil.Error:
            pass
    return found


def kill_and_check_nothing_outlives(process: subprocess.Popen, repo: Path, helpers_key: str) -> None:
    """`kill -9` the process; within GONE_SECONDS nothing it started may run any more, nor any
    process in `repo`, and its helpers' files are gone; nothing is put in place afterwards."""
    from runtime.background import helpers_dir

    started = psutil.Process(process.pid).children(recursive=True)
    assert started, "the run had started nothing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + GONE_SECONDS

    def left() -> list[str]:
        files = [path.name for path in helpers_dir().glob(f"*-{helpers_key}-*")]
        return running([*started, *processes_in(repo)]) + files

    while left() and time.time() < deadline:
        time.sleep(0.5)
    assert not left(), left()
    time.sleep(2)  # an orphan would put the outputs in place when it finished
    assert not (repo / "artifacts" / "ssl").exists() and not (repo / "metrics" / "ssl.json").exists()
    assert list((repo / "checkpoints" / "ssl").glob("*.pt")), "the checkpoint was removed"


def rerun_resumes(repo: Path, **env: str | None) -> None:
    done = run(["dvc", "repro", "ssl"], repo, **env)
    assert "resuming from step" in done.stdout + done.stderr
    assert (repo / "artifacts" / "ssl" / "config.json").exists()
    assert not list((repo / "checkpoints" / "ssl").glob("*.pt"))


@pytest.fixture
def ssl_repo(repo_copy, tmp_path) -> Path:
    """The smoke profile with a checkpoint every few ssl steps, and no Prefect API configured."""
    run([sys.executable, "-m", "flows", "profile", "smoke", "--set", "ssl.train.checkpoint_every=4"], repo_copy)
    return repo_copy


NO_API = {"PREFECT_API_URL": None}


@pytest.mark.slow
def test_killing_dvc_stops_its_stage_and_a_rerun_resumes(ssl_repo, tmp_path):
    env = {**NO_API, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    dvc = start(["dvc", "repro", "ssl"], ssl_repo, log := tmp_path / "dvc.log", **env)
    wait_until_training(dvc, ssl_repo, log)
    kill_and_check_nothing_outlives(dvc, ssl_repo, str(dvc.pid))  # the stage, the host, the server
    rerun_resumes(ssl_repo, **env)


@pytest.mark.slow
def test_killing_the_pipeline_flow_stops_its_stages(ssl_repo, tmp_path):
    env = {**NO_API, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    flow = start([sys.executable, "-m", "flows", "run"], ssl_repo, log := tmp_path / "flow.log", **env)
    wait_until_training(flow, ssl_repo, log)
    kill_and_check_nothing_outlives(flow, ssl_repo, str(flow.pid))  # its dvc, the stage, both servers
    rerun_resumes(ssl_repo, **env)


@pytest.mark.slow
def test_killing_a_lone_stage_stops_its_prefect_server(ssl_repo, tmp_path, prefect_api):
    run([sys.executable, "-m", "flows.prepare"], ssl_repo)
    env = {
        **NO_API, "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",  # were Prefect's own to start, on busy cores
    }
    stage = start([sys.executable, "-m", "flows.ssl"], ssl_repo, log := tmp_path / "ssl.log", **env)
    wait_until_training(stage, ssl_repo, log)
    kill_and_check_nothing_outlives(stage, ssl_repo, str(stage.pid))
    assert "Starting temporary server" not in log.read_text()


@pytest.mark.slow
def test_a_second_run_of_a_running_stage_is_refused(repo_copy, monkeypatch):
    from runtime.stage_process import stage_lock

    monkeypatch.chdir(repo_copy)
    scratch = repo_copy / "artifacts" / ".ssl.tmp" / "being-written"
    scratch.parent.mkdir(parents=True)
    scratch.write_text("the running stage's")
    with stage_lock("ssl"):  # as a running `dvc repro ssl` holds it
        done = run([sys.executable, "-m", "flows.ssl"], repo_copy, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"stage 'ssl' is already running in {repo_copy}: PID {os.getpid()} " in done.stderr
    assert scratch.read_text() == "the running stage's"  # its temporary outputs untouched
    assert "Traceback" not in done.stderr


# --- the helpers' directory, their addresses and the stage host ---------------------------------

@pytest.fixture
def own_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_helpers_meet_in_a_private_directory(own_tmp):
    from runtime.background import UnsafeHelpersDir, helpers_dir

    made = helpers_dir()
    assert made.parent == own_tmp and made.stat().st_uid == os.getuid()
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    made.chmod(0o777)  # e.g. made by someone else, for everyone
    with pytest.raises(UnsafeHelpersDir, match=rf"{made} is not a private directory of yours \(drwxrwxrwx"):
        helpers_dir()
    made.rmdir()
    (elsewhere := own_tmp / "elsewhere").mkdir(mode=0o700)
    made.symlink_to(elsewhere)
    with pytest.raises(UnsafeHelpersDir, match="lrwx"):
        helpers_dir()


@pytest.mark.parametrize("args, one", [
    (["repro", "--force", "--single-item", "ssl"], True), (["repro", "-fs", "dvc.yaml:ssl"], True),
    (["repro", "ssl"], False), (["repro", "-s", "ssl", "probe"], False), (["repro", "-s", "--glob", "s*"], False),
    (["exp", "run", "-s", "ssl"], False),
])
def test_the_host_of_a_one_stage_run_skips_warming_the_other_stages(args, one):
    """A `dvc repro -s <stage>` asks for one stage only: its host imports no other stage's code
    while the `dvc` finishes; any other run (several stages, the pipeline flow) warms them."""
    from runtime.host import runs_one_stage
    from runtime.invocation import Invocation

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])  # a dvc's command line
    try:
        while not psutil.Process(process.pid).cmdline():  # /proc shows none for a moment as it starts
            time.sleep(0.01)
        assert runs_one_stage(Invocation.of(process.pid)) is one
    finally:
        process.kill()
        process.wait()
    assert runs_one_stage(Invocation(process.pid, 0.0)) is False  # gone: warm, as before


@pytest.mark.slow  # a Prefect server
def test_a_published_server_address_is_checked_before_use(tmp_path, prefect_api):
    from runtime.server import AUTH_ENV, Api, read_api

    address = tmp_path / "prefect.url"
    address.write_text(f"{prefect_api}\n{os.environ[AUTH_ENV]}\n")
    assert read_api(address) == Api(prefect_api, os.environ[AUTH_ENV])
    closed = free_port()  # nothing listens there
    for planted in ("http://attacker.example:4200/api", f"http://127.0.0.1:{closed}/api", "file:///etc/passwd"):
        address.write_text(planted)
        assert read_api(address) is None, planted


def _send(path: Path, payload: bytes, fds: list[int] | None) -> bytes:
    """One raw connection to the host: `payload` (with `fds` passed alongside), then its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        if fds is not None:
            socket.send_fds(conn, [payload[:8]], fds)
            payload = payload[8:]
        try:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(30)
            return conn.recv(8)
        except (BrokenPipeError, ConnectionResetError):  # dropped before the rest of the request was read
            return b""


def _framed(request: object) -> bytes:
    body = request if isinstance(request, bytes) else json.dumps(request).encode()
    return struct.pack("!Q", len(body)) + body


@pytest.mark.slow  # the host imports torch, Prefect and MLflow
def test_the_stage_host_survives_bad_requests(tmp_path, monkeypatch):
    from runtime.background import published, start_once, wait_for
    from runtime.host import STARTUP_SECONDS, run_on_host, socket_path
    from runtime.invocation import Invocation

    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    pipeline_run = subprocess.Popen(["sleep", "600"])  # what the host lives by, as by a dvc repro
    invocation = Invocation.of(pipeline_run.pid)
    try:
        monkeypatch.chdir(REPO)  # the host reads dvc.yaml's stages where it starts
        start_once("host", "runtime.host", invocation)
        assert wait_for("host", invocation, ".sock", STARTUP_SECONDS)
        path = socket_path(invocation)
        std = [0, 1, 2]
        good = {"stage": "prepare", "argv": [], "cwd": str(tmp_path), "env": {}}
        bad = [
            (b"", None),  # connects and hangs up
            (struct.pack("!Q", 1 << 62) + b"{}", std),  # an absurd length
            (_framed(b"{not json"), std),
            (_framed(b"\xff\xfe\x00"), std),  # not UTF-8
            (_framed(b"[" * 100_000 + b"]" * 100_000), std),  # nested past the recursion limit
            (_framed(good), None),  # no stdin/stdout/stderr passed
            (_framed(good), [0]),
            (_framed(["prepare"]), std),
            (_framed({**good, "stage": "../../tmp/evil"}), std),
            (_framed({**good, "argv": "prepare"}), std),
            (_framed({**good, "cwd": "relative"}), std),
            (_framed({**good, "env": {"A": 1}}), std),
            (_framed({**good, "extra": 1}), std),
        ]
        for payload, fds in bad:
            assert _send(path, payload, fds) == b"", payload[:40]  # dropped, nothing started
        monkeypatch.chdir(tmp_path)  # no params here: the stage fails with its message, exit 2
        assert run_on_host("prepare", [], invocation) == 2  # ...run by the host, still serving
        log = published("host", invocation, ".log").read_text()
        assert log.count("stage host: dropped a connection") == len(bad), log
        assert "which is not one of dvc.yaml's" in log and "1 file descriptors instead of 3" in log
    finally:
        pipeline_run.kill()
        pipeline_run.wait()
        for number, handler in handlers.items():  # run_on_host forwards them to its stage
            signal.signal(number, handler)
    deadline = time.time() + GONE_SECONDS
    while path.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not path.exists()  # the host went with its invocation
    published("host", invocation, ".log").unlink()


def test_a_helper_that_dies_before_it_publishes_is_not_waited_for(tmp_path):
    """A host or server that fails to start: its waiters go on at once (a stage then runs in a
    process of its own), rather than for the full startup time each; its log says why."""
    from runtime.background import published, start_once, wait_for
    from runtime.invocation import Invocation

    pipeline_run = subprocess.Popen(["sleep", "600"])
    invocation = Invocation.of(pipeline_run.pid)
    try:
        start_once("host", "runtime.no_such_module", invocation)
        assert not wait_for("host", invocation, ".sock", 600)
        assert not wait_for("host", invocation, ".sock", 600)  # a later stage of the same run too
        assert "No module named runtime.no_such_module" in published("host", invocation, ".log").read_text()
    finally:
        pipeline_run.kill()
        pipeline_run.wait()
        for suffix in (".log", ".started"):
            published("host", invocation, suffix).unlink(missing_ok=True)


def test_an_error_raised_while_handling_ctrl_c_is_left_out_of_the_run_logs():
    """Prefect's crash handling can fail on a Ctrl-C (`ValueError: Task run is not set`): the
    launcher says the stage was interrupted in one line, so that traceback is left out; other
    errors' stay."""
    import logging

    from runtime.logs import ReportedOnce

    def record_of(error: BaseException) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Crash detected!", None, sys.exc_info())

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("Task run is not set")  # noqa: B904 (as Prefect raises it, its context the interrupt)
    except ValueError as err:
        crashed = err
    once = ReportedOnce()
    assert not once.filter(record_of(crashed))
    assert once.filter(record_of(ValueError("a bug")))


@pytest.mark.parametrize("lock", ["import", "logging"])
def test_a_ctrl_c_inside_the_import_or_logging_machinery_is_taken_once_it_is_done(monkeypatch, lock):
    """Raised between importlib's (or logging's) taking its global lock and its `try`, a
    KeyboardInterrupt would leave the lock held, and the next import (log line) in another thread
    would wait forever (a stage's tracker did, in Ctrl-C tests: on each lock). The stage's handler
    lets the machinery finish and takes the Ctrl-C 10 ms later."""
    import _imp
    import logging

    from runtime import stage_process

    acquire, release = (_imp.acquire_lock, _imp.release_lock) if lock == "import" else (logging._lock.acquire, logging._lock.release)
    monkeypatch.setattr(stage_process, "STOPPED_BY", [])
    previous = signal.signal(signal.SIGINT, stage_process._stop)
    try:
        acquire()  # where the signal lands
        try:
            stage_process._stop(signal.SIGINT, None)
        except KeyboardInterrupt:
            pytest.fail(f"raised while the {lock} lock was held")
        finally:
            release()
        with pytest.raises(KeyboardInterrupt):
            time.sleep(5)  # the Ctrl-C comes again
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stage_process.STOPPED_BY == [signal.SIGINT]


def test_a_ctrl_c_that_python_drops_in_a_weakref_callback_comes_again(monkeypatch):
    """A KeyboardInterrupt raised inside a weakref callback (or `__del__`) is dropped by Python
    ("Exception ignored in ..."), and the stage would train on to its end (a Ctrl-C test's distill
    did). The stage's hook for dropped exceptions sends the signal again, raised where it then is."""
    import weakref

    from runtime import stage_process

    monkeypatch.setattr(stage_process, "STOPPED_BY", [])
    monkeypatch.setattr(sys, "unraisablehook", stage_process._stop_dropped)
    previous = signal.signal(signal.SIGINT, stage_process._stop)

    class Held:
        pass

    held = Held()
    reference = weakref.ref(held, lambda _: stage_process._stop(signal.SIGINT, None))  # where the signal lands
    try:
        with pytest.raises(KeyboardInterrupt):
            del held  # Python drops the callback's KeyboardInterrupt...
            time.sleep(5)  # ...and the Ctrl-C comes again
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reference() is None and stage_process.STOPPED_BY == [signal.SIGINT, signal.SIGINT]


# --- transient failures --------------------------------------------------------------------------

def test_a_failure_is_transient_by_its_exception_types(monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from runtime.failures import is_transient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    closed = free_port()  # nothing listens there
    with pytest.raises(MlflowException) as unreachable:
        MlflowClient(f"http://127.0.0.1:{closed}").get_experiment_by_name("latentlab")
    assert is_transient(unreachable.value)
    assert not is_transient(MlflowException("Max retries exceeded: Connection refused"))  # words, not a network error
    assert not is_transient(ValueError("Connection refused"))
