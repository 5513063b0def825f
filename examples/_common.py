"""Shared bits of the examples: GPU check with a clear message, random MoE weights."""

from __future__ import annotations

import sys

import numpy as np


def require_gpu() -> None:
    """Exit with a message (not a traceback) when no NVIDIA GPU is usable."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return
    except Exception as exc:  # no driver, no CuPy, no device
        reason = str(exc).splitlines()[0]
    else:
        reason = "no device found"
    sys.exit(f"This example needs an NVIDIA GPU with CUDA ({reason}).")


def random_layer(rng, experts, hidden, inter, dtype, gated=True):
    """Random x-independent weights scaled like a trained layer (std 1/sqrt(fan_in))."""
    import cupy

    width = 2 * inter if gated else inter
    w1 = (rng.standard_normal((experts, hidden, width), dtype=np.float32) / np.sqrt(hidden)).astype(dtype)
    w2 = (rng.standard_normal((experts, inter, hidden), dtype=np.float32) / np.sqrt(inter)).astype(dtype)
    return cupy.asarray(w1), cupy.asarray(w2)
