"""Shared fixtures: a real Prefect server for the session, and throw-away copies of the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import suppress
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


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, prefect_api) -> tuple[Path, subprocess.CompletedProcess]:
    """The smoke pipeline, run once per session as the Prefect flow (`python -m flows run`) in a fresh
    copy of the repo: (the copy, the command's output). test_pipeline inspects it, then reruns parts
    of it; test_team shares its outputs with other clones."""
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    first = run([sys.executable, "-m", "flows", "run", "--profile", "smoke"], repo)
    copy_reproduced(repo, tmp_path_factory.getbasetemp() / "reproduced")  # as it was, before any test
    return repo, first


def copy_reproduced(repo: Path, dest: Path) -> Path:
    """`repo` with its outputs, dvc.lock and DVC cache (run cache included), without its MLflow
    store or DVC's temporary files: a checkout where `dvc repro` has run, as a user's would be."""
    skipped = {repo / "mlflow.db", repo / ".dvc" / "tmp", repo / "checkpoints"}
    shutil.copytree(repo, dest, symlinks=True, ignore=lambda folder, names: [
        name for name in names if Path(folder) / name in skipped])
    return dest


@pytest.fixture
def reproduced(tmp_path, tmp_path_factory, pipeline) -> Path:
    """A copy of the session's smoke run as it was when it finished, with a store of its own: a test
    that changes params reruns only the stages they reach; the rest comes from DVC's cache."""
    return copy_reproduced(tmp_path_factory.getbasetemp() / "reproduced", tmp_path / "repo")


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
