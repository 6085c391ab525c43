"""The pipeline as dvc.yaml defines it, asked of DVC itself: stage order, staleness, the process a
pipeline run belongs to, saving the workspace as an experiment, and the headline metrics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tasks.artifacts import metrics_path, read_json
from tasks.lineage import git_tracks


def stage_order() -> list[str]:
    """dvc.yaml's stages, each after what it depends on (ties in file order)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo() as repo:
        position = {stage.addressing: i for i, stage in enumerate(repo.index.stages)}
        graph = repo.index.graph.reverse()  # DVC's edges point from a stage to its dependencies
        ordered = nx.lexicographical_topological_sort(graph, key=lambda stage: position[stage.addressing])
        return [stage.addressing for stage in ordered]


def is_stale(stage: str) -> bool:
    """Whether `dvc repro` would run the stage now (its deps, params, outs or command changed)."""
    from dvc.repo import Repo

    with Repo() as repo:
        return bool(repo.status(targets=[stage]))


def save_experiment(name: str) -> str:
    """Save the workspace (params, dvc.lock, outputs) as DVC experiment `name` (`dvc exp show` lists it)."""
    from dvc.repo import Repo

    with Repo() as repo:
        untracked = [] if git_tracks("dvc.lock") else ["dvc.lock"]
        repo.experiments.save(name=name, force=True, include_untracked=untracked)
    return name


INVOCATION_ENV = "LATENTLAB_INVOCATION"


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
        import psutil

        try:
            return psutil.Process(self.pid).create_time() == self.started
        except psutil.Error:
            return False

    def env(self) -> dict[str, str]:
        """What hands this invocation to a process that is not its descendant."""
        return {INVOCATION_ENV: f"{self.pid}:{self.started!r}"}

    @classmethod
    def of(cls, pid: int) -> Invocation:
        import psutil

        return cls(pid, psutil.Process(pid).create_time())


def current_invocation() -> Invocation | None:
    """The invocation handed down in the environment, else the nearest ancestor that is `dvc`
    (DVC gives its stages no invocation id); None for a stage run on its own."""
    import psutil

    if handed := os.environ.get(INVOCATION_ENV):
        pid, _, started = handed.partition(":")
        return Invocation(int(pid), float(started))
    for process in psutil.Process().parents():
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        head = command[:3]
        if any(Path(part).name == "dvc" for part in head[:2]) or head[1:3] == ["-m", "dvc"]:
            return Invocation(process.pid, process.create_time())
    return None


def headline_metrics() -> dict[str, float]:
    """probe top-1, FID of the teacher at its most steps and of the 4-step student, where present."""

    def read(stage: str) -> dict[str, float]:
        return read_json(metrics_path(stage)) if metrics_path(stage).exists() else {}

    probe, fid = read("probe"), read("fid")
    headline = {}
    if "probe_top1" in probe:
        headline["probe_top1"] = probe["probe_top1"]
    teacher = {int(key.rpartition("_")[2]): value for key, value in fid.items() if key.startswith("fid.teacher.steps_")}
    if teacher:
        headline["fid_teacher"] = teacher[max(teacher)]
    if "fid.student.steps_4" in fid:
        headline["fid_student_4"] = fid["fid.student.steps_4"]
    return headline
