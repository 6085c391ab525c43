"""Stage outputs: artifacts/<stage>/, metrics/<stage>.json and plots/<stage>/, written atomically.

A stage writes into temporary siblings of its output roots; only when it succeeds are they
renamed into place, so a failed or killed stage leaves no half-written output behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
PLOTS = Path("plots")
CHECKPOINTS = Path("checkpoints")


def artifacts_dir(stage: str) -> Path:
    """Where a stage's DVC-tracked outputs live (what later stages read)."""
    return ARTIFACTS / stage


def metrics_path(stage: str) -> Path:
    return METRICS / f"{stage}.json"


def plots_dir(stage: str) -> Path:
    return PLOTS / stage


def checkpoint_path(stage: str) -> Path:
    """Resumable training state: outside DVC's outs, so DVC does not delete it before a rerun."""
    return CHECKPOINTS / stage / "state.pt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: object) -> None:
    """Write JSON under a temporary name, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class StageOutputs:
    """The temporary output roots of one stage run; `commit()` renames them into place.

    Write files under `.artifacts` and `.plots`, and put the stage's metrics in `.metrics`.
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.metrics: dict[str, object] = {}
        self._final = {"artifacts": artifacts_dir(stage), "plots": plots_dir(stage)}
        self._tmp = {key: path.with_name(f".{path.name}.tmp") for key, path in self._final.items()}
        for tmp in self._tmp.values():
            _remove(tmp)  # left behind by a killed run
            tmp.mkdir(parents=True)

    @property
    def artifacts(self) -> Path:
        return self._tmp["artifacts"]

    @property
    def plots(self) -> Path:
        return self._tmp["plots"]

    def commit(self) -> None:
        """Put every output in place: metrics last, so their presence means a complete stage."""
        for key, final in self._final.items():
            _remove(final)
            os.replace(self._tmp[key], final)
        write_json(metrics_path(self.stage), self.metrics)

    def discard(self) -> None:
        for tmp in self._tmp.values():
            _remove(tmp)
