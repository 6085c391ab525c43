"""The front doors around the stages: the DAG read from DVC, serving on a schedule, a failing or
briefly unreachable tracking server, bad form values, and the Prefect server a `dvc repro` shares."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runtime.server import free_port
from tests.conftest import BIN, REPO, run


def test_stage_order_is_dvc_yamls_dag(monkeypatch):
    from runtime.dag import stage_order

    monkeypatch.chdir(REPO)
    order = stage_order()
    declared = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert sorted(order) == sorted(declared)
    assert order.index("prepare") < order.index("ssl") < order.index("encoder") < order.index("vae")
    assert order.index("diffusion") < order.index("distill") < order.index("fid")


def test_dvc_reads_dvc_yaml_and_dvc_lock_with_the_c_yaml_loader():
    """Every dvc command parses dvc.yaml and dvc.lock (DVC's `parse_yaml`, ruamel.yaml's safe
    loader): in C, four times as fast as the pure-Python loader ruamel.yaml 0.19 falls back to."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__name__ == "CParser"
    assert parse_yaml((REPO / "dvc.yaml").read_text(), "dvc.yaml")["stages"].keys() == set(
        yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def test_overrides_take_dvc_and_dotted_forms_and_refuse_unknown_stages():
    from runtime.profiles import profile_params, set_overrides
    from tasks.errors import StageError

    full = set_overrides(profile_params("smoke"), ["params/ssl.yaml:train.epochs=2", "probe.knn_k=7"])
    assert full["ssl"]["train"]["epochs"] == 2 and full["probe"]["knn_k"] == 7
    assert profile_params("smoke")["ssl"]["train"]["epochs"] == 20  # the profile itself is untouched
    with pytest.raises(StageError, match="params/<stage>.yaml:key=value"):
        set_overrides(full, ["params/nope.yaml:x=1"])


def last_pipeline_run():
    """The latest flow run of the pipeline flow, with its logs (its task runs' included), from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from tests.test_deployment import logs_of

    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])), sort=FlowRunSort.START_TIME_DESC, limit=1,
        )
    return flow_run, logs_of(flow_run.id)


def said_once(reason: str, text: str, flow_run, logs) -> None:
    """`reason` is in the failed flow run's state message and, at ERROR, in its logs, once each, and
    so is it in the command's output `text`; no traceback anywhere."""
    assert flow_run.state.is_failed() and flow_run.state.message.count(reason) == 1, flow_run.state.message
    said = [log for log in logs if reason in log.message]
    assert len(said) == 1 and said[0].level >= 40, [log.message for log in logs]
    assert text.count(reason) == 1, text
    assert not any("Traceback" in log.message for log in logs) and "Traceback" not in text


@pytest.mark.slow
def test_a_bad_form_value_fails_the_flow_before_any_stage_runs(repo_copy):
    before = (repo_copy / "params" / "ssl.yaml").read_text()
    done = run([sys.executable, "-m", "flows", "run", "--set", "ssl.train.epochs=-1"], repo_copy, check=False)
    assert done.returncode == 1
    said_once("'train.epochs' = -1 is invalid", done.stdout + done.stderr, *last_pipeline_run())
    assert (repo_copy / "params" / "ssl.yaml").read_text() == before
    assert not (repo_copy / "artifacts" / "prepare").exists()


@pytest.mark.slow
def test_a_failed_stage_fails_the_flow_saying_why_once(repo_copy):
    done = run([sys.executable, "-m", "flows", "run", "--set", "prepare.source=folder"], repo_copy, check=False)
    assert done.returncode == 1
    flow_run, logs = last_pipeline_run()
    said_once("stage 'prepare' failed (exit 255)", done.stdout + done.stderr, flow_run, logs)
    assert "folder not found" in flow_run.state.message  # the stage's own reason, from its last lines


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_a_transient_failure_found_at_once(repo_copy):
    from flows.pipeline import StageFailed
    from runtime.failures import TRANSIENT_EXIT

    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(  # MLflow's own retries would take ~4 minutes
        [sys.executable, "-m", "flows.prepare"], cwd=repo_copy, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == TRANSIENT_EXIT, done.stderr[-2000:]
    assert f"(transient, worth a retry): TrackingUnreachable: the MLflow tracking server {uri} does not answer" in done.stderr
    assert "Beginning flow run" not in done.stdout + done.stderr  # found before any work
    assert not (repo_copy / "artifacts" / "prepare").exists()  # nothing half-written
    assert StageFailed("prepare", TRANSIENT_EXIT, "").transient  # ...which the flow's task retries
    assert not StageFailed("prepare", 2, "").transient  # a bad param is not retried


@pytest.mark.slow
def test_serve_registers_a_scheduled_deployment(repo_copy, prefect_api):
    from prefect.client.orchestration import get_client

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "flows", "serve", "--cron", "0 3 * * *", "--name", "nightly-test", "--profile", "smoke"],
        cwd=repo_copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deployment, deadline = None, time.time() + 90
        while deployment is None and time.time() < deadline and server.poll() is None:
            time.sleep(1)
            with get_client(sync_client=True) as client:
                try:
                    deployment = client.read_deployment_by_name("pipeline/nightly-test")
                except Exception:  # not registered yet
                    deployment = None
        assert deployment is not None, server.stdout.read() if server.poll() is not None else "not registered in 90 s"
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.parameters == {"profile": "smoke"}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_plain_dvc_repro_shares_one_prefect_server_and_stops_it(repo_copy, tmp_path):
    import psutil

    from runtime.background import helpers_dir

    def published() -> set[Path]:  # of ended invocations: other runs on this machine have theirs
        return {path for path in helpers_dir().iterdir() if not psutil.pid_exists(int(path.name.split("-")[1]))}

    before = published()
    env = {"PREFECT_API_URL": None, "PREFECT_API_AUTH_STRING": None, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    done = run(["dvc", "repro", "prepare", "ssl"], repo_copy, **env)  # the stages find its address and auth string
    assert "Starting temporary server" not in done.stdout + done.stderr
    servers = set(re.findall(r"View at (http://127\.0\.0\.1:\d+)/", done.stdout + done.stderr))
    assert len(servers) == 1, servers  # both stages' flow runs went to the same server
    deadline = time.time() + 15
    while published() - before and time.time() < deadline:
        time.sleep(0.5)
    assert not published() - before  # the server and the stage host went with dvc


def authorization(auth: str) -> dict[str, str]:
    """The header of a Prefect API client that sends `auth` (Basic auth, as Prefect's client does)."""
    import base64

    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


@pytest.mark.slow  # a Prefect server
def test_the_per_invocation_prefect_server_refuses_a_client_without_its_auth_string(prefect_api):
    """Any local user can reach 127.0.0.1: the API answers only the auth string it was started
    with (a random one per server); its health check stays open."""
    import urllib.error
    import urllib.request

    from runtime.server import AUTH_ENV, healthy

    def status(auth: str | None) -> int:
        request = urllib.request.Request(f"{prefect_api}/flows/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json", **(authorization(auth) if auth is not None else {})})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    auth = os.environ[AUTH_ENV]
    assert len(auth) >= 32 and healthy(prefect_api)
    assert status(None) == 401 and status("guess:guess") == 401 and status(auth[:-1]) == 401
    assert status(auth) == 200


@pytest.mark.slow  # a Prefect server
def test_the_per_invocation_prefect_server_runs_only_the_services_a_pipeline_run_uses(prefect_api):
    """Its loop services for schedules, workers, pauses, leases and automations are off (they poll
    for work it never has); those that record task runs and events, and cancel a cancelled run's
    stages, are on."""
    import urllib.request

    from runtime.server import AUTH_ENV, IDLE_SERVICES

    request = urllib.request.Request(f"{prefect_api}/admin/settings", headers=authorization(os.environ[AUTH_ENV]))
    with urllib.request.urlopen(request, timeout=10) as response:
        services = json.load(response)["server"]["services"]
    enabled = {name for name, service in services.items() if service.get("enabled") is True}
    assert not enabled & set(IDLE_SERVICES) and len(IDLE_SERVICES) == 7
    assert {"task_run_recorder", "event_persister", "cancellation_cleanup"} <= enabled


@pytest.mark.slow
def test_a_stage_run_by_dvc_exp_run_is_named_after_the_stage_and_the_experiment(repo_copy):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    run(["dvc", "exp", "run", "--name", "named-exp", "prepare"], repo_copy)
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["prepare@named-exp"])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))
    assert flow_run.state.is_completed()
    assert sorted(task_run.name for task_run in task_runs) == ["caption", "fetch-raw", "read-raw", "split"]  # no random suffixes
