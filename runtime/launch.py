"""`python -m runtime.launch <stage>`: what dvc.yaml runs for each stage.

The stage runs in a process of its own, which this one supervises (`runtime.outcome`): when the
stage's params ask for several processes (`train.processes` > 1), torchrun's ranks
(`torchrun --standalone --nproc_per_node K -m flows.<stage>`, DistributedDataParallel); under a
pipeline run (a `dvc repro`, or the pipeline flow), a fresh process forked from the run's warm host
(`runtime.host`), which saves the ~8 s of imports each stage process would spend; otherwise
`python -m flows.<stage>`. Ctrl-C and SIGTERM are passed on to it. Its exit code is this
process's; when it is not 0, or when the `dvc` (or pipeline flow) it runs under goes first, the
stage's last good outputs are put back. Under torchrun launched by hand (`WORLD_SIZE` set) the
stage runs in this process, as `python -m flows.<stage>` would.
"""

import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from runtime.env import LAUNCHER_ENV, STAGE_HOST_ENV


def processes_asked(stage: str) -> int:
    """`train.processes` of the stage's params (1 when they do not load: the stage says why)."""
    from tasks.params import STAGE_PARAMS, ParamsError, load_params, processes

    if stage not in STAGE_PARAMS:
        return 1
    try:
        return processes(load_params(stage))
    except ParamsError:
        return 1


def gpus_short(stage: str, nproc: int) -> str | None:
    """Why `nproc` ranks cannot each have a GPU of this machine; None when they can, or when it has
    none (gloo ranks share the CPU)."""
    import torch

    if not torch.cuda.is_available() or nproc <= (count := torch.cuda.device_count()):
        return None
    return (
        f"params/{stage}.yaml: train.processes {nproc} asks for one GPU per process, but this machine has {count} "
        "(CUDA_VISIBLE_DEVICES counts); lower it, or spread the ranks over machines with torchrun's rendezvous "
        "(docs/params.md: the training loop, several processes)"
    )


def run_under_torchrun(stage: str, argv: list[str], nproc: int, started: Callable[[int], None]) -> int:
    """torchrun (of this environment) running `nproc` ranks of the stage; its exit code. torchrun
    is killed when this process goes (parent-death signal), and each rank when this process goes
    (`runtime.lifetime.end_with_starters` watches the process named in LAUNCHER_ENV)."""
    from runtime.invocation import Invocation

    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", str(nproc), "-m", f"flows.{stage}", *argv]
    print(f"stage '{stage}': {nproc} processes under torchrun", file=sys.stderr, flush=True)
    env = {**os.environ, **Invocation.of(os.getpid()).env(LAUNCHER_ENV)}  # what each rank lives by
    return run_child(command, env, started)


def run_child(command: list[str], env: dict[str, str], started: Callable[[int], None]) -> int:
    """`command` in a process group of its own (Ctrl-C on `dvc` reaches it once, through
    `forward_signals`), killed when this process goes; its exit code (128 + N for signal N)."""
    from runtime.lifetime import die_with_parent, forward_signals

    parent = os.getpid()

    def own_group_dying_with_us() -> None:
        os.setpgid(0, 0)
        die_with_parent(parent)

    child = subprocess.Popen(command, env=env, preexec_fn=own_group_dying_with_us)
    started(child.pid)
    forward_signals(child.pid)
    code = child.wait()
    return code if code >= 0 else 128 - code


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m runtime.launch <stage> [args...]")
    stage, argv = sys.argv[1], sys.argv[2:]
    if "WORLD_SIZE" in os.environ:  # a rank of a torchrun someone started: the stage runs here
        sys.argv = [f"flows.{stage}", *argv]
        runpy.run_module(f"flows.{stage}", run_name="__main__", alter_sys=True)
        return
    from runtime.outcome import Supervised

    with Supervised(stage) as supervised:
        supervised.code = run_stage(stage, argv, supervised.started)
    sys.exit(supervised.code)


def run_stage(stage: str, argv: list[str], started: Callable[[int], None]) -> int:
    """Run the stage in a process of its own: torchrun's ranks when its params ask for several, else
    a child of the run's warm host (`runtime.host`) when one can be had, else `python -m flows.<stage>`;
    its exit code."""
    if (nproc := processes_asked(stage)) > 1:
        if reason := gpus_short(stage, nproc):
            print(f"error in stage '{stage}':\n{reason}", file=sys.stderr)
            return 2
        return run_under_torchrun(stage, argv, nproc, started)
    from runtime.invocation import current_invocation

    invocation = current_invocation()
    if os.environ.get(STAGE_HOST_ENV) != "off":
        from runtime.background import UnsafeHelpersDir, start_once
        from runtime.host import run_on_host

        try:
            if invocation is not None and not os.environ.get("PREFECT_API_URL"):
                start_once("prefect", "runtime.server", invocation)  # comes up while the host warms up
            code = run_on_host(stage, argv, invocation, started)
        except UnsafeHelpersDir as err:
            print(f"warning: running stage '{stage}' without the warm host: {err}", file=sys.stderr)
            code = None
        if code is not None:
            return code
    return run_child([sys.executable, "-m", f"flows.{stage}", *argv], dict(os.environ), started)


if __name__ == "__main__":
    main()
