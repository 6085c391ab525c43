"""The process a pipeline run belongs to: a `dvc repro` (or `dvc exp run`), or the pipeline flow."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from runtime.env import INVOCATION_ENV


@dataclass(frozen=True)
class Invocation:
    """The process a pipeline run belongs to (a `dvc repro` or `dvc exp run`, or the pipeline
    flow): what the shared Prefect server, the stage host and the MLflow parent run are keyed on."""

    pid: int
    started: float  # epoch seconds

    @property
    def key(self) -> str:
        return f"{self.pid}-{self.started:.2f}"

    def alive(self) -> bool:
        """Still running (a zombie, killed but not yet reaped, is not)."""
        import psutil

        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.started and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def env(self, name: str = INVOCATION_ENV) -> dict[str, str]:
        """What hands this invocation to a process that is not its descendant."""
        return {name: f"{self.pid}:{self.started!r}"}

    @classmethod
    def handed(cls, name: str = INVOCATION_ENV) -> Invocation | None:
        """The process handed down in the environment variable `name` (by `env`); None without one."""
        if not (handed := os.environ.get(name)):
            return None
        pid, _, started = handed.partition(":")
        return cls(int(pid), float(started))

    @classmethod
    def of(cls, pid: int) -> Invocation:
        import psutil

        return cls(pid, psutil.Process(pid).create_time())


def lineage(invocation: Invocation) -> list[Invocation]:
    """The processes a stage process lives by: its ancestors up to and including `invocation`
    (the shell and `dvc` between them, under the pipeline flow), or just `invocation` when it is no
    ancestor (a stage forked by the warm host)."""
    import psutil

    chain = []
    for process in psutil.Process().parents():
        try:
            chain.append(Invocation(process.pid, process.create_time()))
        except psutil.Error:
            break
        if chain[-1] == invocation:
            return chain
    return [invocation]


def current_invocation() -> Invocation | None:
    """The invocation handed down in the environment, else the nearest ancestor that is `dvc`
    (DVC gives its stages no invocation id); None for a stage run on its own."""
    import psutil

    if (handed := Invocation.handed()) is not None:
        return handed
    for process in psutil.Process().parents():
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        head = command[:3]
        if any(Path(part).name == "dvc" for part in head[:2]) or head[1:3] == ["-m", "dvc"]:
            return Invocation(process.pid, process.create_time())
    return None
