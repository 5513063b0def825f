"""Helpers for GPU tests: random data, NaN-poisoned outputs, error checks."""

from __future__ import annotations

import numpy as np

from cublas_grouped.testing import rel_error

# Relative Frobenius error allowed against a float64 reference, per input dtype
# (and compute precision for float32).
TOLERANCE = {"float32": 1e-5, "tf32": 2e-3, "float16": 1e-2, "bfloat16": 1e-2}


def random_sizes(rng, num_groups: int, total: int, zero_fraction: float = 0.25) -> np.ndarray:
    """Row counts summing to ``total`` with some groups forced empty."""
    weights = rng.random(num_groups)
    weights[rng.random(num_groups) < zero_fraction] = 0
    if weights.sum() == 0:
        weights[rng.integers(num_groups)] = 1
    sizes = np.floor(weights / weights.sum() * total).astype(np.int64)
    sizes[np.argmax(weights)] += total - sizes.sum()
    return sizes


def device_random(rng, shape, dtype, scale=1.0):
    """Random normal data on the GPU (host copy kept as the float64 truth)."""
    import cupy

    host = (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)
    return cupy.asarray(host), host.astype(np.float64)


def poisoned(shape, dtype):
    """An output buffer full of NaN: any element not written shows up."""
    import cupy

    out = cupy.empty(shape, dtype=dtype)
    out.fill(np.nan)
    return out


def check_close(out, ref, tol, what=""):
    import cupy

    host = cupy.asnumpy(out).astype(np.float64)
    assert not np.isnan(host).any(), f"{what}: {int(np.isnan(host).sum())} elements never written"
    err = rel_error(host, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"
    return err
