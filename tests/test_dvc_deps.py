"""dvc.yaml's code deps are exactly the code each stage runs (tests/code_deps.py), so `dvc repro`
reruns exactly the stages a code change touches, and the resume fingerprint, built from the same
list, refuses a checkpoint made by other code."""

from __future__ import annotations

import pytest
import yaml

from tests.code_deps import COMPUTE, stage_code
from tests.conftest import REPO


def listed_code(deps: list[str]) -> set[str]:
    return {dep for dep in deps if dep.endswith(".py")}


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_depends_on_exactly_the_code_it_imports(stage):
    deps = STAGES[stage].get("deps", [])
    code_folders = [dep for dep in deps if dep.split("/")[0] in ("flows", "runtime", *COMPUTE) and not dep.endswith(".py")]
    assert not code_folders, f"dvc.yaml stage '{stage}': list code files one by one, not folders {code_folders}"
    needed, listed = stage_code(REPO, stage), listed_code(deps)
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    problems = [f"dvc.yaml stage '{stage}' misses {file} in its deps: flows/{stage}.py imports it (directly or through other modules)" for file in missing]
    problems += [f"dvc.yaml stage '{stage}' lists {file} in its deps, but it is not code flows/{stage}.py runs "
        "(its own flow and the tasks/ and models/ files it imports; runtime/ is nobody's dep)" for file in extra]
    assert not problems, "\n".join(problems)


def test_the_closure_follows_imports_through_runtime_and_inside_functions(tmp_path):
    for name, text in {
        "flows/a.py": "from runtime.r import x\n",
        "runtime/r.py": "def x():\n    from tasks import t\n",
        "tasks/__init__.py": "",
        "tasks/t.py": "from . import u\nfrom models.m import y\n",
        "tasks/u.py": "",
        "models/m.py": "import numpy\n",
        "models/unused.py": "",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert stage_code(tmp_path, "a") == {"flows/a.py", "tasks/t.py", "tasks/u.py", "models/m.py"}


def test_the_resume_fingerprint_covers_every_code_file_of_the_stage(monkeypatch):
    from runtime.dag import dep_hashes

    monkeypatch.chdir(REPO)
    for stage in STAGES:
        assert stage_code(REPO, stage) <= set(dep_hashes(stage)), stage
