"""The team set-up on one machine: `team up` (a Prefect server with the work pool and deployment,
an MLflow tracking server, a worker) that two clones track into, then `team down`; and, from the
session's smoke pipeline run (clone A), a DVC remote a second clone pulls every output from, the
run cache a third clone restores every stage from, and a worker in the second clone that runs
deployment runs of the pipeline one at a time."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from runtime.dag import stages
from runtime.server import answers, free_port
from runtime.team import POOL, REMOTE, Services, add_remote, stop_session
from tests.conftest import copy_repo, copy_reproduced, run, run_env

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
FLOW_RUN_SECONDS = 900


def exports(env_file: Path) -> dict[str, str]:
    """The `export KEY=VALUE` lines of `team up`'s env.sh."""
    return dict(line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines())


def clone(source: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(source), str(dest)], check=True)
    return dest


def metrics_shown(repo: Path) -> dict:
    return json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)[""]["data"]


@pytest.mark.slow  # `python -m flows team`
def test_team_commands_say_what_they_need_and_start_nothing_without_it(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    team = [sys.executable, "-m", "flows", "team"]
    done = run([*team, "worker"], tmp_path, check=False)
    assert done.returncode == 2 and "is not a latentlab checkout" in done.stderr, done.stderr
    done = run([*team, "deploy"], repo, check=False, PREFECT_API_URL=None)
    assert done.returncode == 2 and "export PREFECT_API_URL=" in done.stderr, done.stderr
    done = run([*team, "push"], repo, check=False)
    assert done.returncode == 2 and "no remote" in done.stderr.lower(), done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = [*team, "up", "--state", str(tmp_path / "state"), "--prefect-port", str(free_port()), "--mlflow-port", str(port)]
        done = run(up, repo, check=False)
    assert done.returncode == 2 and f"port {port} on 127.0.0.1 is taken" in done.stderr, done.stderr
    assert not (tmp_path / "state" / "services.json").exists()


@pytest.mark.slow  # dvc push and pull
def test_an_object_tampered_with_on_the_team_remote_is_refused_by_a_pull(tmp_path):
    """`team up`'s remote has `verify true`: a fresh clone pulling an output whose object was changed
    on the remote fails naming it; without verify DVC would check the changed file out."""
    first, remote = tmp_path / "first", tmp_path / "remote"
    subprocess.run(["git", "init", "-q", str(first)], check=True)
    run(["dvc", "init", "-q"], first)
    (first / "artifacts" / "vae").mkdir(parents=True)
    (first / "artifacts" / "vae" / "latents.json").write_text('{"num_classes": 10}')
    (first / "artifacts" / "vae" / "vae.json").write_text('{"width": 16}')
    run(["dvc", "add", "artifacts/vae"], first)
    add_remote(first, str(remote))
    run(["dvc", "push"], first)
    subprocess.run([*GIT, "add", "-A"], cwd=first, check=True)
    subprocess.run([*GIT, "commit", "-qm", "outputs"], cwd=first, check=True)
    (tampered,) = [f for f in remote.rglob("*") if f.is_file() and f.read_bytes() == b'{"num_classes": 10}']
    tampered.chmod(0o644)
    tampered.write_text('{"num_classes": 11}')

    verified = clone(first, tmp_path / "verified")
    add_remote(verified, str(remote))
    assert run(["dvc", "config", "--local", f"remote.{REMOTE}.verify"], verified).stdout.strip() == "true"
    done = run(["dvc", "pull"], verified, check=False)
    assert done.returncode != 0 and "Checkout failed for following targets:\nartifacts/vae" in done.stderr, done.stderr
    assert not (verified / "artifacts" / "vae" / "latents.json").exists()

    unverified = clone(first, tmp_path / "unverified")  # what a plain `dvc remote add` gets
    run(["dvc", "remote", "add", "--local", "--default", REMOTE, str(remote)], unverified)
    run(["dvc", "pull"], unverified)
    assert (unverified / "artifacts" / "vae" / "latents.json").read_text() == '{"num_classes": 11}'


@pytest.mark.slow
def test_team_up_tracks_two_clones_in_one_mlflow_server_and_down_stops_everything(repo_copy, tmp_path):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    state = tmp_path / "state"
    subprocess.run([*GIT, "commit", "-qam", "smoke profile"], cwd=repo_copy, check=True)
    first, second = repo_copy, clone(repo_copy, tmp_path / "second")
    team = [sys.executable, "-m", "flows", "team"]
    run([*team, "up", "--state", str(state), "--prefect-port", str(free_port()), "--mlflow-port", str(free_port())], first)
    try:
        assert state.stat().st_mode & 0o777 == 0o700  # pids, logs and stores are the user's own
        assert run(["dvc", "config", "--local", f"remote.{REMOTE}.verify"], first).stdout.strip() == "true"
        env = exports(state / "env.sh")
        tracking = env["MLFLOW_TRACKING_URI"]
        running = Services(state).running()
        assert set(running) == {"prefect", "mlflow", "worker"}
        mlflow_server = psutil.Process(running["mlflow"]["pid"])
        listening = {c.laddr.ip for process in [mlflow_server, *mlflow_server.children(recursive=True)]
                     for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}  # no authentication: this machine only, unless --mlflow-host
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            pool = client.read_work_pool(POOL)
            assert pool.type == "process" and pool.concurrency_limit == 1
            assert client.read_deployment_by_name("pipeline/team").work_pool_name == POOL
            assert [worker.status.value for worker in client.read_workers_for_work_pool(POOL)] == ["ONLINE"]

        for repo in (first, second):  # each clone's prepare stage: a parent and a child run on the server
            run(["dvc", "repro", "prepare"], repo, **env)
            assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()
        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name("latentlab")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
        found = client.search_runs([experiment.experiment_id])
        parents = [r for r in found if r.data.tags.get("latentlab.pipeline") == "true"]
        children = [r for r in found if r.data.tags.get("mlflow.parentRunId")]
        assert len(parents) == 2 and sorted(r.info.run_name for r in children) == ["prepare", "prepare"]
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {r.info.run_id for r in parents}
        assert len(list((state / "mlflow" / "artifacts").rglob("samples.png"))) == 2  # the server's artifact root

        run([sys.executable, "-m", "flows", "compare", "--csv", "runs.csv"], second, **env)
        import pandas as pd

        assert sorted(pd.read_csv(second / "runs.csv")["run"]) == sorted(r.info.run_name for r in parents)
    finally:
        run([*team, "down", "--state", str(state)], first)
    pids = [entry["pid"] for entry in running.values()]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert not answers(f"{tracking}/health") and Services(state).running() == {}


@pytest.fixture(scope="module")
def shared(smoke_snapshot, tmp_path_factory):
    """Clone A (a copy of the session's smoke pipeline run) commits its results and the team's DVC
    remote, and pushes; clone B is a `git clone` of A that pulls."""
    first = copy_reproduced(smoke_snapshot, tmp_path_factory.mktemp("clones") / "first")
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(["dvc", "remote", "add", "--default", "--force", "team", str(remote)], first)
    subprocess.run([*GIT, "add", "-A"], cwd=first, check=True)
    subprocess.run([*GIT, "commit", "-qm", "smoke results"], cwd=first, check=True)
    run([sys.executable, "-m", "flows", "team", "push"], first)
    second = clone(first, tmp_path_factory.mktemp("clones") / "second")
    run(["dvc", "pull"], second)
    return first, second


@pytest.mark.slow
def test_a_dvc_remote_gives_a_second_clone_every_output_and_a_third_the_run_cache(shared, tmp_path):
    first, second = shared
    assert "up to date" in run(["dvc", "status"], second).stdout
    assert "Running stage" not in run(["dvc", "repro"], second).stdout
    assert metrics_shown(second) == metrics_shown(first)
    for stage in stages(second / "dvc.yaml"):
        assert any((second / "artifacts" / stage).iterdir())

    third = clone(first, tmp_path / "third")  # no dvc.lock: the run cache is all it has
    subprocess.run([*GIT, "rm", "-q", "dvc.lock"], cwd=third, check=True)
    run([sys.executable, "-m", "flows", "profile", "smoke"], third)  # the params the session's first run had
    restored = run(["dvc", "repro", "--pull"], third).stdout
    assert "Running stage" not in restored
    assert [s for s in stages(third / "dvc.yaml") if f"Stage '{s}' is cached - skipping run" in restored] == list(stages(third / "dvc.yaml"))
    assert "up to date" in run(["dvc", "status"], third).stdout


def flow_runs_done(ids: list, seconds: float) -> list:
    from prefect.client.orchestration import get_client

    deadline = time.time() + seconds
    with get_client(sync_client=True) as client:
        while True:
            found = [client.read_flow_run(flow_run_id) for flow_run_id in ids]
            if all(flow_run.state.is_final() for flow_run in found) or time.time() > deadline:
                return found
            time.sleep(2)


@pytest.mark.slow
def test_a_worker_in_a_second_clone_runs_deployment_runs_there_one_at_a_time(shared, prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from tests.test_pipeline import task_states

    first, second = shared
    run([sys.executable, "-m", "flows", "team", "deploy"], first)
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(POOL).concurrency_limit == 1
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "flows", "team", "worker"], cwd=second, stdout=out, stderr=subprocess.STDOUT,
            env=run_env(PREFECT_WORKER_QUERY_SECONDS="2"), start_new_session=True,
        )
    try:
        knn_k = {"overrides": ["params/probe.yaml:knn_k=7"]}
        submitted = [run_deployment("pipeline/team", parameters=knn_k, timeout=0).id for _ in range(2)]
        done = sorted(flow_runs_done(submitted, FLOW_RUN_SECONDS), key=lambda flow_run: flow_run.start_time)
    finally:
        stop_session(worker.pid)
    assert [flow_run.state.name for flow_run in done] == ["Completed", "Completed"], log.read_text()[-3000:]
    assert done[1].start_time >= done[0].end_time  # the pool's limit of 1 queued the second
    names = list(stages(second / "dvc.yaml"))
    assert task_states(str(done[0].id)) == {s: "Completed" if s in ("probe", "fid") else "Skipped" for s in names}  # fid judges with the probe
    assert task_states(str(done[1].id)) == dict.fromkeys(names, "Skipped")
    assert yaml.safe_load((second / "params" / "probe.yaml").read_text())["knn_k"] == 7  # ran in the worker's clone
    assert yaml.safe_load((first / "params" / "probe.yaml").read_text())["knn_k"] != 7
    assert "up to date" in run(["dvc", "status"], second).stdout
