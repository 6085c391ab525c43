"""Metrics at the precision they were measured with: no float noise in metrics/<stage>.json."""

from __future__ import annotations

import numpy as np


def without_float_noise(metrics: dict[str, float | int]) -> dict[str, float | int]:
    """`metrics` with every float as the shortest decimal that float32 reads back the same: what a
    float32 measurement resolves (0.8666666746139526 -> 0.8666667, -0.07499999999999996 -> -0.075,
    30.107458114624023 -> 30.107458). Ints, and floats already that short, are kept as they are."""
    return {key: float(str(np.float32(value))) if isinstance(value, float) else value for key, value in metrics.items()}
