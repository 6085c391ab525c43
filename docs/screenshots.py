"""The screenshots of the three front doors (docs/img/*.png, in the README and docs/doors.md), taken as a user sees them.

    pip install -e '.[docs]'        # playwright; the browser is Debian's chromium (/usr/bin/chromium)
    python docs/screenshots.py      # 15–20 minutes on a busy 2-core machine (the smoke pipeline runs once)

In a throw-away clone of this repo (its last commit) on the smoke profile, it starts
`prefect server start` on a free port, serves the pipeline (`python -m flows serve`), runs the
deployment once and waits for it; then `mlflow ui` on the clone's store and `dvc plots show`; and
photographs each page with headless Chromium (`dvc plots show`'s page carries Vega itself: no
network needed). Every server it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.server import answers, free_port
from runtime.team import stop_session

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "img"
VIEWPORT = {"width": 1400, "height": 900}
STARTUP_SECONDS = 600  # a fresh Prefect database's migrations take minutes on a busy machine


@contextmanager
def started(args: list[str], cwd: Path, env: dict[str, str], ready: str, log: Path) -> Iterator[None]:
    """`args` in the background until `ready` answers, for the duration; then it and its children
    (its own process group) are stopped."""
    with log.open("w") as out:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + STARTUP_SECONDS
        while not answers(ready):
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{' '.join(args)} did not answer at {ready}:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield
    finally:
        stop_session(process.pid)


def run_pipeline(api_url: str) -> tuple[str, str]:
    """One run of deployment pipeline/scheduled, waited on: (flow run id, deployment id)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        while True:  # serve registers the deployment after its imports
            try:
                with get_client(sync_client=True) as client:
                    deployment = client.read_deployment_by_name("pipeline/scheduled")
                break
            except Exception:
                time.sleep(2)
        flow_run = run_deployment(deployment.id, parameters={"profile": "smoke"}, timeout=None)
    if not flow_run.state.is_completed():
        raise RuntimeError(f"the pipeline run ended {flow_run.state.name}: {flow_run.state.message}")
    return str(flow_run.id), str(deployment.id)


def shoot(page, url: str, ready: str, name: str, then=None) -> None:
    """Open `url`, wait for `ready` (a selector) to show, do `then(page)`, save docs/img/<name>.png."""
    page.goto(url)
    page.wait_for_selector(ready, timeout=120_000)
    if then is not None:
        then(page)
    page.wait_for_timeout(2000)  # charts and graphs animate in (MLflow's UI polls: never network-idle)
    page.screenshot(path=IMAGES / f"{name}.png")
    print(f"wrote docs/img/{name}.png")


def prefect_pages(page, ui: str, flow_run_id: str, deployment_id: str) -> None:
    def subflow_runs(page):  # the stages' own flow runs (the Task Runs tab lists the stages' task runs)
        page.get_by_text("Subflow Runs", exact=True).click()
        page.locator("a[href^='/runs/flow-run/']", has_text="prepare").wait_for(timeout=60_000)

    page.set_viewport_size({"width": VIEWPORT["width"], "height": 1200})  # the graph, then the list
    shoot(page, f"{ui}/runs/flow-run/{flow_run_id}", "text=Completed", "prefect-run", subflow_runs)
    page.set_viewport_size(VIEWPORT)
    shoot(page, f"{ui}/deployments/deployment/{deployment_id}/run", "text=ssl_objective", "prefect-custom-run")


def mlflow_pages(page, ui: str, experiment_id: str) -> None:
    def expand_parent(page):
        for panel in ("Close", "Hide banner"):  # the assistant's side panel, the shared view's banner
            if (button := page.get_by_role("button", name=panel, exact=True)).count():
                button.first.click()
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # the parent's +
        page.wait_for_selector("text=distill", timeout=60_000)

    runs = f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=headline"
    shoot(page, runs, "text=fid_student_4", "mlflow-runs", expand_parent)
    shoot(page, f"{ui}/#/models/latentlab-student", "text=Version 1", "mlflow-models")


def dvc_page(page, clone: Path) -> None:
    page.set_viewport_size({"width": 2000, "height": 1250})  # four charts a row, then the first sample grids
    shoot(page, (clone / "dvc_plots" / "index.html").as_uri(), "svg.marks", "dvc-plots")
    page.set_viewport_size(VIEWPORT)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    import mlflow
    from playwright.sync_api import sync_playwright

    IMAGES.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="latentlab-shots-"))
    clone = work / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_HOME": str(work / "prefect"), "PREFECT_API_URL": api_url, "PREFECT_UI_API_URL": api_url,
           "PREFECT_SERVER_API_PORT": str(port), "MLFLOW_TRACKING_URI": ""}
    python = [sys.executable, "-m"]
    subprocess.run([*python, "flows", "profile", "smoke"], cwd=clone, env=env, check=True)
    mlflow_port = free_port()
    server = [*python, "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    serve = [*python, "flows", "serve", "--cron", "0 3 * * *"]
    mlflow_ui = [*python, "mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db", "--port", str(mlflow_port)]
    with (started(server, clone, env, f"{api_url}/health", work / "prefect-server.log"),
          started(serve, clone, env, f"{api_url}/health", work / "serve.log")):
        flow_run_id, deployment_id = run_pipeline(api_url)  # before playwright: its event loop makes Prefect async
        subprocess.run(["dvc", "plots", "show"], cwd=clone, env=env, check=True)
        experiment = mlflow.MlflowClient(f"sqlite:///{clone / 'mlflow.db'}").get_experiment_by_name("latentlab")
        with (started(mlflow_ui, clone, env, f"http://127.0.0.1:{mlflow_port}/health", work / "mlflow.log"),
              sync_playwright() as playwright):
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport=VIEWPORT)
            prefect_pages(page, f"http://127.0.0.1:{port}", flow_run_id, deployment_id)
            mlflow_pages(page, f"http://127.0.0.1:{mlflow_port}", experiment.experiment_id)
            dvc_page(page, clone)
            browser.close()
    print(f"the clone is left in {work}")


if __name__ == "__main__":
    main()
