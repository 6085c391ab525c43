"""The pipeline as dvc.yaml defines it, asked of dvc.yaml and DVC itself: the stages and their
deps (and those deps' DVC hashes), the order, staleness, and saving the workspace as an experiment."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import yaml

from runtime.lineage import git_tracks
from tasks.artifacts import file_digest

DVC_YAML = Path("dvc.yaml")
DVC_LOCK = Path("dvc.lock")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: dvc.lock in 8 ms instead of 60


def stages(path: Path = DVC_YAML) -> dict[str, dict]:
    """dvc.yaml's stages as written, in file order (or dvc.lock's, given its path); empty when the
    file is not there."""
    if not path.exists():
        return {}
    return (yaml.load(path.read_text(), Loader=LOADER) or {}).get("stages", {})


def stage_deps(stage: str, dvc_yaml: Path = DVC_YAML) -> list[str]:
    """The deps dvc.yaml lists for a stage (empty when the stage is not there)."""
    return list(stages(dvc_yaml).get(stage, {}).get("deps", []))


def stage_outs(stage: str, dvc_yaml: Path = DVC_YAML) -> list[str]:
    """The outs dvc.yaml lists for a stage (its DVC-cached outputs; metrics and plots aside)."""
    return _outs(stages(dvc_yaml).get(stage, {}))


def _outs(stage: dict) -> list[str]:
    return [out if isinstance(out, str) else next(iter(out)) for out in stage.get("outs", [])]


def locked_outs(dvc_lock: Path = DVC_LOCK, dvc_yaml: Path = DVC_YAML) -> dict[str, dict[str, str]]:
    """`{stage: {out path: DVC hash}}` as dvc.lock records them (empty before any `dvc repro`)."""
    defined = stages(dvc_yaml)
    return {
        stage: {out["path"]: out["md5"] for out in entry.get("outs", []) if out["path"] in _outs(defined.get(stage, {}))}
        for stage, entry in stages(dvc_lock).items()
    }


def dvc_hash(path: Path) -> str:
    """The hash DVC 3 records in dvc.lock: md5 of a file, or md5 of a directory's listing + '.dir'."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, "md5")
    entries = sorted(
        (
            {"md5": file_digest(file, "md5"), "relpath": file.relative_to(path).as_posix()}
            for file in path.rglob("*")
            if file.is_file() and "__pycache__" not in file.parts  # as .dvcignore says
        ),
        key=lambda entry: entry["relpath"],
    )
    listing = json.dumps(entries, sort_keys=True).encode()
    return hashlib.md5(listing).hexdigest() + ".dir"


def dep_hashes(stage: str) -> dict[str, str]:
    """`{dep path: DVC hash}` of the stage's deps as they are now."""
    return {dep: dvc_hash(Path(dep)) for dep in stage_deps(stage) if Path(dep).exists()}


def changed_deps(stage: str, before: dict[str, str]) -> list[str]:
    """The deps whose hash differs from `before` (a `dep_hashes` result), appeared or went missing."""
    now = dep_hashes(stage)
    return sorted(dep for dep in set(now) | set(before) if now.get(dep) != before.get(dep))


def restore_outs(stage: str) -> list[str]:
    """Put back the stage's outputs (artifacts, metrics, plots) as dvc.lock records them, where they
    are missing or differ: `dvc repro` removes them before running the stage, so a failed or
    interrupted run would otherwise lose the last good ones; and a run stopped after putting its
    own in place, before its `dvc` recorded them, would leave outputs that dvc.lock does not know.
    Each comes from DVC's cache (where the run cache commits the `cache: false` metrics and plots
    too), else, for a file git keeps, from git's HEAD when its md5 is the one dvc.lock records.
    Returns the paths put back."""
    if not DVC_LOCK.exists():
        return []
    from dvc.repo import Repo

    restored = []
    with Repo() as repo:
        for dvc_stage in repo.stage.collect(stage):
            for out in dvc_stage.outs:
                if not out.hash_info or (out.exists and not out.changed_checksum()):
                    continue
                if _copy_from_cache(out) or _copy_from_git(out):
                    restored.append(out.def_path)
    return restored


def _copy_from_cache(out) -> bool:
    """Copy a DVC output (a file, or a folder listed by a `.dir` object) out of the cache, all or nothing."""
    cached = Path(out.cache.oid_to_path(out.hash_info.value))
    if out.hash_info.isdir:
        if not cached.is_file():
            return False
        files = {entry["relpath"]: Path(out.cache.oid_to_path(entry["md5"])) for entry in json.loads(cached.read_text())}
    else:
        files = {"": cached}
    if not all(source.is_file() for source in files.values()):
        return False
    _put_in_place(Path(out.fs_path), files)
    return True


def _copy_from_git(out) -> bool:
    """Copy a file output out of git's HEAD, if there it has the md5 dvc.lock records."""
    import subprocess

    if out.hash_info.isdir:
        return False
    shown = subprocess.run(["git", "show", f"HEAD:./{out.def_path}"], capture_output=True)
    if shown.returncode != 0 or hashlib.md5(shown.stdout).hexdigest() != out.hash_info.value:
        return False
    _put_in_place(Path(out.fs_path), {"": shown.stdout})
    return True


def _put_in_place(target: Path, files: dict[str, Path | bytes]) -> None:
    """`{relpath: a cached file, or bytes}` at `target` (a file for relpath "", else a folder),
    under a temporary name, then renamed into place (what was there removed). A cached file is
    copied; on a full disk it is hard-linked instead (read-only, as DVC's `hardlink` cache type
    links it), which takes no space."""
    partial = target.with_name(f".{target.name}.restore-{os.getpid()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    for relpath, source in files.items():
        copy = partial / relpath if relpath else partial
        copy.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            copy.write_bytes(source)
            continue
        try:
            shutil.copyfile(source, copy)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            copy.unlink(missing_ok=True)
            os.link(source, copy)
    replaced = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    if target.is_dir() and not target.is_symlink():  # a rename does not replace a folder
        os.rename(target, replaced)
    os.replace(partial, target)
    shutil.rmtree(replaced, ignore_errors=True)


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
    """Save the workspace (params, dvc.lock, outputs) as DVC experiment `name` (`dvc exp show` lists it).

    Every output kept in git (`cache: false`: metrics/, plots/) goes in whole, files git does not
    track yet too, as `dvc exp run` adds its stages' outputs; DVC's save alone would leave them out.
    """
    from dvc.repo import Repo

    with Repo() as repo:
        in_git = [os.path.relpath(out.fs_path, repo.root_dir) for out in repo.index.outs if not out.use_cache]
        untracked = [path for path in in_git if os.path.exists(path)]
        if not git_tracks("dvc.lock"):
            untracked.append("dvc.lock")
        repo.experiments.save(name=name, force=True, include_untracked=untracked)
    return name
