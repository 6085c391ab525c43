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


def write_json(path: Path, data: object) -> None:
    """Write JSON under a temporary name, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


class ArtifactError(StageError):
    """An artifact that does not load (missing, truncated, or from other code); the message names it."""


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
        raise ArtifactError(
            f"{weights} / {config_path.name} do not load ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"rerun the stage that writes {folder}"
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

    def commit(self) -> None:
        """Put every output in place: metrics last, so their presence means a complete stage."""
        for key, final in self._final.items():
            _remove(final)
            os.replace(self._tmp[key], final)
        write_json(metrics_path(self.stage), self.metrics)

    def discard(self) -> None:
        for tmp in self._tmp.values():
            _remove(tmp)
