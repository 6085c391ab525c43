"""One Prefect server for all the stages of a `dvc repro`.

With no Prefect API configured, every flow run starts a temporary server of its own (8–10 s
here, per stage). Stages that run under `dvc` share one instead: the first starts
`prefect server start` in the background, the others find its address, and it stops when that
`dvc` process ends. It keeps its records in PREFECT_HOME's database, as the temporary servers
do, so a later `prefect server start` shows every run in the UI. A stage on its own starts a server
of its own instead of Prefect's temporary one, which would outlive a `kill -9` of the stage; every
server started here is killed with the process that started it (`runtime.lifetime`), and answers
only clients that send the random auth string it was started with (Prefect's server API auth
setting; its health check stays open).

`python -m runtime.server PID STARTED` is that background process (`runtime.background`).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime.background import (
    UnsafeHelpersDir,
    clean_up,
    invocation_from_argv,
    published,
    start_once,
    wait_for,
)
from runtime.invocation import Invocation, current_invocation
from runtime.lifetime import child_dies_with_us

STARTUP_SECONDS = 60
LOCAL_API = re.compile(r"http://127\.0\.0\.1:\d{1,5}/api")  # what `prefect_server` serves
AUTH_ENV = "PREFECT_API_AUTH_STRING"  # what clients send (Basic auth); the server's: PREFECT_SERVER_API_AUTH_STRING
IDLE_SERVICES = ("scheduler", "late_runs", "foreman", "pause_expirations", "repossessor", "cleanup_reconciler", "triggers")
"""The loop services a server started here has no work for: it holds no schedules, workers, paused
runs, concurrency leases or automations. Each polls the database every few seconds: together ~1.2
s of CPU a minute per server here, beside the stages. Cancellation cleanup (a cancelled pipeline's
stage flow runs), the event persister and the task run recorder stay on. A setting of the user's wins."""


@dataclass(frozen=True)
class Api:
    """A Prefect API: its URL, and the auth string its clients must send (None: it asks for none)."""

    url: str
    auth: str | None = None


def answers(url: str, timeout: float = 2) -> bool:
    """Whether an HTTP GET of `url` succeeds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except OSError:
        return False


def healthy(api_url: str, timeout: float = 2) -> bool:
    return answers(f"{api_url}/health", timeout)


@contextmanager
def stage_api() -> Iterator[None]:
    """Point this stage process at a Prefect API for the duration: the configured one, else the
    shared server of the `dvc` it runs under (started if need be), else a server of its own."""
    if (api := _shared_api()) is not None:
        use_api(api)
        yield
        return
    with own_api():
        yield


@contextmanager
def own_api() -> Iterator[None]:
    """This process (and what it starts) on the configured Prefect API, else on a server of its own
    for the duration."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        yield
        return
    with prefect_server() as api:
        use_api(api)
        yield


def _shared_api() -> Api | None:
    """The shared server of this stage's `dvc` process; None without one, or with an API configured."""
    from prefect.settings import get_current_settings

    invocation = current_invocation()
    if invocation is None or get_current_settings().api.url:
        return None
    try:
        start_once("prefect", "runtime.server", invocation)
        address = published("prefect", invocation, ".url")
    except UnsafeHelpersDir as err:
        print(f"warning: not using the shared Prefect server: {err}", file=sys.stderr)
        return None
    return read_api(address) if wait_for("prefect", invocation, ".url", STARTUP_SECONDS) else None


def read_api(address: Path) -> Api | None:
    """The API in `address` (its URL, then its auth string) if it is a local server's (`LOCAL_API`)
    and that server answers."""
    api_url, _, auth = address.read_text().strip().partition("\n")
    if LOCAL_API.fullmatch(api_url) and healthy(api_url):
        return Api(api_url, auth or None)
    print(f"warning: {address} holds {api_url[:100]!r}, not the address of a healthy local Prefect server; ignored",
          file=sys.stderr)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def idle_services_off() -> dict[str, str]:
    return {f"PREFECT_SERVER_SERVICES_{service.upper()}_ENABLED": "false" for service in IDLE_SERVICES}


@contextmanager
def prefect_server() -> Iterator[Api]:
    """`prefect server start` on a free local port for the duration, answering only clients that
    send a random auth string made for it, without `IDLE_SERVICES`; yields its API."""
    api = Api(f"http://127.0.0.1:{(port := free_port())}/api", secrets.token_urlsafe(32))
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            server_command(port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **child_dies_with_us(),
            env={**idle_services_off(), **os.environ, "PREFECT_UI_API_URL": api.url,  # else its UI calls port 4200
                 "PREFECT_SERVER_API_AUTH_STRING": api.auth},
        )
        try:
            deadline = time.time() + STARTUP_SECONDS
            while not healthy(api.url, timeout=1):
                if server.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"prefect server start did not come up:\n{log.read().decode()[-2000:]}")
                time.sleep(0.2)
            yield api
        finally:
            drain_clients()
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def drain_clients() -> None:
    """Send this process's queued Prefect logs and events (before the server or this process goes away)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all(timeout=5)


def use_api(api: Api) -> None:
    """Point this process (and what it starts) at `api`, sending its auth string (none if it asks none)."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = api.url
    if api.auth:
        os.environ[AUTH_ENV] = api.auth
    else:
        os.environ.pop(AUTH_ENV, None)
    refresh_global_settings_context()


def serve_while(invocation: Invocation) -> None:
    """Run a server until the invocation ends, its address published for the stages meanwhile
    (nothing when a Prefect API is configured: the stages use that)."""
    from prefect.settings import get_current_settings

    address = published("prefect", invocation, ".url")
    try:
        if get_current_settings().api.url:
            return
        with prefect_server() as api:
            partial = address.with_suffix(".part")
            partial.write_text(f"{api.url}\n{api.auth}\n")
            partial.rename(address)
            while invocation.alive():
                time.sleep(1)
    finally:
        clean_up("prefect", invocation, ".url")


if __name__ == "__main__":
    serve_while(invocation_from_argv())
