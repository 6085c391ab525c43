"""The pipeline served as a Prefect deployment, used as its users use it: `python -m flows serve` in
the background in a copy of the session's smoke run, runs triggered through the API (as the UI's
Custom run form does) and waited on, then what the UI would show read back through the API: states,
subflow runs, logs. One run of the form (the smoke profile and an override that reruns the probe
and fid) backs most tests; the last test stops serve mid-run."""

import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.conftest import BIN, copy_reproduced, run
from tests.test_pipeline import STAGES, pipeline_runs, task_states

DEPLOYMENT = "pipeline/served-test"
CHOICES = ["profile", "source", "ssl_objective", "diffusion_formulation"]
RERUN = ["probe", "fid"]  # what the smoke run's override reaches


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory, smoke_snapshot):
    """`python -m flows serve` in a copy of the session's smoke run; (the copy, the serve process, its
    deployment)."""
    repo = copy_reproduced(smoke_snapshot, tmp_path_factory.mktemp("served") / "repo")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = (repo.parent / "serve.log").open("w+")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows", "serve", "--cron", "0 3 * * *", "--name", DEPLOYMENT.split("/")[1]],
        cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with _client() as client:
                    deployment = client.read_deployment_by_name(DEPLOYMENT)
                break
            except Exception:  # not registered yet
                if serve.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"serve did not register {DEPLOYMENT}:\n{log.read()[-3000:]}")
                time.sleep(1)
        yield repo, serve, deployment
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=60)
        log.close()


def start_run(parameters: dict):
    from prefect.deployments import run_deployment

    return run_deployment(DEPLOYMENT, parameters=parameters, timeout=0)


def wait_until(flow_run_id, serve, done) -> object:
    """The flow run, read back until `done(flow_run)`; fails if serve dies first."""
    while True:
        with _client() as client:
            flow_run = client.read_flow_run(flow_run_id)
        if done(flow_run):
            return flow_run
        assert serve.poll() is None, f"serve exited ({serve.returncode}) before the run was done"
        time.sleep(2)


def finished(flow_run_id, serve):
    return wait_until(flow_run_id, serve, lambda flow_run: flow_run.state is not None and flow_run.state.is_final())


def subflow_runs(flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])),
            sort=FlowRunSort.START_TIME_ASC, limit=100,
        )


def logs_of(flow_run_id) -> list:
    """Every log of one flow run (its task runs' included, its subflow runs' not), oldest first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    found, offset = [], 0
    with _client() as client:
        while page := client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), sort=LogSort.TIMESTAMP_ASC,
            limit=200, offset=offset,
        ):
            found += page
            offset += len(page)
    return found


def sent_logs(flow_run_id) -> list:
    """`logs_of` a finished flow run once its process has sent its last logs (as it exits, after the
    run's final state): when two reads a second apart agree."""
    logs, before = logs_of(flow_run_id), None
    for _ in range(30):
        if before is not None and len(logs) == len(before) and logs:
            break
        time.sleep(1)
        logs, before = logs_of(flow_run_id), logs
    return logs


def test_a_stage_process_output_is_logged_by_quarters_without_dvc_hints_at_its_level():
    from flows.pipeline import StageOutput

    output = StageOutput()
    redraws = [f"vae: {percent:3d}%|##| {percent}/100 [00:01<00:02]" for percent in (0, 3, 24, 25, 60, 99, 100, 100)]
    logged = [line for line in redraws if output.level(line) is not None]
    assert [line.split("%")[0][-3:].strip() for line in logged] == ["0", "25", "60", "99", "100"]  # one a quarter
    assert output.level("distill/student_2_steps:   0%|  | 0/9") == logging.INFO  # another bar
    assert output.level("Use `dvc push` to send your updates to remote storage.") is None
    assert output.level("Updating lock file 'dvc.lock'") is None
    assert output.level("2026/01/01 00:00:00 WARNING mlflow.pytorch: careful") == logging.WARNING
    assert output.level("[vae] step 20: psnr=20.1") == logging.INFO
    assert output.level("error in stage 'vae':") == logging.ERROR
    assert output.level("params/vae.yaml: 'beta' = -1 is invalid") == logging.ERROR  # the error goes on
    assert list(output.tail)[-2:] == ["error in stage 'vae':", "params/vae.yaml: 'beta' = -1 is invalid"]


@pytest.fixture(scope="module")
def smoke_run(served):
    """One run of the deployment as the Custom run form would start it: the smoke profile, and an
    override that reruns the stages RERUN (fid judges with the probe); the rest are up to date."""
    repo, serve, _ = served
    flow_run = finished(start_run({"profile": "smoke", "overrides": ["probe.knn_k=7"]}).id, serve)
    return repo, flow_run


@pytest.mark.slow  # a Prefect server
def test_the_servers_ui_calls_its_own_api(prefect_api):
    import json
    import urllib.request

    with urllib.request.urlopen(prefect_api.removesuffix("/api") + "/ui-settings") as response:
        assert json.load(response)["api_url"] == prefect_api  # not port 4200's


@pytest.mark.slow
def test_the_run_form_offers_each_choice_as_a_drop_down(served):
    _, _, deployment = served
    properties = deployment.parameter_openapi_schema["properties"]
    for name in CHOICES:  # a plain enum (no anyOf with null, which the form shows as a type switch)
        assert "anyOf" not in properties[name] and properties[name]["type"] == "string", properties[name]
        assert properties[name]["default"] == "keep" == properties[name]["enum"][0], properties[name]
    assert {"smoke", "default"} <= set(properties["profile"]["enum"])
    assert {"digits", "mnist"} <= set(properties["source"]["enum"])
    assert properties["overrides"]["type"] == "array" and properties["overrides"]["default"] == []


@pytest.mark.slow
def test_a_value_off_the_form_is_refused_and_a_bad_override_fails_the_run_with_its_reason(served):
    repo, serve, _ = served
    with pytest.raises(Exception, match="nope"):  # the API checks the form's schema
        start_run({"source": "nope"})
    before = (repo / "params" / "ssl.yaml").read_text()
    flow_run = finished(start_run({"overrides": ["ssl.train.epochs=-1"]}).id, serve)
    assert flow_run.state.is_failed()
    reason = "'train.epochs' = -1 is invalid"
    assert flow_run.state.message.count(reason) == 1, flow_run.state.message
    logs = sent_logs(flow_run.id)
    said = [log for log in logs if reason in log.message]
    assert len(said) == 1 and said[0].level >= 40, [log.message for log in logs]  # once, at ERROR...
    assert not any("Traceback" in log.message or "<dynamic-code>" in log.message for log in logs)  # ...no traceback
    assert (repo / "params" / "ssl.yaml").read_text() == before  # nothing written


@pytest.mark.slow
def test_a_smoke_run_completes_leaves_dvc_clean_and_has_its_mlflow_parent_run(smoke_run):
    repo, flow_run = smoke_run
    assert flow_run.state.is_completed(), flow_run.state.message
    assert "up to date" in run(["dvc", "status"], repo).stdout
    parent = pipeline_runs(repo)[-1]
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert parent.info.status == "FINISHED" and parent.data.tags["trigger"] == "prefect"


@pytest.mark.slow
def test_each_stage_flow_run_is_a_subflow_after_its_task_run_named_and_tagged(smoke_run):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, flow_run = smoke_run
    stages = subflow_runs(flow_run.id)
    assert [s.name for s in stages] == RERUN  # the stages that ran; the others' task runs are Skipped
    assert all(s.state.is_completed() and f"pipeline:{flow_run.name}" in s.tags for s in stages)
    with _client() as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])), limit=100,
        )
    by_id = {task_run.id: task_run for task_run in task_runs}
    for stage in stages:  # under a task run of its own that follows the pipeline's task run of the stage
        (stage_task_run,) = by_id[stage.parent_task_run_id].task_inputs["stage"]
        assert by_id[stage_task_run.id].name == stage.name
        assert stage.parameters["params"]  # the stage's params, shown in the UI
    assert task_states(str(flow_run.id)) == {s: "Completed" if s in RERUN else "Skipped" for s in STAGES}  # the Task Runs tab


@pytest.mark.slow
def test_the_run_logs_each_line_once_at_its_level_and_progress_by_quarters(smoke_run):
    from flows.pipeline import PROGRESS

    _, flow_run = smoke_run
    pipeline_logs = logs_of(flow_run.id)
    stage_logs = {s.name: logs_of(s.id) for s in subflow_runs(flow_run.id)}
    everything = pipeline_logs + [log for logs in stage_logs.values() for log in logs]
    assert len(pipeline_logs) < 150, len(pipeline_logs)
    repeated = Counter((log.flow_run_id, log.task_run_id, log.message) for log in everything)
    assert max(repeated.values()) == 1, [key for key, count in repeated.items() if count > 1]
    for stage, logs in stage_logs.items():
        ended = [log for log in logs if log.task_run_id is None and log.message.startswith("Finished in state")]
        assert ended and ended[-1].message.startswith("Finished in state Completed"), stage  # its last lines were sent
        printed = {log.message for log in logs if log.task_run_id is None and not log.message.startswith(("Beginning", "Finished"))}
        for line in printed:  # the stage's own lines are in its flow run only
            assert not any(line in log.message for log in pipeline_logs), line
    bars = Counter(progress["bar"] for log in pipeline_logs if (progress := PROGRESS.match(log.message)))
    assert bars and max(bars.values()) <= 5, bars  # 0, 25, 50, 75, 100 %
    assert not any("dvc push" in log.message for log in everything)
    warned = [log for log in stage_logs["fid"] if "Inception-v3 FID skipped" in log.message]
    assert warned and all(log.level == 30 for log in warned)


@pytest.mark.slow
def test_sigterm_stops_serve_and_its_run_in_progress(served, smoke_run):
    """Last, as it stops the module's serve: a run changing the prepared data (every stage reruns) is
    stopped in its first stages."""
    _, serve, _ = served
    flow_run = start_run({"overrides": ["prepare.seed=1"]})
    wait_until(flow_run.id, serve, lambda _: bool(subflow_runs(flow_run.id)))
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=120) == 0
    with _client() as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_cancelled(), state
