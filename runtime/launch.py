"""`python -m runtime.launch <stage>`: what dvc.yaml runs for each stage.

When the stage's params ask for several processes (`train.processes` > 1), it runs them under
`torchrun --standalone --nproc_per_node K -m flows.<stage>` (DistributedDataParallel), passes the
environment on, and exits with torchrun's code. Otherwise, under a pipeline run (a `dvc repro`,
or the pipeline flow) the stage runs in a fresh process forked from the run's warm host
(`runtime.host`), which saves the ~8 s of imports each stage process would spend here; on its
own, under torchrun, or when no host can be had, it runs in this process, exactly as
`python -m flows.<stage>` would. Either way it ends when the `dvc` (or the pipeline flow) it runs
under ends, however that ends (`runtime.lifetime`).
"""

import os
import runpy
import subprocess
import sys
from pathlib import Path

LAUNCHER_ENV = "LATENTLAB_LAUNCHER"  # the launcher a torchrun rank lives by


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
        "(README: Team set-up, multi-GPU stages)"
    )


def run_under_torchrun(stage: str, argv: list[str], nproc: int) -> int:
    """torchrun (of this environment) running `nproc` ranks of the stage; its exit code. torchrun
    is killed when this process goes (parent-death signal), and each rank when this process goes
    (`runtime.stage.main` watches the process named in LAUNCHER_ENV)."""
    from runtime.invocation import Invocation
    from runtime.lifetime import child_dies_with_us

    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", str(nproc), "-m", f"flows.{stage}", *argv]
    print(f"stage '{stage}': {nproc} processes under torchrun", file=sys.stderr, flush=True)
    env = {**os.environ, **Invocation.of(os.getpid()).env(LAUNCHER_ENV)}  # what each rank lives by
    return subprocess.run(command, env=env, **child_dies_with_us()).returncode


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m runtime.launch <stage> [args...]")
    stage, argv = sys.argv[1], sys.argv[2:]
    if "WORLD_SIZE" not in os.environ and (nproc := processes_asked(stage)) > 1:
        if reason := gpus_short(stage, nproc):
            print(f"error in stage '{stage}':\n{reason}", file=sys.stderr)
            sys.exit(2)
        from runtime.invocation import current_invocation, lineage
        from runtime.lifetime import end_with

        if (invocation := current_invocation()) is not None:
            end_with(lineage(invocation), what=f"stage '{stage}'")
        sys.exit(run_under_torchrun(stage, argv, nproc))
    if "WORLD_SIZE" not in os.environ and os.environ.get("LATENTLAB_STAGE_HOST") != "off":
        from runtime.background import UnsafeHelpersDir, start_once
        from runtime.host import run_on_host
        from runtime.invocation import current_invocation, lineage
        from runtime.lifetime import end_with

        invocation = current_invocation()
        if invocation is not None:
            end_with(lineage(invocation), what=f"stage '{stage}'")
        try:
            if invocation is not None and not os.environ.get("PREFECT_API_URL"):
                start_once("prefect", "runtime.server", invocation)  # comes up while the host warms up
            code = run_on_host(stage, argv, invocation)
        except UnsafeHelpersDir as err:
            print(f"warning: running stage '{stage}' without the warm host: {err}", file=sys.stderr)
            code = None
        if code is not None:
            sys.exit(code)
    sys.argv = [f"flows.{stage}", *argv]
    runpy.run_module(f"flows.{stage}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
