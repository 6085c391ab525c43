"""`python -m flows <command>`: the pipeline's commands beside `dvc repro`.

  profile NAME [--set KEY=VALUE ...]   write params/*.yaml for a profile (smoke, default, gpu)
  run [--profile NAME] [--set ...]     the pipeline as one Prefect flow run (+ an MLflow parent run)
  serve --cron "0 3 * * *"             serve the pipeline as a Prefect deployment on that schedule
  compare [-n 10] [--csv FILE]         the last pipeline runs from MLflow: differing params, metrics
  sweep ssl.objective=all [KEY=V1,V2]  queue a grid as DVC experiments (`dvc queue start` runs them)
  rank [--csv FILE] [--plot FILE]      the finished experiments ranked by probe top-1, with baselines
  team up|down|deploy|worker|push      the team set-up: shared servers, work pool, workers, DVC remote
  bench [--profile NAME ...] [--json F] each training stage's speed on this device (torch only)
  deps [--check]                       write each stage's code deps into dvc.yaml (--check: fail if stale)

KEY=VALUE is `stage.key=value` or DVC's `params/<stage>.yaml:key=value`.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import suppress
from pathlib import Path
from typing import get_args

from runtime import team as team_setup
from runtime.profiles import profile_names, profile_params, set_overrides, write_params
from tasks.errors import StageError
from tasks.params import STAGE_PARAMS


def profile(args: argparse.Namespace) -> None:
    full = set_overrides(profile_params(args.name), args.set)
    changed = write_params(full)
    print(f"profile '{args.name}': " + (f"wrote params/{{{','.join(changed)}}}.yaml" if changed else "params already match"))
    if changed:
        print("next: dvc repro   (or dvc exp run, to keep it as an experiment)")


def _pipeline_parameters(args: argparse.Namespace) -> dict:
    chosen = {
        "profile": args.profile, "source": args.source, "ssl_objective": args.ssl_objective,
        "diffusion_formulation": args.diffusion_formulation, "overrides": args.set or None,
    }
    return {key: value for key, value in chosen.items() if value is not None}


def run(args: argparse.Namespace) -> None:
    from flows.pipeline import pipeline
    from runtime.server import own_api

    with own_api():  # the configured Prefect API, else a `prefect server start` for as long as the command runs
        state = pipeline(**_pipeline_parameters(args), return_state=True)
    if state.is_failed():  # its reason is in the run's log above
        sys.exit(f"pipeline failed: flow run '{state.state_details.flow_run_id}'")


def serve(args: argparse.Namespace) -> None:
    """The pipeline as deployment `pipeline/<name>` on a cron schedule, its runs executed here, until
    SIGTERM (the runs in progress end Cancelled) or Ctrl-C (they end Crashed); the schedule is then
    paused."""
    import asyncio

    from prefect.runner import Runner
    from prefect.settings import get_current_settings

    from flows.pipeline import pipeline

    if not get_current_settings().api.url:
        raise StageError(
            "serve needs a Prefect server: run `prefect server start` in another terminal, then\n"
            "  export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )

    class StopsOnSigterm(Runner):
        def handle_sigterm(self, *args) -> None:
            """Stop as `Runner.astop` does: cancel the runs in progress, then stop polling. (Prefect
            3.8's own handler calls the async `stop` without awaiting it, then waits for the runs.)"""
            loop = asyncio.get_running_loop()
            loop.call_soon_threadsafe(loop.create_task, self.stop_once_started())

        async def stop_once_started(self) -> None:
            """`start` installs the handler before it has started (its `astop` then refuses): a
            SIGTERM that early waits for the start instead of being lost."""
            while not self.started:
                await asyncio.sleep(0.1)
            await self.astop()

    runner = StopsOnSigterm(name=args.name)
    deployment_id = runner.add_flow(pipeline, name=args.name, cron=args.cron, parameters=_pipeline_parameters(args))
    ui = get_current_settings().ui_url
    print(f"serving deployment 'pipeline/{args.name}' on '{args.cron}'; run it now from {ui}/deployments/deployment/"
          f"{deployment_id} (Run > Custom run) or with: prefect deployment run 'pipeline/{args.name}'", flush=True)
    with suppress(KeyboardInterrupt):
        asyncio.run(runner.start())
    print(f"serve stopped; the schedule of 'pipeline/{args.name}' is paused until it is served again")


def compare(args: argparse.Namespace) -> None:
    import pandas as pd

    from runtime.compare import pipeline_runs
    from runtime.tracking import tracking_uri, ui_url

    try:
        table = pipeline_runs(args.last, args.sort)
    except ValueError as err:
        raise StageError(str(err)) from None
    if table.empty:
        print("no pipeline runs in MLflow yet: run `dvc repro` or `python -m flows run`")
        return
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    print(f"in `mlflow ui --backend-store-uri {tracking_uri()}`: {ui_url()}")
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


def sweep(args: argparse.Namespace) -> None:
    from runtime.sweep import queue

    queue(args.axes, args.target, args.start)


def rank(args: argparse.Namespace) -> None:
    from runtime.sweep import experiments, ranking, show

    show(ranking(experiments(), args.by), args.csv, args.plot, args.by)


def team(args: argparse.Namespace) -> None:
    if args.action == "up":
        team_setup.up(args.state, args.prefect_port, args.mlflow_port, args.mlflow_host)
    elif args.action == "down":
        team_setup.down(args.state)
    elif args.action == "deploy":
        team_setup.deploy(args.pool)
    elif args.action == "worker":
        team_setup.worker(args.pool)
    else:
        team_setup.push(args.remote)


def bench(args: argparse.Namespace) -> None:
    """Torch and the compute dependencies only: this path imports no Prefect, MLflow or DVC."""
    import json

    import torch

    from tasks.bench import HEADER, run_bench, table
    from tasks.device import pick_device
    from tasks.params import validate

    profiles = {
        name: {stage: validate(stage, values) for stage, values in profile_params(name).items()}
        for name in args.profile or ["default", "gpu"]
    }
    device = torch.device(args.device) if args.device else pick_device()
    print(HEADER.replace("Trainer", "Trainer/s").replace("bare", "bare/s"))
    result = run_bench(
        profiles, device, args.variants.split(","), warmup=args.warmup, steps=args.steps, batch_size=args.batch_size
    )
    print("\n" + table(result))
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


def deps(args: argparse.Namespace) -> None:
    """dvc.yaml's code deps from the stages' imports (`runtime.code_deps`)."""
    from runtime.code_deps import generated, write_code_deps

    root = Path.cwd()
    if args.check:
        if stale := generated(root)[1]:
            raise StageError(f"dvc.yaml's code deps are stale for {', '.join(stale)}: run `python -m flows deps`")
        print("dvc.yaml's code deps are current")
        return
    stale = write_code_deps(root)
    print(f"dvc.yaml: wrote the code deps of {', '.join(stale)}" if stale else "dvc.yaml's code deps are current")


def _add_pipeline_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--profile", choices=profile_names(), help="rewrite params/*.yaml from a profile first")
    for option, field in (("--source", "prepare.source"), ("--ssl-objective", "ssl.objective"),
                          ("--diffusion-formulation", "diffusion.formulation")):
        stage, _, key = field.partition(".")
        command.add_argument(option, choices=get_args(STAGE_PARAMS[stage].model_fields[key].annotation), help=field)
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one value (repeatable)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m flows", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True)

    p = commands.add_parser("profile", help="write params/*.yaml for a profile")
    p.add_argument("name", help=f"one of: {', '.join(profile_names())}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one value (repeatable)")
    p.set_defaults(run=profile)

    p = commands.add_parser("run", help="run the pipeline as one Prefect flow run")
    _add_pipeline_options(p)
    p.set_defaults(run=run)

    p = commands.add_parser("serve", help="serve the pipeline on a cron schedule (needs PREFECT_API_URL)")
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *"')
    p.add_argument("--name", default="scheduled", help="deployment name")
    _add_pipeline_options(p)
    p.set_defaults(run=serve)

    p = commands.add_parser("compare", help="the last pipeline runs from MLflow")
    p.add_argument("-n", "--last", type=int, default=10, help="how many runs (newest first before sorting)")
    p.add_argument("--sort", default="fid_student_4", help="headline metric to sort by (best first)")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.set_defaults(run=compare)

    p = commands.add_parser("sweep", help="queue a grid of params as DVC experiments")
    p.add_argument("axes", nargs="+", metavar="KEY=V1,V2", help="a value list per key; ssl.objective=all is every objective")
    p.add_argument("--target", default="probe", help="the stage each experiment reproduces, with what it needs (default: %(default)s)")
    p.add_argument("--start", action="store_true", help="then `dvc queue start` (one experiment at a time)")
    p.set_defaults(run=sweep)

    p = commands.add_parser("rank", help="the finished DVC experiments ranked, with the probe's baselines")
    p.add_argument("--by", default="probe_top1", help="column to rank by (default: %(default)s)")
    p.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    p.add_argument("--plot", type=Path, help="also draw it as bars to this PNG")
    p.set_defaults(run=rank)

    p = commands.add_parser("team", help="the team set-up (docs/team.md)")
    team_actions = p.add_subparsers(dest="action", required=True)
    t = team_actions.add_parser("up", help="start a Prefect server, an MLflow server and a worker here, for a try-out")
    t.add_argument("--prefect-port", type=int, default=4200)
    t.add_argument("--mlflow-port", type=int, default=5000)
    t.add_argument("--mlflow-host", default=team_setup.HOST,
                   help="address the MLflow server listens on (default: %(default)s, this machine only: it has no authentication)")
    t = team_actions.add_parser("down", help="stop what `team up` started (the stores stay)")
    for t in team_actions.choices.values():
        t.add_argument("--state", type=Path, default=team_setup.default_state_dir(), help="pids, logs and stores (default: %(default)s)")
    t = team_actions.add_parser("deploy", help="create the work pool and register prefect.yaml's deployments (needs PREFECT_API_URL)")
    t.add_argument("--pool", default=team_setup.POOL)
    t = team_actions.add_parser("worker", help="run the pool's flow runs in this checkout, one at a time (needs PREFECT_API_URL)")
    t.add_argument("--pool", default=team_setup.POOL)
    t = team_actions.add_parser("push", help="dvc push, with the run cache's metrics and plots")
    t.add_argument("-r", "--remote", help="DVC remote (default: the default remote)")
    p.set_defaults(run=team)


    p = commands.add_parser("bench", help="each training stage's speed on this device, against its peak")
    p.add_argument("--profile", action="append", choices=profile_names(), help="model sizes (repeatable; default: default and gpu)")
    p.add_argument("--variants", default="defaults,bf16,compile,channels_last",
                   help="comma-separated: defaults, and bf16 / compile / channels_last each flipped from them")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    p.add_argument("--batch-size", type=int, help="override every stage's batch (default: the profile's)")
    p.add_argument("--device", help="cuda, cpu, ... (default: the pipeline's choice)")
    p.add_argument("--json", default="bench.json", help="where to write the results")
    p.set_defaults(run=bench)

    p = commands.add_parser("deps", help="write each stage's code deps (its import closure) into dvc.yaml")
    p.add_argument("--check", action="store_true", help="change nothing; exit non-zero naming the stale stages")
    p.set_defaults(run=deps)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
