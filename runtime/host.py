"""A warm host for the stage processes of one pipeline run.

Every stage process would otherwise spend ~8 s here importing torch, Prefect and MLflow before
doing any work. The host imports them once (the rest of the stages' modules while it waits for
requests, once a first stage has ended: a lone stage's run never needs them), then forks a fresh
child per stage: the child takes
over the caller's working directory, environment and stdin/stdout/stderr (passed over a Unix
socket) and runs `python -m flows.<stage>` as it would have, with its own Prefect flow run and
MLflow run; its exit code goes back to the caller. The host never touches a GPU before forking
and lives as long as its invocation (`runtime.background`); a child dies with the host, with the
invocation, or with its caller (`runtime.lifetime`). Only this user's processes can connect (the
socket is in a private directory); a request that is not a well-formed one for a stage of
dvc.yaml is logged and dropped, and the host carries on.

`python -m runtime.host PID STARTED` is that process.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path

from runtime.background import clean_up, invocation_from_argv, published, start_once, wait_for
from runtime.invocation import Invocation
from runtime.lifetime import die_with_parent, end_with, forward_signals

STARTUP_SECONDS = 120
REQUEST_SECONDS = 10  # to send a request, once connected
MAX_REQUEST_BYTES = 8 << 20  # the caller's environment is most of it
CORE = ["runtime.stage", "runtime.stage_process", "mlflow", "mlflow.store.tracking.sqlalchemy_store"]  # torch, Prefect, MLflow
LATER = ["torch._dynamo", "mlflow.pyfunc"]  # after Prefect has set up logging; mlflow.pyfunc logs the models


def _map_installed_packages() -> None:
    """What MLflow scans of every installed package the first time a process logs a model (to
    check the model's requirements against them): ~0.9 s per stage that logs one, done once here."""
    from mlflow.utils import requirements_utils

    requirements_utils._init_modules_to_packages_map()


def socket_path(invocation: Invocation) -> Path:
    return published("host", invocation, ".sock")


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        data += chunk
    return data


# --- the caller's side: `python -m runtime.launch <stage>` -------------------------------------

def run_on_host(
    stage: str, argv: list[str], invocation: Invocation | None, started: Callable[[int], None] = lambda pid: None,
) -> int | None:
    """Run the stage in a child of the host (`started` is told its PID); its exit code, or None
    when no host can take it (the caller then runs the stage itself)."""
    if invocation is None:
        return None
    start_once("host", "runtime.host", invocation)
    if not wait_for("host", invocation, ".sock", STARTUP_SECONDS):
        print(f"warning: the warm stage host did not start (see {published('host', invocation, '.log')}); "
              f"stage '{stage}' runs in a process of its own", file=sys.stderr)
        return None
    path = socket_path(invocation)
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
    started(child)
    forward_signals(child)  # Ctrl-C on dvc reaches the stage
    try:
        (code,) = struct.unpack("!i", _recv_exact(conn, 4))
    except OSError:
        code = 1
    return code


# --- the host's side ---------------------------------------------------------------------------

def _run_child(request: dict, fds: list[int], conn: socket.socket, host: int) -> None:
    """In the forked child: become the caller's stage process, run the stage, exit."""
    try:
        die_with_parent(host)
        end_with([], conn)  # the caller gone (killed with its dvc): the stage goes too
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


class BadRequest(ValueError):
    """A connection that does not carry a well-formed stage request."""


def _read_request(conn: socket.socket, stages: list[str]) -> tuple[dict, list[int]]:
    """The request and the caller's stdin/stdout/stderr; BadRequest (its fds closed) otherwise."""
    conn.settimeout(REQUEST_SECONDS)
    data, fds, _, _ = socket.recv_fds(conn, 8, 3)
    try:
        if len(fds) != 3:
            raise BadRequest(f"{len(fds)} file descriptors instead of 3 (stdin, stdout, stderr)")
        (size,) = struct.unpack("!Q", data + _recv_exact(conn, 8 - len(data)))
        if size > MAX_REQUEST_BYTES:
            raise BadRequest(f"a request of {size} bytes (at most {MAX_REQUEST_BYTES})")
        try:
            request = json.loads(_recv_exact(conn, size))
        except (ValueError, RecursionError) as err:
            raise BadRequest(f"a request that is not JSON ({err})") from None
        _check_request(request, stages)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return request, fds


def _check_request(request: object, stages: list[str]) -> None:
    def strings(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)

    if not isinstance(request, dict) or set(request) != {"stage", "argv", "cwd", "env"}:
        raise BadRequest("a request without exactly the keys stage, argv, cwd, env")
    if request["stage"] not in stages:
        raise BadRequest(f"stage {request['stage']!r}, which is not one of dvc.yaml's: {', '.join(stages)}")
    if not strings(request["argv"]):
        raise BadRequest("argv that is not a list of strings")
    if not isinstance(request["cwd"], str) or not os.path.isabs(request["cwd"]) or not os.path.isdir(request["cwd"]):
        raise BadRequest(f"cwd {request['cwd']!r}, which is not an existing absolute directory")
    env = request["env"]
    if not isinstance(env, dict) or not strings(list(env)) or not strings(list(env.values())):
        raise BadRequest("env that is not a mapping of strings to strings")


def _serve_one(conn: socket.socket, stages: list[str], ended: threading.Event) -> None:
    """Fork a child for the request on `conn` (`ended` is set when it ends), or log why not and drop
    the connection."""
    try:
        request, fds = _read_request(conn, stages)
    except Exception as err:  # the host serves the next request whatever this one was
        print(f"stage host: dropped a connection: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        conn.close()
        return
    host = os.getpid()
    child = os.fork()
    if child == 0:
        _run_child(request, fds, conn, host)
    for fd in fds:
        os.close(fd)

    def report() -> None:
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        ended.set()
        with suppress(OSError):  # the caller is gone
            conn.sendall(struct.pack("!i", code if code >= 0 else 128 - code))  # a signal: 128 + its number
        conn.close()

    with suppress(OSError):  # the caller is gone: the child sees it too, and ends
        conn.sendall(struct.pack("!q", child))
    threading.Thread(target=report, daemon=True).start()


def runs_one_stage(invocation: Invocation) -> bool:
    """Whether the invocation is a `dvc repro --single-item` (`-s`) of one target: a run that asks
    its host for one stage only."""
    import psutil

    try:
        args = psutil.Process(invocation.pid).cmdline()
    except psutil.Error:
        return False
    if "repro" not in args:
        return False
    after = args[args.index("repro") + 1:]
    options = [arg for arg in after if arg.startswith("-")]
    targets = [arg for arg in after if not arg.startswith("-")]
    single = any(arg == "--single-item" or re.fullmatch(r"-[a-zA-Z]*s[a-zA-Z]*", arg) for arg in options)
    return single and len(targets) == 1 and not {"--glob", "--downstream", "-p", "-P", "-R"} & set(options)


def serve_while(invocation: Invocation) -> None:
    """Import what every stage needs, start taking stages, and import the rest (each stage's flow,
    torch._dynamo, mlflow.pyfunc; MLflow's map of installed packages) between requests once a
    stage has ended, so that no stage shares the CPU with them; a run of one stage (`dvc repro -s
    <stage>`) never imports them (1 CPU-s here, more under load, while its `dvc` finishes). Run
    stages until the invocation ends."""
    import yaml

    for module in CORE:
        importlib.import_module(module)
    stages = list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])
    rest = [] if runs_one_stage(invocation) else [
        *(partial(importlib.import_module, module) for module in [f"flows.{stage}" for stage in stages] + LATER),
        _map_installed_packages,
    ]
    ended = threading.Event()
    path = socket_path(invocation)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unpublished = path.with_suffix(".part")
        unpublished.unlink(missing_ok=True)
        listener.bind(str(unpublished))
        listener.listen()
        unpublished.rename(path)  # published only once it accepts
        while invocation.alive():
            warm = rest and ended.is_set()
            listener.settimeout(0 if warm else 1)
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, TimeoutError):
                if warm:
                    rest.pop(0)()
                continue
            _serve_one(conn, stages, ended)
    finally:
        listener.close()
        clean_up("host", invocation, ".sock")


if __name__ == "__main__":
    serve_while(invocation_from_argv())
