"""`python -m flows <command>`: the pipeline's commands beside `dvc repro`.

  profile NAME [--set stage.key=value ...]   write params/*.yaml for a profile (smoke, default, gpu)
"""

from __future__ import annotations

import argparse
import sys

from tasks.errors import StageError
from tasks.params import profile_names, profile_params, set_overrides, write_params


def profile(args: argparse.Namespace) -> None:
    full = set_overrides(profile_params(args.name), args.set)
    changed = write_params(full)
    print(f"profile '{args.name}': " + (f"wrote params/{{{','.join(changed)}}}.yaml" if changed else "params already match"))
    if changed:
        print("next: dvc repro   (or dvc exp run, to keep it as an experiment)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m flows", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True)
    p = commands.add_parser("profile", help="write params/*.yaml for a profile")
    p.add_argument("name", help=f"one of: {', '.join(profile_names())}")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE", help="override one value (repeatable)")
    p.set_defaults(run=profile)
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
