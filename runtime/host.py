"""A warm host for the stage processes of one pipeline run.

Every stage process would otherwise spend ~8 s here importing torch, Prefect and MLflow before
doing any work. The host imports them once (the rest of the stages' modules while it waits for
requests), then forks a fresh child per stage: the child takes
over the caller's working directory, environment and stdin/stdout/stderr (passed over a Unix
socket) and runs `python -m flows.<stage>` as it would have, with its own Prefect flow run and
MLflow run; its exit code goes back to the caller. The host never touches a GPU before forking
and lives as long as its invocation (`runtime.background`).

`python -m runtime.host PID STARTED` is that process.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import traceback
from pathlib import Path

from runtime.background import clean_up, invocation_from_argv, published, start_once, wait_for
from runtime.invocation import Invocation

STARTUP_SECONDS = 120
CORE = ["runtime.stage", "mlflow", "mlflow.store.tracking.sqlalchemy_store"]  # torch, Prefect, MLflow
LATER = ["torch._dynamo", "mlflow.pyfunc"]  # after Prefect has set up logging; mlflow.pyfunc logs the models


def socket_path(invocation: Invocation) -> Path:
    return published("host", invocation, ".sock")


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("stage host closed the connection")
        data += chunk
    return data


# --- the caller's side: `python -m runtime.launch <stage>` -------------------------------------

def run_on_host(stage: str, argv: list[str], invocation: Invocation | None) -> int | None:
    """Run the stage in a child of the host; its exit code, or None when no host can take it
    (the caller then runs the stage itself)."""
    if invocation is None:
        return None
    start_once("host", "runtime.host", invocation)
    if not wait_for(path := socket_path(invocation), STARTUP_SECONDS):
        return None
    env = {**os.environ, **invocation.env()}
    request = json.dumps({"stage": stage, "argv": argv, "cwd": os.getcwd(), "env": env}).encode()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(path))
        socket.send_fds(conn, [struct.pack("!Q", len(request))], [0, 1, 2])
        conn.sendall(request)
        (child,) = struct.unpack("!q", _recv_exact(conn, 8))
    except OSError:
        return None  # nothing started: run it here instead
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C on dvc reaches the stage
        signal.signal(sig, lambda number, _frame: os.kill(child, number))
    try:
        (code,) = struct.unpack("!i", _recv_exact(conn, 4))
    except OSError:
        code = 1
    return code


# --- the host's side ---------------------------------------------------------------------------

def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the caller's stage process, run the stage, exit."""
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [f"flows.{request['stage']}", *request["argv"]]
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()  # the caller's PREFECT_* settings
        if threads := os.environ.get("OMP_NUM_THREADS"):
            import torch

            torch.set_num_threads(int(threads))
        import runpy

        sys.modules.pop(f"flows.{request['stage']}", None)  # warm, but run afresh as __main__
        runpy.run_module(f"flows.{request['stage']}", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve_one(conn: socket.socket) -> None:
    data, fds, _, _ = socket.recv_fds(conn, 8, 3)
    (size,) = struct.unpack("!Q", data + _recv_exact(conn, 8 - len(data)))
    request = json.loads(_recv_exact(conn, size))
    child = os.fork()
    if child == 0:
        conn.close()
        _run_child(request, fds)
    for fd in fds:
        os.close(fd)

    def report() -> None:
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        try:
            conn.sendall(struct.pack("!i", code if code >= 0 else 128 - code))  # a signal: 128 + its number
        finally:
            conn.close()

    conn.sendall(struct.pack("!q", child))
    threading.Thread(target=report, daemon=True).start()


def serve_while(invocation: Invocation) -> None:
    """Import what every stage needs, start taking stages, and import the rest (each stage's flow,
    torch._dynamo, mlflow.pyfunc) between requests; run stages until the invocation ends."""
    import yaml

    for module in CORE:
        importlib.import_module(module)
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    rest = [f"flows.{stage}" for stage in stages] + LATER
    path = socket_path(invocation)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        partial = path.with_suffix(".part")
        partial.unlink(missing_ok=True)
        listener.bind(str(partial))
        listener.listen()
        partial.rename(path)  # published only once it accepts
        while invocation.alive():
            listener.settimeout(0 if rest else 1)
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, TimeoutError):
                if rest:
                    importlib.import_module(rest.pop(0))
                continue
            conn.settimeout(None)
            _serve_one(conn)
    finally:
        listener.close()
        clean_up("host", invocation, ".sock")


if __name__ == "__main__":
    serve_while(invocation_from_argv())
