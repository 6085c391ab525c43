"""Where a stage run came from: git commit and dirty flag, DVC hashes of the stage's deps."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state() -> dict[str, str]:
    """Commit and dirty flag of the working tree ('unknown' outside a git checkout)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


def git_tracks(path: str) -> bool:
    """Whether git tracks `path` in this checkout."""
    return _git("ls-files", "--error-unmatch", path) is not None


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_hash(path: Path) -> str:
    """The hash DVC 3 records in dvc.lock: md5 of a file, or md5 of a directory's listing + '.dir'."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    entries = sorted(
        (
            {"md5": md5_file(file), "relpath": file.relative_to(path).as_posix()}
            for file in path.rglob("*")
            if file.is_file() and "__pycache__" not in file.parts  # as .dvcignore says
        ),
        key=lambda entry: entry["relpath"],
    )
    listing = json.dumps(entries, sort_keys=True).encode()
    return hashlib.md5(listing).hexdigest() + ".dir"


def stage_deps(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The deps dvc.yaml lists for a stage (empty when the stage is not there)."""
    if not dvc_yaml.exists():
        return []
    spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    return list(spec.get("stages", {}).get(stage, {}).get("deps", []))


def dep_hashes(stage: str) -> dict[str, str]:
    """`{dep path: DVC hash}` of the stage's deps as they are now."""
    return {dep: dvc_hash(Path(dep)) for dep in stage_deps(stage) if Path(dep).exists()}
