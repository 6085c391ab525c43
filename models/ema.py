"""An exponential moving average of a network's weights, updated with one fused kernel per dtype
group and nothing read back to the host (torch's AveragedModel keeps a step counter on the CPU,
copies it to the device and branches on it at every update)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """`self.module`: a frozen copy of the network whose floating-point parameters and buffers
    (batch-norm statistics too) follow it as ema = decay * ema + (1 - decay) * online; integer
    buffers (counters) are copied. `update(online, decay=0)` copies everything: the first update."""

    def __init__(self, module: nn.Module, decay: float):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(module).requires_grad_(False)
        self.decay = decay

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    @torch.no_grad()
    def update(self, online: nn.Module, decay: float | None = None) -> None:
        decay = self.decay if decay is None else decay
        averaged, current = self._tensors(self.module), self._tensors(online)
        floats = [(a, c.detach()) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        others = [(a, c) for a, c in zip(averaged, current, strict=True) if not a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1 - decay)
        if others:
            torch._foreach_copy_([a for a, _ in others], [c for _, c in others])
