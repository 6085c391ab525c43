"""Where a process computes: its place in a torchrun launch, its device, its autocast and the
memory layout of its convolutional networks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """Read torchrun's RANK/WORLD_SIZE and join the process group (NCCL on GPU, gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not torch_dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            torch_dist.init_process_group(backend)
        return cls(rank, world, local_rank)


def pick_device(dist: Distributed = Distributed()) -> torch.device:
    """CUDA when present (fp32 matmuls on TF32 tensor cores), else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # cuDNN convolutions already default to TF32
        return torch.device("cuda", dist.local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """bf16 autocast: asked for (`bf16`, on any device), or `auto` on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device | str, precision: str = "auto"):
    """bf16 autocast where `uses_bf16` says so (CPU autocast too: `bf16` is never silently fp32);
    a no-op otherwise. `auto` is what sampling, embedding and FID run under."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def channels_last(module: nn.Module) -> nn.Module:
    """The module's 4-D weights in channels-last layout, in place: convolutions then run NHWC
    (oneDNN's fast path on CPU, about 2x here; cuDNN's for tensor cores), and their outputs stay
    NHWC through the network. Other parameters are untouched."""
    return module.to(memory_format=torch.channels_last)
