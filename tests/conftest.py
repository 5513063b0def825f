"""Shared fixtures: GPU detection, fake GPU arrays for argument checks without a GPU."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest


def _gpu_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


HAS_GPU = _gpu_count() > 0

# AUTO measures shapes no table covers and stores them in the user's tuning
# folder: keep a test run's measurements out of the user's cache (and out of
# the next run).
os.environ.setdefault("CUBLAS_GROUPED_TUNING_DIR", tempfile.mkdtemp(prefix="cublas_grouped_tuning_"))
# JAX takes 75% of the GPU's memory at its first use unless told not to; the
# interop tests import it in the same process as every other GPU test (and the
# subprocesses they start inherit this).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

if HAS_GPU and os.environ.get("CUBLAS_GROUPED_TEST_NO_POOL") == "1":
    # Under compute-sanitizer: with CuPy's pool, a write past an array lands in
    # memory the pool owns and memcheck cannot see it.
    import cupy

    cupy.cuda.set_allocator(None)


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class FakeGpuArray:
    """Exposes __cuda_array_interface__ with a made-up device pointer.

    Argument checks read only this interface, so every error path can be
    tested without a GPU; any attempt to touch the memory would crash, which
    is exactly what the checks must prevent.
    """

    def __init__(self, shape, dtype=np.float32, ptr=0x7F0000000000, strides=None, device=0):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._ptr = ptr
        self._strides = strides
        self.device = type("Dev", (), {"id": device})()

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self._ptr, False),
            "strides": self._strides,
            "version": 3,
        }


@pytest.fixture
def fake():
    return FakeGpuArray
