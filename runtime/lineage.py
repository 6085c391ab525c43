"""Where a run came from: the git commit and dirty flag of the checkout."""

from __future__ import annotations

import subprocess


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
