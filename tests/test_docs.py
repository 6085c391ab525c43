"""The docs keep up with the code: every typed param, Makefile target and `python -m flows` command
is documented, the params tables name only keys that exist, and the site builds with no warnings."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from flows.__main__ import parser
from tasks.params import STAGE_PARAMS, TrainParams

ROOT = Path(__file__).resolve().parents[1]
PARAMS_PAGE = ROOT / "docs" / "params.md"
TRAINING_LOOP = "The training loop"


def sections(page: Path) -> dict[str, str]:
    """The page's `## ` sections by heading, code blocks dropped (a `#` comment there is no heading)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def stage_section(stage: str) -> str:
    found = [body for heading, body in sections(PARAMS_PAGE).items() if f"`params/{stage}.yaml`" in heading]
    assert len(found) == 1, f"docs/params.md: expected one `## `params/{stage}.yaml`` section, found {len(found)}"
    return found[0]


def code_spans(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def keys(model: type[BaseModel], prefix: str = "") -> tuple[list[str], list[str]]:
    """(the model's documented paths, its `train` blocks' paths): a leaf or an empty section is a
    path; a section's keys are its own; a training loop is `<path>.*`, its keys on the loop's section."""
    paths, loops = [], []
    for name, field in model.model_fields.items():
        path = prefix + name
        sub = field.annotation
        if sub is TrainParams:
            loops.append(path)
        elif isinstance(sub, type) and issubclass(sub, BaseModel) and sub.model_fields:
            more, more_loops = keys(sub, path + ".")
            paths += more
            loops += more_loops
        else:
            paths.append(path)
    return paths, loops


@pytest.mark.parametrize("stage", list(STAGE_PARAMS))
def test_every_param_of_a_stage_is_documented(stage):
    spans = code_spans(stage_section(stage))
    paths, loops = keys(STAGE_PARAMS[stage])
    missing = [path for path in paths if path not in spans] + [f"{loop}.*" for loop in loops if f"{loop}.*" not in spans]
    assert not missing, f"docs/params.md, `params/{stage}.yaml`: undocumented {missing}"


def test_every_training_loop_key_is_documented():
    (loop,) = [body for heading, body in sections(PARAMS_PAGE).items() if heading.startswith(TRAINING_LOOP)]
    missing = [name for name in TrainParams.model_fields if name not in code_spans(loop)]
    assert not missing, f"docs/params.md, {TRAINING_LOOP}: undocumented {missing}"


@pytest.mark.parametrize("stage", list(STAGE_PARAMS))
def test_the_params_tables_name_only_real_keys(stage):
    """The first column of each `| key |` table names keys of the stage's model."""
    paths, loops = keys(STAGE_PARAMS[stage])
    real = set(paths) | {f"{loop}.*" for loop in loops}
    named, in_key_table = set(), False
    for line in stage_section(stage).splitlines():
        in_key_table = line.startswith("|") and (in_key_table or line.startswith("| key |"))
        if in_key_table and not line.startswith(("| key |", "|---")):
            named |= code_spans(line.split("|")[1])
    assert named, f"docs/params.md, `params/{stage}.yaml`: no key table"
    assert not named - real, f"docs/params.md, `params/{stage}.yaml`: no such key {sorted(named - real)}"


def documentation() -> str:
    return "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def test_every_make_target_and_flows_command_is_documented():
    text = documentation()
    targets = re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M)
    assert {"repro", "test", "docs"} <= set(targets)
    commands = []
    (sub,) = [action for action in parser()._actions if action.dest == "command"]
    for name, command in sub.choices.items():
        nested = [action for action in command._actions if action.dest == "action"]
        commands += [f"flows {name} {action}" for action in nested[0].choices] if nested else [f"flows {name}"]
    assert len(commands) > 5
    missing = [f"make {t}" for t in targets if f"make {t}" not in text] + [c for c in commands if f"python -m {c}" not in text]
    assert not missing, f"not in README.md or docs/: {missing}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is a dev dependency: pip install -e '.[dev]'")
def test_the_site_builds_with_no_warnings(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the README's links into docs/ (which mkdocs does not check): each page there, each anchor one of its headings
    links = re.findall(r"\]\(docs/([\w-]+)\.md(?:#([\w-]+))?\)", (ROOT / "README.md").read_text())
    assert len(links) > 5
    for page, anchor in links:
        built = tmp_path / "site" / ("" if page == "index" else page) / "index.html"
        assert built.is_file(), f"README.md links to docs/{page}.md, which is not in the site"
        assert not anchor or f'id="{anchor}"' in built.read_text(), f"README.md: docs/{page}.md has no heading #{anchor}"
