"""`python -m runtime.launch <stage>`: what dvc.yaml runs for each stage.

Under a pipeline run (a `dvc repro`, or the pipeline flow) the stage runs in a fresh process
forked from the run's warm host (`runtime.host`), which saves the ~8 s of imports each stage
process would spend here; on its own, under torchrun, or when no host can be had, it runs in this
process, exactly as `python -m flows.<stage>` would. Either way it ends when the `dvc` (or the
pipeline flow) it runs under ends, however that ends (`runtime.lifetime`).
"""

import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m runtime.launch <stage> [args...]")
    stage, argv = sys.argv[1], sys.argv[2:]
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
