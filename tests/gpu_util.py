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


def wait_for_current_stream(*streams):
    """Make each of ``streams`` wait, on the device, for the work queued so far
    on CuPy's current stream (outside any ``with stream:``, the legacy null
    stream); returns nothing and blocks nothing on the host.

    Test data is made on the current stream: ``cupy.asarray`` of host data
    (:func:`device_random`, the routing helpers) is an asynchronous copy
    through pinned memory there, and ``fill`` (:func:`poisoned`),
    arithmetic, ``astype`` and copies are kernels there. A
    ``cupy.cuda.Stream(non_blocking=True)`` does not synchronize with the
    legacy null stream, so work queued on it (a graph launched on it
    included) may read such an array before it is written: on a loaded GPU
    it reads what the pool's block held before, often an earlier step's
    data. Call this after making the inputs and before queuing work on
    ``streams`` that reads them (or make the inputs inside ``with stream:``).
    Keep such arrays referenced until that work is done: CuPy's pool hands a
    freed block on to the next allocation on the stream that allocated it,
    without waiting for other streams."""
    import cupy

    event = cupy.cuda.get_current_stream().record()
    for stream in streams:
        stream.wait_event(event)


def check_close(out, ref, tol, what=""):
    import cupy

    host = cupy.asnumpy(out).astype(np.float64)
    assert not np.isnan(host).any(), f"{what}: {int(np.isnan(host).sum())} elements never written"
    err = rel_error(host, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"
    return err


GUARD_VALUE = 7.0  # exact in every float type; a buffer's elements around a view keep it


def one_element_in(which: str, a, b, out):
    """(a, b, out, buffer): the same operands, but ``which`` ("a", "b" or
    "out") replaced by a C-contiguous copy (for out: a NaN-filled view) that
    starts one element into a buffer of GUARD_VALUE, so 2 or 4 bytes past a
    16-byte boundary; ``buffer`` is that buffer for out, else None."""
    import cupy

    x = {"a": a, "b": b, "out": out}[which]
    count = int(np.prod(x.shape))
    buf = cupy.full(count + 16, GUARD_VALUE, dtype=x.dtype)
    view = buf[1 : 1 + count].reshape(x.shape)
    if which == "out":
        view.fill(np.nan)
        return a, b, view, buf
    view[...] = x
    return (view, b, out, None) if which == "a" else (a, view, out, None)


def guard_intact(buf, count: int) -> bool:
    """Whether the elements of ``buf`` around its one-element-in view of
    ``count`` elements still hold GUARD_VALUE."""
    host = buf.get().astype(np.float64)
    return bool(host[0] == GUARD_VALUE and (host[1 + count :] == GUARD_VALUE).all())


def guarded_rows(shape, dtype):
    """(buffer, out): a NaN-filled ``[M, N]`` output with a row of GUARD_VALUE
    before and after it in one buffer, so a write one row past either end
    shows (:func:`guard_rows_intact`)."""
    import cupy

    m, n = shape
    buf = cupy.full(((m + 2) * n,), GUARD_VALUE, dtype=dtype)
    out = buf[n : (m + 1) * n].reshape(m, n)
    out.fill(np.nan)
    return buf, out


def guard_rows_intact(buf, n: int) -> bool:
    """Whether the guard rows of a :func:`guarded_rows` buffer of rows of ``n`` still hold GUARD_VALUE."""
    host = buf.get().astype(np.float64)
    return bool((host[:n] == GUARD_VALUE).all() and (host[-n:] == GUARD_VALUE).all())
