"""The code a stage runs: the import closure of flows/<stage>.py over the project's own modules (found
with `ast`, imports inside functions included), kept to flows/<stage>.py itself and the files under
tasks/ and models/ it reaches, also through runtime/ (runtime/ is how a stage is launched and
tracked, not what it computes; a package `__init__.py` of 200 bytes or less computes nothing)."""

from __future__ import annotations

import ast
from pathlib import Path

COMPUTE = ("tasks", "models")
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
