"""``gmm`` with FP8 weights on the FP8 Hopper kernel: which calls it takes, the
stream's buffer of quantized activations, and the call cache's entries for
such calls, whose three launches (the row quantizer, the offsets kernel, the
FP8 GEMM) are prepared once and replayed.

Where an eager call's host time went before (Qwen3-30B-A3B's expert GEMMs:
E = 128, K = 2048 and N = 1536, or K = 768 and N = 2048, 16 or 64 tokens x 8;
the GPU side stubbed, ``tests/host_stubs.py``, on a development CPU): 528
Python and C calls with device sizes, 548-552 with host sizes, about 220-240
us, for three launches. A profile of the device-size call: the argument checks
of ``gmm`` (a stand-in view of the dense weights, the plan) about a fifth;
``grouped_fp8``'s own checks of the quantized rows it had just made another
fifth; its launch path (three tensor maps looked up, a dozen NumPy scalars,
the kernel looked up by its defines) a quarter; the quantizer's launcher
(its checks, two fresh arrays) a sixth; 22 array views per call among all of
them. The GEMM's launch went through ``cuda.core``, about 11 us more on the
GPU machine's host (``runtime/launch.py``), and both fresh arrays came from
CuPy's pool. A hit of the cache now skips all of that (see
:data:`CALL_BUDGET` in ``tests/test_fp8_gmm_host.py`` for its calls).
"""

from __future__ import annotations

import numpy as np

from ..runtime.arrays import BFLOAT16, ArrayView, cupy_array_type, is_host_array, view
from ..runtime.device import current_device, device_info, resolve_stream, resources, stream_resources
from ..runtime.nvrtc import arch_for
from . import call_cache as _cache
from . import fp8_kernels as _q
from .backends import hopper, hopper_fp8
from .backends.hopper_device import offsets_launch
from .backends.hopper_sizes import READ_DTYPES
from .config import Algorithm
from .fp8 import BLOCK, check_fp8_operand, is_fp8, quantize_rows_fp8
from .plan import host_group_sizes, plan_gmm

__all__ = [
    "ROWS_BUFFER",
    "stream_rows",
    "stream_rows_layout",
    "gmm_fp8",
    "kernel_takes",
    "check_fp8_call",
    "fp8_kernel_runs",
    "gmm_fp8_weights",
    "PreparedFP8Call",
    "MAX_PREPARED_OPERANDS",
]

# The stream's buffer of quantized activations: codes, then the scales at
# the next 16 bytes.
ROWS_BUFFER = "fp8-rows"


def stream_rows_layout(m: int, k: int) -> tuple[int, int]:
    """(offset of the scales, bytes in all) of :func:`stream_rows` for ``m`` rows of ``k``."""
    offset = -(-m * k // hopper_fp8.ALIGNMENT) * hopper_fp8.ALIGNMENT
    return offset, offset + 4 * m * -(-k // BLOCK)


def stream_rows(res, m: int, k: int):
    """(codes uint8 [m, k], scales float32 [m, ceil(k/128)]): views of
    ``res``'s buffer of quantized activations, which every FP8 ``gmm`` call
    on that stream reuses instead of allocating its own (grown, never
    shrunk: ``StreamResources.buffer``).

    Why that is safe: the buffer belongs to one stream (and thread); a call
    queues its quantization, then the GEMM that reads it, and the next call's
    quantization is queued behind that GEMM on the same stream, so it cannot
    overwrite rows still to be read. Calls on other streams have buffers of
    their own, so concurrent streams never share one (and a call's output,
    the caller's ``out`` or a fresh array, is never this buffer). When a
    larger call grows it, the old memory goes back to CuPy's pool, which
    hands it out again only behind the work already queued on this stream.
    A stream that is capturing a CUDA graph does not take this path
    (:func:`kernel_takes`): a replay would read the buffer after later
    calls had refilled or moved it."""
    import cupy

    offset, nbytes = stream_rows_layout(m, k)
    buf = res.buffer(ROWS_BUFFER, nbytes)
    codes = buf[: m * k].reshape(m, k)
    return codes, buf[offset:nbytes].view(cupy.float32).reshape(m, -(-k // BLOCK))


def gmm_fp8(a, weights, group_sizes, *, out=None, stream=None):
    """``gmm(a, weights, group_sizes, trans_b=True)`` for bfloat16 ``a`` [M, K]
    through the FP8 kernel, unprepared: ``a`` quantized per token per 128
    columns (:func:`~cublas_grouped.gemm.fp8.quantize_rows_fp8`, on the device)
    into the stream's buffer (:func:`stream_rows`), then
    :func:`~.backends.hopper_fp8.grouped_fp8`. The caller (``gmm``, the MoE
    layer) checked the arguments and that the kernel takes them."""
    a_v = view(a, "a")
    res = stream_resources(a_v.device if a_v.device is not None else current_device(), stream)
    a_q, a_scales = quantize_rows_fp8(a, out=stream_rows(res, *a_v.shape), stream=stream)
    return hopper_fp8.grouped_fp8(a_q, a_scales, weights, group_sizes, out=out, stream=stream)


def kernel_takes(weights, dtype, device: int, algorithm, stream=None, out_ptr: int = 0) -> bool:
    """Whether ``gmm`` or the MoE layer runs ``dtype`` activations times
    ``weights`` through the FP8 kernel on ``device``: ``algorithm`` AUTO or
    SM90_GROUPED, what ``hopper_fp8.unsupported`` accepts, 16-byte aligned
    weight values (and ``out``, when given), and a stream that is not
    capturing a CUDA graph (see :func:`stream_rows`). Anything else keeps the
    dequantizing fallback, which refuses capture itself."""
    import cupy

    if Algorithm(algorithm) not in (Algorithm.AUTO, Algorithm.SM90_GROUPED) or not is_fp8(weights):
        return False
    if hopper_fp8.unsupported(device_info(device).sm, weights, dtype) is not None:
        return False
    if hopper_fp8.misaligned(view(weights.values, "weights.values").ptr, out_ptr) is not None:
        return False
    return not cupy.cuda.runtime.streamIsCapturing(resolve_stream(stream, device))


def check_fp8_call(executor, a, b, group_sizes, trans_a, trans_b, out) -> ArrayView:
    """The checks ``execute`` would make of a call with FP8 weights ``b`` (run
    here on a stand-in of the dense weights), so a bad call fails before any GPU
    work, whichever path then runs it; returns ``a``'s view."""
    if trans_a:
        raise ValueError("b cannot be FP8 weights with trans_a=True: b then holds rows [M, N], not weights")
    if executor.config.algorithm is Algorithm.PADDED_STRIDED:
        raise ValueError("algorithm=PADDED_STRIDED needs the MoE layer's padded rows; gmm does not take it")
    a_v = view(a, "a")
    check_fp8_operand(b, "b", trans_b, a_v.dtype, "a")
    values = view(b.values, "b.values")
    stand_in = ArrayView(values.ptr, values.shape, values.strides, a_v.dtype, values.device, None)
    sizes = host_group_sizes(group_sizes, b.num_experts) if is_host_array(group_sizes) else None
    if sizes is None:
        sizes_v = view(group_sizes, "group_sizes")
        if sizes_v.ndim != 1 or sizes_v.dtype.kind not in "iu" or sizes_v.shape[0] != b.num_experts:
            raise ValueError(
                f"group_sizes must be a 1-D integer array of {b.num_experts}; got {sizes_v.dtype} {sizes_v.shape}"
            )
    executor._check_out(out, plan_gmm(a_v, stand_in, sizes, trans_a=False, trans_b=trans_b), a_v)
    executor._check_dtype_supported(a_v.dtype, a_v.device if a_v.device is not None else executor.device_id)
    return a_v


def fp8_kernel_runs(executor, a_v: ArrayView, b, out, stream) -> bool:
    """Whether the FP8 kernel takes this (checked) call (:func:`kernel_takes`;
    ``a`` is read by the quantization at any alignment; its FP8 copy is
    aligned)."""
    if not a_v.is_c_contiguous():  # quantize_rows_fp8 reads whole C-contiguous rows
        return False
    device = a_v.device if a_v.device is not None else current_device()
    out_ptr = 0 if out is None else view(out, "out").ptr
    return kernel_takes(b, a_v.dtype, device, executor.config.algorithm, stream, out_ptr)


def gmm_fp8_weights(executor, a, b, group_sizes, trans_a, trans_b, out, stream):
    """``gmm`` with FP8 weights ``b``: the result where the FP8 kernel runs
    the call, or None where the dequantizing fallback is to (the caller runs
    it; the checks have passed).

    A call the call cache can key (CuPy ``a``, ``out``, values and scales;
    NumPy or CuPy sizes; see ``call_cache``) and that passed every check is
    kept with its :class:`PreparedFP8Call`; a later call with the same key
    only asks whether its stream is capturing (then the checked path, which
    refuses it) and replays the prepared launches. The key: ``call_cache``'s
    for ``a``, ``b.values``, ``out``, the sizes, the stream, the executor,
    with the scales' shape, strides, dtype, alignment and device, the
    scaling and the layout in its algorithm field."""
    import cupy

    key, handle = _key(executor, a, b, group_sizes, trans_a, trans_b, out, stream)
    if key is not None:
        entry = _cache.lookup(key, executor.config)
        if entry is not None and not cupy.cuda.runtime.streamIsCapturing(handle):
            return _run_cached(entry, handle, stream is None, a, b, group_sizes, out)
    a_v = check_fp8_call(executor, a, b, group_sizes, trans_a, trans_b, out)
    if not fp8_kernel_runs(executor, a_v, b, out, stream):
        return None
    (m, k), n = a_v.shape, b.out_features
    if key is None or 0 in (m, n, k):  # not cacheable, or nothing to multiply: the unprepared path
        return gmm_fp8(a, b, group_sizes, out=out, stream=stream)
    device = a_v.device
    host = host_group_sizes(group_sizes, b.num_experts) if is_host_array(group_sizes) else None
    res = resources(device, handle)
    with cupy.cuda.Device(device), res.cupy_stream:
        prepared = PreparedFP8Call(res, b.shape, m, host)
    entry = _cache.CachedCall(
        executor.config, _cache.RUN, dtype=BFLOAT16, device_id=device, out_shape=(m, n), prepared=prepared
    )
    entry.device_sizes = host is None
    _cache.store(key, entry)
    return _run_cached(entry, handle, stream is None, a, b, group_sizes, out)


def _key(executor, a, b, group_sizes, trans_a, trans_b, out, stream):
    """``call_cache.call_key`` of the call with ``b.values`` as ``b`` and what
    else the checks read of ``b`` as the algorithm: (None, None) where any
    of it is not a CuPy array."""
    nd = cupy_array_type()
    scales = b.scales
    if type(b.values) is not nd or type(scales) is not nd:
        return None, None
    s_key = (scales.shape, scales.strides, scales.dtype, scales.data.ptr & 15, scales.data.device_id)
    tag = ("fp8", s_key, b.scaling, b.trans_b)
    return _cache.call_key(executor, a, b.values, group_sizes, trans_a, trans_b, out, stream, tag)


def _run_cached(entry, handle: int, current: bool, a, b, group_sizes, out):
    """A stored call's GPU work on its device and stream (made current unless they are)."""
    import cupy

    res = resources(entry.device_id, handle)
    if current and cupy.cuda.runtime.getDevice() == entry.device_id:
        return _launch(entry, res, a, b, group_sizes, out)
    with cupy.cuda.Device(entry.device_id), res.cupy_stream:
        return _launch(entry, res, a, b, group_sizes, out)


def _launch(entry, res, a, b, group_sizes, out):
    import cupy

    if out is None:
        out = cupy.ndarray(entry.out_shape, BFLOAT16)
    entry.prepared(res, a.data.ptr, b, group_sizes if entry.device_sizes else None, out.data.ptr)
    return out


# Operand sets kept per entry (then started over): a decode loop reuses one.
MAX_PREPARED_OPERANDS = 16


class PreparedFP8Call:
    """The FP8 kernel's path for one checked call shape, prepared:
    ``(res, a, weights, sizes_dev, out)`` queues what :func:`gmm_fp8` would
    (the same three kernels with the same arguments) as three
    :class:`~cublas_grouped.runtime.launch.FixedLaunch` calls: the row
    quantizer (x's address in its slot) into the stream's buffer
    (:func:`stream_rows`), the offsets kernel (the sizes' address in its
    slot), the FP8 GEMM (``out``'s).

    The launches hold the addresses of the weights' values and scales, of the
    stream's row and schedule buffers, and depend on the sizes' dtype and on
    ``hopper_fp8.launch_choice`` (a probe's defines and thresholds): they are
    kept by exactly those, looked up on every call (new weights, a grown
    buffer or a changed define prepare anew). Host sizes (``host_sizes``,
    checked) are uploaded once into this object's own int32 copy: the call
    cache keys them by every value, so they never change for an entry."""

    def __init__(self, res, shape, m: int, host_sizes=None):
        import cupy

        self.shape, self.m = tuple(shape), int(m)
        self.sizes = None
        if host_sizes is not None:
            host = np.ascontiguousarray(host_sizes, dtype=np.int32)
            self.sizes = cupy.empty(host.shape, dtype=np.int32)
            res.copy_to_device(self.sizes.data.ptr, host)  # on the call's stream, before its launches
        self.launches: dict = {}

    def __call__(self, res, a: int, weights, sizes_dev, out: int) -> None:
        e, _, k = self.shape
        m = self.m
        sizes = self.sizes if sizes_dev is None else sizes_dev
        if sizes.dtype not in READ_DTYPES:
            sizes = sizes.astype(np.int64)  # int8/16, unsigned: a cast kernel first, as schedule_offsets does
        offset, nbytes = stream_rows_layout(m, k)
        rows = res.buffers.get(ROWS_BUFFER)
        if rows is None or rows.nbytes < nbytes:
            rows = res.buffer(ROWS_BUFFER, nbytes)
        base = hopper.schedule_base(res, e)
        operands = (weights.values.data.ptr, weights.scales.data.ptr, rows.data.ptr, base)
        key = (*operands, sizes.dtype, res.device_id, hopper_fp8.launch_choice(m, e))
        launches = self.launches.get(key)
        if launches is None:
            if len(self.launches) >= MAX_PREPARED_OPERANDS:
                self.launches.clear()
            launches = self.launches[key] = self._prepare(
                res, a, weights, sizes.dtype, rows.data.ptr, offset, base
            )
        quantize, scan, gemm = launches
        stream = res.stream
        quantize(stream, a)
        scan(stream, sizes.data.ptr)
        gemm(stream, out)

    def _prepare(self, res, a: int, weights, dtype, rows: int, offset: int, base: int):
        """(quantize, scan, gemm): ``a`` is any x of this entry (the call
        cache keys its address mod 16, which the quantizer's grid depends on)."""
        e, _, k = self.shape
        arch = arch_for(device_info(res.device_id).sm)
        quantize = _q.prepared_quantize_rows(arch, a, self.m, k, rows + offset, rows, BFLOAT16)
        scan = offsets_launch(e, self.m, base, dtype)
        gemm = hopper_fp8.prepared_fp8_gemm(res.device_id, weights, self.m, (rows, rows + offset), base)
        return quantize, scan, gemm
