"""The functional grouped GEMM: ``gmm(a, b, group_sizes)``."""

from __future__ import annotations

import threading

from ..runtime.arrays import view
from ..runtime.oom import reports_out_of_memory
from .config import Algorithm, ComputePrecision, GroupedGemmConfig, coerce_enum
from .executor import GroupedGemmExecutor
from .fp8 import dense_weights, is_fp8
from .fp8_gmm import gmm_fp8_weights

__all__ = ["gmm", "shared_executor"]

_executors: dict[tuple, GroupedGemmExecutor] = {}
_lock = threading.Lock()


def shared_executor(compute: ComputePrecision, algorithm: Algorithm) -> GroupedGemmExecutor:
    """The process-wide executor ``gmm`` uses for this compute precision and
    algorithm (also the MoE layer's default).

    Built without a device: each call plans for its own arrays' device, so
    these executors serve every GPU of the process. Thread-safe.
    """
    key = (compute, algorithm)
    executor = _executors.get(key)
    if executor is None:
        with _lock:
            executor = _executors.setdefault(
                key,
                GroupedGemmExecutor(config=GroupedGemmConfig(algorithm=algorithm, compute_precision=compute)),
            )
    return executor


# (shared_executor, its executor for the default arguments): kept with the
# function it came from, so that a replaced shared_executor (tests) is asked again.
_default: tuple = (None, None)


def _default_executor() -> GroupedGemmExecutor:
    global _default
    _default = (shared_executor, shared_executor(ComputePrecision.FP32, Algorithm.AUTO))
    return _default[1]


# (compute, algorithm) as spelled by the caller -> (shared_executor, its executor).
_by_spelling: dict[tuple, tuple] = {}


def _executor_for(compute, algorithm) -> GroupedGemmExecutor:
    precision = coerce_enum(ComputePrecision, compute if compute is not None else "fp32", "compute")
    return shared_executor(precision, coerce_enum(Algorithm, algorithm, "algorithm"))


@reports_out_of_memory("gmm")
def gmm(
    a,
    b,
    group_sizes,
    *,
    trans_a: bool = False,
    trans_b: bool = False,
    out=None,
    compute: ComputePrecision | str | None = None,
    algorithm: Algorithm | str = Algorithm.AUTO,
    stream=None,
):
    """Grouped matrix product with row-major (NumPy) semantics.

    Parameters
    ----------
    a : GPU array [M, K]
        Rows grouped contiguously: group e is ``a[o_e:o_e + m_e]`` with
        ``o_e = sum(group_sizes[:e])``.
    b : GPU array or FP8ExpertWeights
        ``[E, K, N]`` weights (``[E, N, K]``, the ``nn.Linear`` layout, with
        ``trans_b=True``). With ``trans_a=True``: ``[M, N]`` rows grouped like ``a``.
        :class:`~cublas_grouped.FP8ExpertWeights` (not with ``trans_a``;
        ``trans_b`` must be theirs): on an SM 9.0 GPU, with bfloat16 ``a``,
        ``[E, N, K]`` weights (``trans_b=True``) with ``"block128"`` scales,
        K % 16 == 0, N % 8 == 0 and ``algorithm`` "auto" or "sm90_grouped",
        ``a`` is quantized to FP8 per token per 128 columns and our FP8 kernel
        multiplies (device group sizes stay on the device); otherwise they are
        dequantized to ``a``'s dtype into a scratch copy for the call, then
        run like 16-bit weights: correct on every GPU, slower than 16-bit
        weights (docs/fp8.md).
    group_sizes : sequence of int, NumPy array, or GPU integer array, length E
        Rows per group; zeros allowed anywhere; must sum to M. A GPU array is
        copied to the host (cuBLAS takes sizes there), which waits for the
        stream's earlier work: pass host sizes to avoid that synchronization.
        On SM 9.0, where our Hopper kernel takes the call under "auto" or
        "sm90_grouped" (16-bit, K and N multiples of 8, aligned operands),
        GPU sizes stay on the GPU and are not checked: negative sizes count
        as 0, sizes are cut where their sum reaches M (no row at or past M is
        read or written), and rows past a sum short of M are not written.
        ``CUBLAS_GROUPED_CHECK_DEVICE_SIZES=1`` makes "auto" copy and check
        them instead (``gemm/backends/hopper_sizes.py``).
    trans_a : bool
        K-grouped product for weight gradients: ``out[e] = a_e.T @ b_e``,
        ``out`` is ``[E, K, N]``; empty groups give zeros.
    trans_b : bool
        ``b`` is ``[E, N, K]`` and ``b[e].T`` is used.
    out : GPU array, optional
        Result buffer (``[M, N]``, or ``[E, K, N]`` with ``trans_a``), C-contiguous,
        same dtype; allocated when omitted. Never touched if an argument is invalid.
    compute : ComputePrecision or str, optional
        For float32 inputs: "fp32" (default), "tf32", "fp16", "bf16". float16
        and bfloat16 inputs always accumulate in float32.
    algorithm : Algorithm or str
        "auto" (default), "cublas_grouped", "sequential" or "chunked_batched".
        On grouped-contiguous rows, chunked_batched runs groups of at least one chunk as
        equal row chunks (a group's last chunk overlaps its previous one, so
        those rows are computed twice) and smaller groups in one grouped call;
        it is not available with ``trans_a``.
    stream : optional
        ``None`` (CuPy's current stream of the arrays' device), a CuPy or
        ``cuda.core`` stream, any ``__cuda_stream__`` object, or an integer
        ``cudaStream_t``.

    Returns
    -------
    The result array (``out`` when given). Empty products give zeros, never an
    error: M = 0 gives zero rows (``trans_a``: all zeros), K = 0 an ``[M, N]``
    array of zeros (``trans_a``: an empty ``[E, 0, N]``), N = 0 an empty result.

    Notes
    -----
    Runs asynchronously on ``stream``, on the arrays' device (the capabilities
    and tuning table used are that device's); the only synchronization is the
    copy of device-resident ``group_sizes``. Host arrays are refused with ``TypeError``;
    shape, dtype, device and layout errors raise before any GPU work.
    """
    if compute is None and algorithm is Algorithm.AUTO:
        # The common call: no enum coercion, no lookup.
        executor = _default[1] if _default[0] is shared_executor else _default_executor()
    elif type(algorithm) is str and (compute is None or type(compute) is str):
        # Options spelled as strings: their executor by the spelling (a valid one only).
        found = _by_spelling.get((compute, algorithm))
        if found is None or found[0] is not shared_executor:
            found = (shared_executor, _executor_for(compute, algorithm))
            if len(_by_spelling) < 64:
                _by_spelling[(compute, algorithm)] = found
        executor = found[1]
    else:
        executor = _executor_for(compute, algorithm)
    if is_fp8(b):
        # The FP8 kernel (its calls cached as the 16-bit ones are), else the checked fallback.
        result = gmm_fp8_weights(executor, a, b, group_sizes, trans_a, trans_b, out, stream)
        if result is not None:
            return result
        b = dense_weights(b, view(a, "a").dtype, stream)
    return executor.execute(a, b, group_sizes, trans_a=trans_a, trans_b=trans_b, out=out, stream=stream)
