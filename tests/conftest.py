"""Shared fixtures: a real Prefect server for the session, and throw-away copies of the repo."""

from __future__ import annotations

import atexit
import fcntl
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from runtime.env import PARENT_RUN_ENV

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "datasets" / "mnist"
BIN = Path(sys.executable).parent

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
for leaking in ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV):  # tests use their own stores
    os.environ.pop(leaking, None)
if (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    # tests in parallel (pytest-xdist): torch's threads of one would spin at barriers while the
    # cores run the other's; each worker and the stages it starts get a share of the cores
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


FILE_ORDER = [
    "test_pipeline.py",  # runs the session's smoke run, whose outputs later files copy (`smoke_snapshot`)
    "test_kill_and_recover.py",  # beside it on another worker: it needs none of it
    "test_nothing_lost.py", "test_bad_inputs.py", "test_team.py", "test_deployment.py", "test_orchestration.py",
    "test_vae_regularisers.py", "test_edm.py", "test_generative_stages.py", "test_ddp.py", "test_sweep.py",
    "test_generative_models.py", "test_bench.py", "test_dvc_deps.py", "test_prepare.py", "test_ssl_models.py",
]
"""The test files that run pipelines, longest first, then the fast loop's longest (`-m "not slow"`);
the rest follow in their own order. With `--dist loadfile --no-loadscope-reorder` each worker takes
the next file as it runs short, so the workers end together, and no worker waits on the smoke run
that another one is making."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(FILE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FILE_ORDER)))


@pytest.fixture(autouse=True)
def tracking_uri_kept():
    """`mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI in this process's environment: a test
    that tracks in-process would send every later test's stage processes to its store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: on shared cores a second thread mostly waits on the first at
    every barrier (one thread was twice as fast here). Restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """A `prefect server start` on a free port for the whole session (~4 s), stopped at the end;
    this process and what it starts send its auth string."""
    from runtime.server import prefect_server, use_api

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.pop("PREFECT_API_URL", None)
    with prefect_server() as api:
        use_api(api)
        yield api.url


def copy_repo(dest: Path) -> Path:
    """The repo's tracked and not-ignored files, as a fresh git + DVC checkout at `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not name.startswith(("artifacts/", "metrics/", "plots/", "checkpoints/")):
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for name in ("dvc.lock",):
        (dest / name).unlink(missing_ok=True)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def processes_in(repo: Path) -> list:
    """Processes (psutil) whose working directory is in `repo`: a run's, the stage host included."""
    import psutil

    found = []
    for process in psutil.process_iter(["cwd"]):
        if process.info["cwd"] and Path(process.info["cwd"]).is_relative_to(repo):
            found.append(process)
    return found


def wait_or_show_stacks(process: subprocess.Popen, repo: Path, seconds: float) -> int:
    """`process.wait(seconds)`; past that, fail with the Python stacks (py-spy) of it, what it
    started and every process in `repo`: where a hung run waits."""
    import psutil

    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        stuck = {process.pid, *(p.pid for p in processes_in(repo))}
        with suppress(psutil.Error):
            stuck.update(p.pid for p in psutil.Process(process.pid).children(recursive=True))
        dumps = [subprocess.run([str(BIN / "py-spy"), "dump", "--pid", str(pid)], capture_output=True, text=True)
                 for pid in sorted(stuck)]
        raise AssertionError(f"{process.args} still running after {seconds} s; its processes' stacks:\n"
                             + "\n".join(dump.stdout + dump.stderr for dump in dumps)) from None


def run_env(**env: str | None) -> dict[str, str]:
    """The environment of the project's commands: this one with the venv first on PATH and `env`
    on top (a value of None removes that variable)."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    return {key: value for key, value in full_env.items() if value is not None}


def run(args: list[str], cwd: Path, check: bool = True, **env: str | None) -> subprocess.CompletedProcess:
    """Run a command of the project's environment in `cwd`, with its output captured; an `env`
    value of None removes that variable."""
    done = subprocess.run(args, cwd=cwd, env=run_env(**env), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def shared_tmp(tmp_path_factory) -> Path:
    """The session's temporary folder that every pytest-xdist worker shares (each has its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def held(lock: Path) -> Iterator[None]:
    """An exclusive lock on the file `lock` (created if need be), shared by the session's workers."""
    with open(lock, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, prefect_api) -> tuple[Path, subprocess.CompletedProcess]:
    """The smoke pipeline run as the Prefect flow (`python -m flows run`) in a fresh copy of the repo:
    (the copy, the command's output). test_pipeline inspects it (its Prefect records are on this
    worker's server), then reruns parts of it. The session's first such run is also `smoke_snapshot`."""
    return _smoke_run_for_the_snapshot(tmp_path_factory) or _smoke_run(tmp_path_factory)


@pytest.fixture(scope="session")
def smoke_snapshot(tmp_path_factory, prefect_api) -> Path:
    """The session's smoke run as it finished (outputs, dvc.lock, DVC cache with its run cache), one
    for all the workers: read it, or copy it (`reproduced`) to change it. Made by the first worker
    that needs it (FILE_ORDER gives test_pipeline.py that task); the others wait for it."""
    _smoke_run_for_the_snapshot(tmp_path_factory)
    return _snapshot_path(tmp_path_factory)


def _snapshot_path(tmp_path_factory) -> Path:
    return shared_tmp(tmp_path_factory) / "reproduced"


def _smoke_run_for_the_snapshot(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess] | None:
    """A smoke run whose outputs become `smoke_snapshot` when the session has none yet (None when it
    has: made by another worker, which holds the lock meanwhile)."""
    snapshot = _snapshot_path(tmp_path_factory)
    with held(snapshot.with_suffix(".lock")):
        if snapshot.exists():
            return None
        repo, first = _smoke_run(tmp_path_factory)
        copy_reproduced(repo, snapshot.with_suffix(".part")).rename(snapshot)  # as it was, before any test
        return repo, first


def _smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    return repo, run([sys.executable, "-m", "flows", "run", "--profile", "smoke"], repo)


def copy_reproduced(repo: Path, dest: Path) -> Path:
    """`repo` with its outputs, dvc.lock and DVC cache (run cache included), with an empty MLflow
    store of its own and without DVC's temporary files: a checkout where `dvc repro` has run, as a
    user's would be."""
    skipped = {repo / "mlflow.db", repo / ".dvc" / "tmp", repo / "checkpoints"}
    shutil.copytree(repo, dest, symlinks=True, ignore=lambda folder, names: [
        name for name in names if Path(folder) / name in skipped])
    empty_store(dest / "mlflow.db")
    return dest


@functools.cache
def _empty_store() -> Path:
    from mlflow import MlflowClient

    path = Path(tempfile.mkdtemp(prefix="mlflow-store-")) / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates its tables
    atexit.register(shutil.rmtree, path.parent, ignore_errors=True)
    return path


def empty_store(path: Path) -> str:
    """An empty MLflow SQLite store at `path`, its tracking URI: a copy of one made once per process,
    instead of the ~2 s of schema migrations a new store costs the first stage that opens it (the
    session's first smoke run still makes its own, as a user's first run does)."""
    shutil.copyfile(_empty_store(), path)
    return f"sqlite:///{path}"


@pytest.fixture
def reproduced(tmp_path, smoke_snapshot) -> Path:
    """A copy of the session's smoke run as it was when it finished, with a store of its own: a test
    that changes params reruns only the stages they reach; the rest comes from DVC's cache."""
    return copy_reproduced(smoke_snapshot, tmp_path / "repo")


@pytest.fixture
def repo_copy(tmp_path, prefect_api) -> Path:
    """A fresh copy of the repo on the smoke profile, with its own MLflow store."""
    dest = copy_repo(tmp_path / "repo")
    run([sys.executable, "-m", "flows", "profile", "smoke"], dest)
    return dest


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run a test from an empty working directory (stage paths are relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
