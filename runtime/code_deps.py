"""Each stage's code deps in dvc.yaml, generated: the import closure of flows/<stage>.py over the
project's own modules (found with `ast`, imports inside functions included), kept to
flows/<stage>.py itself and the files under tasks/ and models/ it reaches, also through runtime/
(runtime/ is how a stage is launched and tracked, not what it computes; a package `__init__.py` of
200 bytes or less computes nothing). `python -m flows deps` writes them into dvc.yaml, so `dvc repro`
reruns exactly the stages a code change touches; `--check` names the stages whose list is stale."""

from __future__ import annotations

import ast
import io
from pathlib import Path

COMPUTE = ("tasks", "models")
CODE = ("flows", "runtime", *COMPUTE)  # the project's packages: a .py dep under one of them is code
TINY_INIT = 200  # bytes: a docstring and a noqa import, nothing that computes


def module_file(root: Path, module: str) -> Path | None:
    """The project file of a dotted module name (a module or a package's `__init__.py`), if any."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(root: Path, path: Path) -> set[str]:
    """Every dotted name a file imports (`from a import b` gives `a` and `a.b`), relative imports resolved,
    with the packages they sit in (importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py`)."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}


def import_closure(root: Path, start: Path) -> set[Path]:
    """Every project file that importing `start` runs, `start` included."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += [f for m in imported_modules(root, path) if (f := module_file(root, m)) and f not in seen]
    return seen


def stage_code(root: Path, stage: str) -> set[str]:
    """The code files a stage's deps must list: its flow and the compute files it imports."""
    flow = root / "flows" / f"{stage}.py"
    return {
        path.relative_to(root).as_posix()
        for path in import_closure(root, flow)
        if path == flow
        or (path.relative_to(root).parts[0] in COMPUTE and not (path.name == "__init__.py" and path.stat().st_size <= TINY_INIT))
    }


def ordered(code: set[str]) -> list[str]:
    """Code deps as dvc.yaml lists them: the flow, then tasks/, then models/, each sorted."""
    return sorted(code, key=lambda path: (CODE.index(path.split("/")[0]), path))


def is_code(dep: str) -> bool:
    return dep.endswith(".py") and dep.split("/")[0] in CODE


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, quotes and order stay as they are
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def generated(root: Path) -> tuple[str, list[str]]:
    """dvc.yaml with each stage's code deps as `stage_code` finds them, in place of those it lists
    (where the first of them was; at the top of its deps if none), everything else as it is; and the
    stages whose code deps that changes."""
    yaml = _yaml()
    pipeline = yaml.load((root / "dvc.yaml").read_text())
    stale = []
    for stage, spec in pipeline["stages"].items():
        deps = spec.setdefault("deps", [])
        listed = [dep for dep in deps if is_code(dep)]
        wanted = ordered(stage_code(root, stage))
        if listed == wanted:
            continue
        stale.append(stage)
        at = next((index for index, dep in enumerate(deps) if is_code(dep)), 0)
        for index in reversed(range(len(deps))):
            if is_code(deps[index]):
                del deps[index]
        for offset, dep in enumerate(wanted):
            deps.insert(at + offset, dep)
    text = io.StringIO()
    yaml.dump(pipeline, text)
    return text.getvalue(), stale


def write_code_deps(root: Path) -> list[str]:
    """Rewrite dvc.yaml's code deps (`generated`); the stages whose list changed."""
    text, stale = generated(root)
    if stale:
        (root / "dvc.yaml").write_text(text)
    return stale
