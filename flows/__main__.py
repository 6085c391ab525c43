"""`python -m flows <command>`: the pipeline's commands beside `dvc repro`.

  profile NAME [--set KEY=VALUE ...]   write params/*.yaml for a profile (smoke, default, gpu)
  run [--profile NAME] [--set ...]     the pipeline as one Prefect flow run (+ an MLflow parent run)
  serve --cron "0 3 * * *"             serve the pipeline as a Prefect deployment on that schedule
  compare [-n 10] [--csv FILE]         the last pipeline runs from MLflow: differing params, metrics
  bench [--profile NAME ...] [--json F] each training stage's speed on this device (torch only)

KEY=VALUE is `stage.key=value` or DVC's `params/<stage>.yaml:key=value`.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from runtime.profiles import profile_names, profile_params, set_overrides, write_params
from tasks.errors import StageError


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


def _prefect_api():
    """The configured Prefect API, else a `prefect server start` for as long as the command runs."""
    from prefect.settings import get_current_settings

    from runtime.server import prefect_server

    return nullcontext(get_current_settings().api.url) if get_current_settings().api.url else prefect_server()


def run(args: argparse.Namespace) -> None:
    from flows.pipeline import pipeline
    from runtime.server import use_api

    with _prefect_api() as api_url:
        use_api(api_url)
        state = pipeline(**_pipeline_parameters(args), return_state=True)
    if state.is_failed():
        print(f"pipeline failed: {state.message}", file=sys.stderr)
        sys.exit(1)


def serve(args: argparse.Namespace) -> None:
    from prefect.settings import get_current_settings

    from flows.pipeline import pipeline

    if not get_current_settings().api.url:
        raise StageError(
            "serve needs a Prefect server: run `prefect server start` in another terminal, then\n"
            "  export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    pipeline.serve(name=args.name, cron=args.cron, parameters=_pipeline_parameters(args))


def compare(args: argparse.Namespace) -> None:
    import pandas as pd

    from runtime.compare import pipeline_runs

    try:
        table = pipeline_runs(args.last, args.sort)
    except ValueError as err:
        raise StageError(str(err)) from None
    if table.empty:
        print("no pipeline runs in MLflow yet: run `dvc repro` or `python -m flows run`")
        return
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


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


def _add_pipeline_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--profile", choices=profile_names(), help="rewrite params/*.yaml from a profile first")
    command.add_argument("--source", help="prepare.source")
    command.add_argument("--ssl-objective", help="ssl.objective")
    command.add_argument("--diffusion-formulation", help="diffusion.formulation")
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
