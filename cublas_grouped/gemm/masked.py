"""The masked fixed-capacity layout: ``gmm_masked(a, b, counts)``.

Each group owns a fixed block of C rows (``a`` is ``[E, C, K]``) of which
only the first ``counts[g]`` are real; ``counts`` stay on the device. This is
the layout expert-parallel dispatch and decode buffers come in: the launch
depends on E and C alone, so a CUDA graph captured once replays with any
counts, and nothing is copied to the host.

Where it runs: on SM 9.0 GPUs our Hopper kernel (bfloat16/float16, K and N
multiples of 8, 16-byte aligned arrays) reads the counts on the device and
spends no tile on rows past them. Anywhere else the product runs as a grouped
GEMM over all C rows of every group (``gmm`` with host sizes of C each): the
same values in the rows that count, more work, still no host copy.
"""

from __future__ import annotations

import numpy as np

from ..runtime.arrays import as_cupy, cuda_dtype, is_host_array, view
from ..runtime.device import resolve_stream, resources
from ..runtime.oom import reports_out_of_memory
from .backends import hopper
from .config import Algorithm, ComputePrecision, coerce_enum
from .gmm import shared_executor

__all__ = ["gmm_masked", "masked_backend"]

# Row indices of the kernel are int32.
_INT32 = 2**31


def masked_backend(sm, dtype, n: int, k: int, pointers, algorithm: Algorithm) -> str:
    """``"sm90_grouped"`` where the Hopper kernel runs this product (``pointers``:
    the addresses of a, b and out), else ``"grouped_all_rows"``."""
    if algorithm not in (Algorithm.AUTO, Algorithm.SM90_GROUPED):
        return "grouped_all_rows"
    if hopper.unsupported_shape(sm, dtype, n, k) is not None or hopper.misaligned(*pointers) is not None:
        return "grouped_all_rows"
    return "sm90_grouped"


def _check(a_v, b_v, counts, trans_b: bool, out):
    """Shapes, dtypes and devices of a masked product; returns (E, C, K, N, out view or None)."""
    cuda_dtype(a_v.dtype, "a")
    if a_v.ndim != 3 or not a_v.is_c_contiguous():
        raise ValueError(f"a must be a C-contiguous [E, C, K] array; got shape {a_v.shape}")
    e, c, k = a_v.shape
    if b_v.ndim != 3 or not b_v.is_c_contiguous() or b_v.shape[0] != e:
        raise ValueError(f"b must be a C-contiguous [E, K, N] array (or [E, N, K] with trans_b) with E={e}")
    if b_v.dtype != a_v.dtype:
        raise ValueError(f"b must have a's dtype {a_v.dtype}; got {b_v.dtype}")
    if b_v.device != a_v.device:
        raise ValueError(f"b is on device {b_v.device} but a on {a_v.device}")
    kb, n = (b_v.shape[2], b_v.shape[1]) if trans_b else (b_v.shape[1], b_v.shape[2])
    if kb != k:
        raise ValueError(f"b's K ({kb}) must equal a's K ({k})")
    if e * c >= _INT32:
        raise ValueError(f"a has E * C = {e * c} rows; the masked layout takes fewer than 2**31")
    if is_host_array(counts):
        host = np.asarray(counts)
        if host.shape != (e,) or host.dtype.kind not in "iu":
            raise ValueError(f"counts must be {e} integers; got {host.dtype} {host.shape}")
    else:
        c_v = view(counts, "counts")
        if c_v.shape != (e,) or c_v.dtype.kind not in "iu":
            raise ValueError(f"counts must be a 1-D integer array of {e}; got {c_v.dtype} {c_v.shape}")
        if c_v.device != a_v.device:
            raise ValueError(f"counts is on device {c_v.device} but a on {a_v.device}")
    if out is None:
        return e, c, k, n, None
    out_v = view(out, "out")
    if out_v.shape != (e, c, n) or out_v.dtype != a_v.dtype or not out_v.is_c_contiguous():
        raise ValueError(
            f"out must be a C-contiguous {a_v.dtype} [{e}, {c}, {n}] array; got {out_v.dtype} {out_v.shape}"
        )
    if out_v.device != a_v.device:
        raise ValueError(f"out is on device {out_v.device} but a on {a_v.device}")
    return e, c, k, n, out_v


@reports_out_of_memory("gmm_masked")
def gmm_masked(a, b, counts, *, trans_b: bool = False, out=None, algorithm="auto", stream=None):
    """Grouped product on the masked fixed-capacity layout.

    ``out[g, r] = a[g, r] @ b[g]`` (``b[g].T`` with ``trans_b``) for every group
    g and row ``r < min(counts[g], C)``.

    Parameters
    ----------
    a : GPU array [E, C, K]
        C rows per group, of which the first ``counts[g]`` are real.
    b : GPU array
        ``[E, K, N]`` weights, or ``[E, N, K]`` with ``trans_b=True``; a's dtype.
    counts : GPU integer array [E], or E host integers
        Rows of each group; values above C count as C, negative ones as 0.
        Read on the device (never copied to the host); host values are uploaded.
    out : GPU array [E, C, N], optional
        C-contiguous, a's dtype; allocated when omitted.
    algorithm : str or Algorithm
        "auto" (default) or "sm90_grouped": the Hopper kernel where it can run;
        any cuBLAS algorithm name: the all-rows grouped GEMM with it.
    stream : optional
        As in :func:`cublas_grouped.gmm`.

    Returns
    -------
    ``out``. Rows at or past ``min(counts[g], C)`` are unspecified: the
    Hopper kernel neither computes nor writes them (they keep what they
    held); the other back ends compute them from a's rows there.
    Argument errors raise before any GPU work.
    """
    a_v, b_v = view(a, "a"), view(b, "b")
    algorithm = coerce_enum(Algorithm, algorithm, "algorithm")
    e, c, k, n, out_v = _check(a_v, b_v, counts, trans_b, out)
    executor = shared_executor(ComputePrecision.FP32, Algorithm.AUTO)
    device_id = a_v.device
    import cupy

    res = resources(device_id, resolve_stream(stream, device_id))
    with cupy.cuda.Device(device_id), res.cupy_stream:
        if out_v is None:
            out = cupy.empty((e, c, n), dtype=a_v.dtype)
            out_v = view(out, "out")
        if out_v.nbytes == 0:
            return out
        sm = executor.info_for(device_id).sm
        pointers = (a_v.ptr, b_v.ptr, out_v.ptr)
        if k and masked_backend(sm, a_v.dtype, n, k, pointers, algorithm) == "sm90_grouped":
            if is_host_array(counts):
                counts_dev = res.upload("masked-counts", np.asarray(counts).astype(np.int32))
            else:
                counts_dev = as_cupy(counts, "counts")
                if counts_dev.dtype != cupy.int32:
                    counts_dev = counts_dev.astype(cupy.int32)
            problem = (e, e * c, n, k, trans_b, a_v.dtype)
            hopper.masked_fixed_capacity(res, problem, pointers, counts_dev, c)
            return out
        # Every row of every group: host sizes of C each, so no copy of the counts.
        # (A forced SM90_GROUPED that cannot run falls back inside, with gmm's warning.)
        executor.execute(
            as_cupy(a, "a").reshape(e * c, k),
            b,
            np.full(e, c, dtype=np.int64),
            trans_b=trans_b,
            out=as_cupy(out, "out").reshape(e * c, n),
            stream=stream,
            algorithm=algorithm,
        )
    return out
