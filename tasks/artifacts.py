"""Stage outputs: artifacts/<stage>/, metrics/<stage>.json and plots/<stage>/, written atomically.

A stage writes into temporary siblings of its output roots; only when it succeeds are they
renamed into place, so a failed or killed stage leaves no half-written output behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tasks.device import channels_last
from tasks.errors import StageError

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


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (`sha256`, or `md5` where a published checksum or DVC uses it)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def without_float_noise(metrics: dict[str, float | int]) -> dict[str, float | int]:
    """`metrics` with every float as the shortest decimal that float32 reads back the same: what a
    float32 measurement resolves (0.8666666746139526 -> 0.8666667, -0.07499999999999996 -> -0.075,
    30.107458114624023 -> 30.107458). Ints, and floats already that short, are kept as they are."""
    return {key: float(str(np.float32(value))) if isinstance(value, float) else value for key, value in metrics.items()}


def write_json(path: Path, data: object) -> None:
    """Write JSON under a temporary name, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class ArtifactError(StageError):
    """An artifact that does not load (missing, truncated, or from other code); the message names it."""


def unreadable(path: Path | str, problem: str) -> ArtifactError:
    """The error for a file the pipeline wrote that does not read back: names it, and for a stage's
    artifact how to get a good one back."""
    path = Path(path)
    parts = path.parts
    if len(parts) > 2 and parts[0] == ARTIFACTS.name:
        return ArtifactError(
            f"{path}: {problem}; `dvc repro {parts[1]}` puts back (or rebuilds) what the {parts[1]} stage wrote"
        )
    return ArtifactError(f"{path}: {problem}")


def read_json(path: Path | str, keys: tuple[str, ...] = ()) -> dict:
    """A JSON mapping the pipeline wrote, holding at least `keys`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise unreadable(path, "missing") from None
    except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8
        raise unreadable(path, f"not readable JSON ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(data, dict):
        raise unreadable(path, f"expected a JSON mapping, found {type(data).__name__}")
    if missing := [key for key in keys if key not in data]:
        raise unreadable(path, f"missing key(s) {', '.join(missing)}")
    return data


def read_array(path: Path | str, ndim: int, kinds: str) -> np.ndarray:
    """A .npy array the pipeline wrote (never unpickled), with `ndim` dimensions and a dtype of one of
    numpy's `kinds` (e.g. "u" unsigned, "i" signed, "f" float)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise unreadable(path, "missing") from None
    except (OSError, ValueError, EOFError) as err:  # truncated, not .npy, object arrays
        raise unreadable(path, f"not a readable .npy array ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(array, np.ndarray) or array.ndim != ndim or array.dtype.kind not in kinds:
        found = f"{array.ndim}-D {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
        raise unreadable(path, f"expected a {ndim}-D array of kind {kinds!r}, found {found}")
    return array


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients, convolutions in channels-last layout: how every trained network
    is handed on (and run: embedding, decoding, sampling, FID)."""
    module.requires_grad_(False)
    return channels_last(module).eval()


def save_network(module: nn.Module, config: dict, folder: Path, name: str) -> None:
    """`<name>.safetensors` (the weights) and `<name>.json` (what `load_network` rebuilds it from)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in module.state_dict().items()}, folder / f"{name}.safetensors")
    write_json(folder / f"{name}.json", config)


def load_network(
    folder: Path | str, name: str, build: Callable[[dict], nn.Module], device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict]:
    """The frozen network `build(config)` with the saved weights, and its config. Nothing is unpickled."""
    weights, config_path = Path(folder) / f"{name}.safetensors", Path(folder) / f"{name}.json"
    try:
        config = read_json(config_path)
        module = build(config)
        module.load_state_dict(load_file(weights, device=str(device)))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as err:
        raise unreadable(
            weights, f"does not load with {config_path.name} ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from err
    return freeze(module.to(device)), config


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

    def staged(self, final: Path) -> Path:
        """Where the output root `final` (artifacts/<stage> or plots/<stage>) is written until `commit`."""
        return {path: self._tmp[key] for key, path in self._final.items()}[Path(final)]

    def commit(self) -> None:
        """Put every output in place: metrics last, so their presence means a complete stage."""
        for key, final in self._final.items():
            _remove(final)
            os.replace(self._tmp[key], final)
        write_json(metrics_path(self.stage), self.metrics)

    def discard(self) -> None:
        for tmp in self._tmp.values():
            _remove(tmp)
