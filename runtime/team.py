"""The team set-up: the shared services a lab runs (a Prefect server with a work pool and the
pipeline's deployment, an MLflow tracking server, a DVC remote), the workers that run deployments
in their machine's checkout, and pushing a checkout's results so others skip what it ran.

`up` starts all of it on this machine for a try-out, its pids, logs and stores under a per-user
state directory; `down` stops it. On real hosts the same pieces are started by hand (README,
"Team set-up"); `deploy`, `worker` and `push` are the parts every machine uses either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.env import CHECKOUT_ENV
from runtime.server import healthy, server_command
from tasks.errors import StageError

POOL = "latentlab"  # prefect.yaml's work pool
POOL_CONCURRENCY = 1  # one pipeline run at a time: two would train on one GPU and share one checkout
REMOTE = "team"  # the DVC remote `up` configures
HOST = "127.0.0.1"  # the try-out's servers answer this machine only
STARTUP_SECONDS = 300  # a server's first start migrates its database: minutes on a loaded machine
STOP_SECONDS = 30


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "latentlab" / "team"


@dataclass(frozen=True)
class Services:
    """Where `up` keeps everything: pids and logs, the servers' stores, the DVC remote."""

    state: Path

    @property
    def record(self) -> Path:
        return self.state / "services.json"

    @property
    def env_file(self) -> Path:
        return self.state / "env.sh"

    @property
    def remote(self) -> Path:
        return self.state / "dvc-remote"

    def log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def running(self) -> dict[str, dict]:
        """{service: {pid, started, url}} of the recorded services that are still alive."""
        if not self.record.exists():
            return {}
        return {name: entry for name, entry in json.loads(self.record.read_text()).items() if _alive(entry)}


def mlflow_server_command(store: Path, port: int, host: str = HOST) -> list[str]:
    """An MLflow tracking server on `host` (this machine only by default: it has no authentication)
    with its own SQLite store (runs and the model registry) and its own artifact root, artifacts
    proxied through it (`mlflow-artifacts:/`), so clients need no access to the artifact store."""
    return [
        sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(store / "artifacts"),
    ]


MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # GenAI job runners: nothing here uses them


def worker_command(pool: str = POOL) -> list[str]:
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--limit", str(POOL_CONCURRENCY)]


def checkout_root() -> Path:
    """The checkout this command runs in (a worker runs its flow runs there)."""
    root = Path.cwd()
    if not (root / "dvc.yaml").exists() or not (root / "prefect.yaml").exists():
        raise StageError(f"{root} is not a latentlab checkout (no dvc.yaml and prefect.yaml): run this from the repo root")
    return root


def _configured_api() -> str:
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    if not api_url:
        raise StageError(
            "no Prefect server configured: export PREFECT_API_URL=http://<prefect host>:4200/api\n"
            "  (`python -m flows team up` prints it for a local try-out)"
        )
    return api_url


# --- the parts every machine uses ----------------------------------------------------------------

def deploy(pool: str = POOL) -> None:
    """Create the process work pool (limit 1) on the configured Prefect server if it is not there,
    then register prefect.yaml's deployments with `prefect deploy`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    root = checkout_root()
    api_url = _configured_api()
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=POOL_CONCURRENCY))
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", concurrency_limit=POOL_CONCURRENCY))
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=root,
        env={**os.environ, "PREFECT_API_URL": api_url}, capture_output=True, text=True,
    )
    if done.returncode:
        raise StageError(f"prefect deploy failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    print(f"work pool '{pool}' (process, concurrency limit {POOL_CONCURRENCY}) and deployment pipeline/team on {api_url}")


def worker_env(root: Path) -> dict[str, str]:
    return {**os.environ, CHECKOUT_ENV: str(root), "PREFECT_API_URL": _configured_api()}


def worker(pool: str = POOL) -> None:
    """Become a worker of `pool` that runs flow runs in this checkout, one at a time."""
    env = worker_env(checkout_root())
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        print("note: MLFLOW_TRACKING_URI is not set: this worker's runs are tracked in this checkout's mlflow.db")
    os.execve(sys.executable, worker_command(pool), env)


def push(remote: str | None = None) -> None:
    """`dvc push` (the workspace's outputs and the run cache), plus what DVC 3 leaves out: the
    outputs of the run-cache entries that are not in dvc.lock's DVC cache (the `cache: false`
    metrics and plots, and the outputs of earlier runs), without which another clone's
    `dvc repro --pull` cannot restore a stage from the run cache and reruns it."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    with Repo() as repo:
        try:
            pushed = repo.push(remote=remote, run_cache=True)
        except NoRemoteError as err:
            raise StageError(str(err)) from None
        runs = Path(repo.cache.legacy.path) / "runs"  # runs/<key[:2]>/<key>/<value>
        entries = [(value.parent.name, value.name) for value in runs.glob("*/*/*")]
        used = repo.stage_cache.get_used_objs(entries)
        result = repo.cloud.push(set().union(*used.values()), remote=remote)
    print(f"pushed {pushed + len(result.transferred)} files, {len(entries)} run-cache entries")
    if result.failed:
        print(f"{len(result.failed)} outputs of older run-cache entries are no longer in this cache: those stages rerun elsewhere")


# --- the try-out: all services on this machine ------------------------------------------------------

def add_remote(root: Path, url: str) -> None:
    """Make `url` the default DVC remote of the checkout at `root` (in .dvc/config.local), with
    `verify true`: DVC hashes what it pulls, so an object changed on the remote is refused."""
    for args in (["add", "--local", "--default", "--force", REMOTE, url], ["modify", "--local", REMOTE, "verify", "true"]):
        subprocess.run([sys.executable, "-m", "dvc", "remote", *args], cwd=root, check=True, capture_output=True)


def up(state: Path, prefect_port: int = 4200, mlflow_port: int = 5000, mlflow_host: str = HOST) -> None:
    """Start a Prefect server, an MLflow server (on `mlflow_host`) and a worker of this checkout,
    create the work pool and the deployment, and point this checkout's DVC at a remote directory
    (`add_remote`); print the exports."""
    from runtime.server import Api, use_api

    services = Services(state)
    root = checkout_root()
    if running := services.running():
        raise StageError(f"already up ({', '.join(running)}; state in {state}): `python -m flows team down` first")
    for port in (prefect_port, mlflow_port):
        _check_free(port)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)
    (state / "logs").mkdir(exist_ok=True)
    record: dict[str, dict] = {}

    def start(name: str, argv: list[str], env: dict[str, str], url: str) -> None:
        record[name] = {**_start(argv, env, services.log(name), cwd=root), "url": url}
        services.record.write_text(json.dumps(record, indent=2))
        _wait_healthy(name, url, record[name]["pid"], services.log(name))

    prefect_url = f"http://{HOST}:{prefect_port}/api"
    mlflow_url = f"http://{HOST}:{mlflow_port}"
    plain = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    try:
        start("prefect", server_command(prefect_port),
              {**plain, "PREFECT_HOME": str(state / "prefect"), "PREFECT_UI_API_URL": prefect_url}, prefect_url)
        start("mlflow", mlflow_server_command(state / "mlflow", mlflow_port, mlflow_host), {**plain, **MLFLOW_SERVER_ENV},
              mlflow_url)
        use_api(Api(prefect_url))
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_url
        deploy()
        record["worker"] = _start(worker_command(), worker_env(root), services.log("worker"), cwd=root)
        services.record.write_text(json.dumps(record, indent=2))
        _wait_for_worker(record["worker"]["pid"], services.log("worker"))
    except BaseException:
        down(state, quiet=True)
        raise
    services.remote.mkdir(exist_ok=True)
    add_remote(root, str(services.remote))
    services.env_file.write_text(f"export PREFECT_API_URL={prefect_url}\nexport MLFLOW_TRACKING_URI={mlflow_url}\n")
    print(f"""team services are up (pids, logs and stores in {state}):
  Prefect   {prefect_url.removesuffix('/api')}   server; work pool '{POOL}' (limit {POOL_CONCURRENCY}), deployment pipeline/team
  MLflow    {mlflow_url}   tracking server, model registry, artifacts proxied; listening on {mlflow_host}, no authentication
  worker    pid {record['worker']['pid']}, runs pipeline/team's flow runs in {root}
  DVC       remote '{REMOTE}' = {services.remote} (default, verify true, in .dvc/config.local)

In every shell that should use them:
  export PREFECT_API_URL={prefect_url}
  export MLFLOW_TRACKING_URI={mlflow_url}
  (or: source {services.env_file})
then e.g.: prefect deployment run pipeline/team -p profile=smoke; python -m flows compare
stop:      python -m flows team down""")


def down(state: Path, quiet: bool = False) -> None:
    """Stop what `up` started (the worker first, then the servers); their stores stay."""
    services = Services(state)
    running = services.running()
    stopped = [name for name in ("worker", "mlflow", "prefect") if name in running]
    for name in stopped:
        stop_session(running[name]["pid"])
    services.record.unlink(missing_ok=True)
    if not quiet:
        print(f"stopped {', '.join(stopped) or 'nothing (nothing was running)'}; the stores stay in {state}")


# --- processes ----------------------------------------------------------------------------------

def _check_free(port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            raise StageError(f"port {port} on {HOST} is taken: choose another (--prefect-port, --mlflow-port)") from None


def _start(argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> dict:
    """Start `argv` in a session of its own (so `down` can stop it and its children), output to `log`."""
    import psutil

    with open(log, "ab") as out:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return {"pid": process.pid, "started": psutil.Process(process.pid).create_time()}


def _alive(entry: dict) -> bool:
    import psutil

    try:
        return psutil.Process(entry["pid"]).create_time() == entry["started"]  # not a reused pid
    except psutil.Error:
        return False


def _failed(name: str, log: Path, why: str) -> StageError:
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""
    return StageError(f"{name} {why}; the end of {log}:\n{tail}")


def _exited(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _wait_healthy(name: str, url: str, pid: int, log: Path) -> None:
    """Until `<url>/health` answers (Prefect's API and MLflow's server both have one)."""
    deadline = time.time() + STARTUP_SECONDS
    while not healthy(url):
        if _exited(pid):
            raise _failed(name, log, "exited")
        if time.time() > deadline:
            raise _failed(name, log, f"did not answer at {url} within {STARTUP_SECONDS} s")
        time.sleep(0.5)


def _wait_for_worker(pid: int, log: Path) -> None:
    """Until the worker has told the server it is online (its first heartbeat)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
    deadline = time.time() + STARTUP_SECONDS
    with get_client(sync_client=True) as client:
        while not client.read_workers_for_work_pool(POOL, worker_filter=online):
            if _exited(pid):
                raise _failed("worker", log, "exited")
            if time.time() > deadline:
                raise _failed("worker", log, f"was not online within {STARTUP_SECONDS} s")
            time.sleep(1)


def stop_session(pid: int) -> None:
    """SIGTERM to the process's session (a worker then stops taking runs), SIGKILL to whatever of it
    is left after STOP_SECONDS."""
    import psutil

    try:
        leader = psutil.Process(pid)
        members = [leader, *leader.children(recursive=True)]
        os.killpg(pid, signal.SIGTERM)
    except (psutil.Error, ProcessLookupError):
        return
    _, left = psutil.wait_procs(members, timeout=STOP_SECONDS)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
