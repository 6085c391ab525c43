"""dvc.yaml's code deps are exactly the code each stage runs (`runtime.code_deps`, written by
`python -m flows deps`), so `dvc repro` reruns exactly the stages a code change touches, and the
resume fingerprint, built from the same list, refuses a checkpoint made by other code."""

from __future__ import annotations

import shutil

import pytest
import yaml

from runtime.code_deps import CODE, generated, stage_code
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_lists_the_code_deps_the_generator_writes():
    assert generated(REPO) == ((REPO / "dvc.yaml").read_text(), []), (
        "dvc.yaml's code deps are stale: run `python -m flows deps`"
    )


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_lists_code_files_not_folders(stage):
    deps = STAGES[stage].get("deps", [])
    code_folders = [dep for dep in deps if dep.split("/")[0] in CODE and not dep.endswith(".py")]
    assert not code_folders, f"dvc.yaml stage '{stage}': list code files one by one, not folders {code_folders}"


def test_deps_rewrites_a_stale_list_in_place_and_check_names_the_stage(tmp_path, monkeypatch, capsys):
    from flows.__main__ import main

    for folder in CODE:
        shutil.copytree(REPO / folder, tmp_path / folder)
    current = (REPO / "dvc.yaml").read_text()
    stale = current.replace("      - models/knn.py\n      - models/probe.py\n", "      - models/probe.py\n      - tasks/gone.py\n", 1)  # the probe stage's (fid lists them too)
    assert stale != current
    (tmp_path / "dvc.yaml").write_text(stale)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as check:
        main(["deps", "--check"])
    assert check.value.code != 0 and "stale for probe:" in capsys.readouterr().err
    assert (tmp_path / "dvc.yaml").read_text() == stale  # --check changes nothing
    main(["deps"])
    assert (tmp_path / "dvc.yaml").read_text() == current  # comments, data deps, outs and plots as they were
    main(["deps", "--check"])


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
