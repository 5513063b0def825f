"""FP8 expert weights: the e4m3 format with fp32 scales, quantization on the
device, and the dequantizing fallback every entry point runs them through.

Format (docs/fp8.md): values are e4m3fn codes stored as ``uint8`` (CuPy has
no float8 dtype; the byte is the e4m3fn bit pattern, so ``values.view(
ml_dtypes.float8_e4m3fn)`` of a host copy reads them), and ``value = e4m3 *
scale`` (the ``weight_scale_inv`` convention of FP8 checkpoints). Scaling
modes, over each expert's stored matrix ``[R, C]`` (``[K, N]``, or ``[N, K]``
with ``trans_b``):

- ``"block128"``: one scale per 128 x 128 block, scales ``[E, ceil(R/128),
  ceil(C/128)]``; edge blocks of sides that are not multiples of 128 are
  partial and have their own scale. With ``trans_b`` this is the checkpoint
  layout exactly (``weight_scale_inv`` of an ``[N, K]`` weight is
  ``[ceil(N/128), ceil(K/128)]``).
- ``"channel"``: one scale per output channel: ``[E, 1, N]`` for ``[E, K, N]``,
  ``[E, N, 1]`` for ``[E, N, K]``.

How scales are chosen (amax / 448, zero tiles scale 1, saturation, NaN) is
documented in :mod:`cublas_grouped.testing_fp8`, the NumPy twin of the kernels.

Until a Hopper FP8 GEMM exists, ``gmm`` and the MoE layers run FP8 weights by
dequantizing them to the activations' dtype into a scratch array on every
call (:func:`dense_weights`), then running the 16-bit path: correct on every
GPU, slower than 16-bit weights, and the scratch is a full 16-bit copy of the
weights for the duration of the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.arrays import SUPPORTED_DTYPES, as_cupy, view
from ..runtime.device import current_device, device_info, resolve_stream, stream_resources
from ..runtime.nvrtc import arch_for
from . import fp8_kernels as _k

__all__ = [
    "BLOCK",
    "SCALINGS",
    "FP8ExpertWeights",
    "quantize_fp8",
    "quantize_rows_fp8",
    "check_fp8_operand",
    "dense_scratch",
    "dense_weights",
    "is_fp8",
]

BLOCK = 128
SCALINGS = ("block128", "channel")
_INT32 = 2**31


def _check_scaling(scaling) -> str:
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}; got {scaling!r}")
    return scaling


def _tile(scaling: str, trans_b: bool, rows: int, cols: int) -> tuple[int, int]:
    """(tile_rows, tile_cols) over one expert's stored [rows, cols] matrix."""
    if scaling == "block128":
        return BLOCK, BLOCK
    # One scale per output channel: a column of [K, N], a row of [N, K].
    return (1, max(cols, 1)) if trans_b else (max(rows, 1), 1)


def _scale_shape(scaling: str, trans_b: bool, shape) -> tuple[int, int, int]:
    e, rows, cols = shape
    tr, tc = _tile(scaling, trans_b, rows, cols)
    return e, -(-rows // tr), -(-cols // tc)


def _device(v) -> int:
    return current_device() if v.device is None else v.device


def _arch(device: int) -> str:
    return arch_for(device_info(device).sm)


def _float_dtype(dtype, name: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must be one of {supported}; got {dtype}")
    return dtype


@dataclass(frozen=True, eq=False)  # compared by identity: fields are GPU arrays
class FP8ExpertWeights:
    """One projection of every expert in FP8 (e4m3fn) with fp32 scales.

    Attributes
    ----------
    values : GPU array, uint8 [E, K, N] ([E, N, K] with ``trans_b``)
        e4m3fn bit patterns, C-contiguous.
    scales : GPU array, float32
        ``[E, ceil(R/128), ceil(C/128)]`` for ``"block128"`` over the stored
        ``[R, C]``; ``[E, 1, N]`` / ``[E, N, 1]`` for ``"channel"``.
        ``value = e4m3 * scale``.
    scaling : "block128" or "channel"
    trans_b : bool
        The ``nn.Linear`` layout ``[E, N, K]`` (as ``ExpertWeights.trans_b``).
    source_nbytes : int or None
        Bytes of the weights these were quantized from (for :meth:`memory_report`).

    Built by :func:`quantize_fp8`, by the checkpoint loaders of
    :mod:`cublas_grouped.moe.checkpoints`, or directly from arrays (checked
    here, on their interfaces, without GPU work).
    """

    values: object
    scales: object
    scaling: str = "block128"
    trans_b: bool = False
    source_nbytes: int | None = None

    def __post_init__(self):
        _check_scaling(self.scaling)
        v = view(self.values, "values")
        if v.ndim != 3 or v.dtype != np.uint8 or not v.is_c_contiguous():
            raise ValueError(
                f"values must be a C-contiguous uint8 array [E, K, N] of e4m3fn codes; got {v.dtype} {v.shape}"
            )
        s = view(self.scales, "scales")
        want = _scale_shape(self.scaling, self.trans_b, v.shape)
        if s.dtype != np.float32 or s.shape != want or not s.is_c_contiguous():
            raise ValueError(
                f"scales must be a C-contiguous float32 array of shape {want} for {self.scaling!r} "
                f"scaling of values {v.shape} (trans_b={self.trans_b}); got {s.dtype} {s.shape}"
            )
        if v.device is not None and s.device is not None and v.device != s.device:
            raise ValueError(f"values (device {v.device}) and scales (device {s.device}) must share a device")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The stored shape ``[E, K, N]`` (``[E, N, K]`` with ``trans_b``)."""
        return view(self.values, "values").shape

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """K."""
        return self.shape[2] if self.trans_b else self.shape[1]

    @property
    def out_features(self) -> int:
        """N."""
        return self.shape[1] if self.trans_b else self.shape[2]

    @property
    def tile(self) -> tuple[int, int]:
        """(rows, cols) of the stored matrix that one scale covers."""
        return _tile(self.scaling, self.trans_b, *self.shape[1:])

    @property
    def nbytes(self) -> int:
        """GPU bytes of values and scales."""
        return view(self.values, "values").nbytes + view(self.scales, "scales").nbytes

    def memory_report(self) -> str:
        """One line: bytes held, and against the source weights when known."""
        mib = 1 << 20
        v, s = view(self.values, "values").nbytes, view(self.scales, "scales").nbytes
        line = f"FP8 {self.scaling}: {self.nbytes / mib:.2f} MiB (values {v / mib:.2f}, scales {s / mib:.3f})"
        if self.source_nbytes:
            line += f", from {self.source_nbytes / mib:.2f} MiB ({self.nbytes / self.source_nbytes:.3f}x)"
        return line

    def dequantize(self, dtype="bfloat16", *, out=None, stream=None):
        """``e4m3 * scale`` as a CuPy array of ``dtype`` (float32, float16 or
        bfloat16) and the stored shape, on ``stream`` (``None``: the current one).

        ``out``: a C-contiguous array of that shape and dtype to write into.
        """
        import cupy

        dtype = _float_dtype(dtype, "dtype")
        if out is not None:
            o = view(out, "out")
            if o.shape != self.shape or o.dtype != dtype or not o.is_c_contiguous():
                raise ValueError(
                    f"out must be a C-contiguous {dtype} array {self.shape}; got {o.dtype} {o.shape}"
                )
        values, scales = as_cupy(self.values, "values"), as_cupy(self.scales, "scales")
        res = stream_resources(values.device.id, stream)
        with cupy.cuda.Device(res.device_id), res.cupy_stream:
            result = cupy.empty(self.shape, dtype=dtype) if out is None else as_cupy(out, "out")
            e, rows, cols = self.shape
            if result.size:
                _k.dequantize(
                    res.launch_stream, _arch(res.device_id), values, scales, e, rows, cols, *self.tile, result
                )
        return result


def is_fp8(w) -> bool:
    """Whether ``w`` is :class:`FP8ExpertWeights`."""
    return isinstance(w, FP8ExpertWeights)


def _check_sizes(shape, name: str) -> None:
    if shape[-1] >= _INT32 or shape[-2] >= _INT32 or int(np.prod(shape[:-1], dtype=np.int64)) >= _INT32:
        raise ValueError(f"{name} {shape} is too large for the FP8 kernels (int32 rows and columns)")


def quantize_fp8(w, *, scaling: str = "block128", trans_b: bool = False, stream=None) -> FP8ExpertWeights:
    """Quantize expert weights to :class:`FP8ExpertWeights` on the GPU.

    Parameters
    ----------
    w : GPU array [E, K, N] ([E, N, K] with ``trans_b``), float32/float16/bfloat16, C-contiguous
    scaling : "block128" (one scale per 128 x 128 block, the checkpoint format)
        or "channel" (one scale per output channel)
    trans_b : bool
        The layout of ``w``, kept by the result.
    stream : optional; ``None`` is the current stream of ``w``'s device

    Returns
    -------
    FP8ExpertWeights, with ``source_nbytes`` set to ``w``'s bytes. Bad
    arguments raise before any GPU work.
    """
    scaling = _check_scaling(scaling)
    v = view(w, "w")
    if v.ndim != 3 or not v.is_c_contiguous():
        raise ValueError(
            f"w must be a C-contiguous 3-D array [E, K, N] ([E, N, K] with trans_b); got {v.shape}"
        )
    _float_dtype(v.dtype, "w")
    _check_sizes(v.shape, "w")
    import cupy

    res = stream_resources(_device(v), stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        values = cupy.empty(v.shape, dtype=cupy.uint8)
        scales = cupy.empty(_scale_shape(scaling, trans_b, v.shape), dtype=cupy.float32)
        if values.size:  # else there is no tile either
            e, rows, cols = v.shape
            tr, tc = _tile(scaling, trans_b, rows, cols)
            _k.quantize(
                res.launch_stream, _arch(res.device_id), as_cupy(v), e, rows, cols, tr, tc, scales, values
            )
    return FP8ExpertWeights(values, scales, scaling, bool(trans_b), v.nbytes)


def quantize_rows_fp8(x, *, out=None, stream=None):
    """Activations ``x`` [T, K] to e4m3 with one scale per token per 128 columns.

    Returns ``(values, scales)``: uint8 ``[T, K]`` e4m3fn codes and float32
    ``[T, ceil(K / 128)]``, ``x ~= e4m3 * scale`` (the last block of a row
    may be partial); what the FP8 kernel reads as its activations. The scale
    rule is that of :func:`quantize_fp8`.

    ``out``: ``(values, scales)`` of exactly those shapes and dtypes,
    C-contiguous, on ``x``'s device, to write into (and return) instead of
    new arrays: with it the call allocates nothing, so a CUDA graph can
    capture it (the fixed-capacity layer's FP8 step does).
    """
    v = view(x, "x")
    if v.ndim != 2 or not v.is_c_contiguous():
        raise ValueError(f"x must be a C-contiguous 2-D array [T, K]; got {v.shape}")
    _float_dtype(v.dtype, "x")
    _check_sizes(v.shape, "x")
    rows, cols = v.shape
    if out is not None:
        _check_rows_out(out, v)
    import cupy

    res = stream_resources(_device(v), stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        if out is None:
            values = cupy.empty(v.shape, dtype=cupy.uint8)
            scales = cupy.empty((rows, -(-cols // BLOCK)), dtype=cupy.float32)
        else:
            values, scales = as_cupy(out[0], "out[0]"), as_cupy(out[1], "out[1]")
        if values.size:
            _k.quantize_rows(res.launch_stream, _arch(res.device_id), as_cupy(v), rows, cols, scales, values)
    return values, scales


def _check_rows_out(out, v) -> None:
    """``quantize_rows_fp8``'s ``out``: (values uint8 [T, K], scales float32 [T, ceil(K/128)])."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"out must be a pair (values, scales); got {type(out).__name__}")
    rows, cols = v.shape
    wants = (((rows, cols), np.uint8, "values"), ((rows, -(-cols // BLOCK)), np.float32, "scales"))
    for i, (array, (shape, dtype, what)) in enumerate(zip(out, wants)):
        o = view(array, f"out[{i}]")
        if o.shape != shape or o.dtype != dtype or not o.is_c_contiguous():
            raise ValueError(
                f"out[{i}] ({what}) must be a C-contiguous {np.dtype(dtype).name} array {shape}; "
                f"got {o.dtype} {o.shape}"
            )
        if o.device is not None and v.device is not None and o.device != v.device:
            raise ValueError(f"out[{i}] ({what}) is on device {o.device}; x is on device {v.device}")


def check_fp8_operand(w: FP8ExpertWeights, name: str, trans_b: bool, dtype, activations: str) -> None:
    """Refuse FP8 weights ``name`` whose layout is not the call's ``trans_b``, or
    ``activations`` of a dtype they cannot be dequantized to (before GPU work)."""
    if bool(trans_b) != w.trans_b:
        raise ValueError(
            f"{name} are FP8 weights in the {'[E, N, K]' if w.trans_b else '[E, K, N]'} layout "
            f"(trans_b={w.trans_b}); pass trans_b={w.trans_b}"
        )
    _float_dtype(dtype, f"{activations} (multiplied by FP8 weights {name})")


def dense_scratch(w, dtype):
    """``w`` as a CuPy array, or for FP8 weights an uninitialized ``dtype`` array
    of their shape on their device, to dequantize into at every step."""
    if not is_fp8(w):
        return as_cupy(w, "weights")
    import cupy

    with cupy.cuda.Device(as_cupy(w.values, "values").device.id):
        return cupy.empty(w.shape, dtype=dtype)


def dense_weights(w, dtype, stream=None):
    """``w`` itself, or FP8 weights dequantized to ``dtype`` into a fresh array
    on ``stream``: the fallback that runs FP8 weights on the 16-bit GEMMs.

    Costs one read of the FP8 bytes and one write of a full ``dtype`` copy
    per call; the copy is freed (back to CuPy's pool) when the call drops it.
    So it is refused while ``stream`` captures a CUDA graph: a replay would
    read memory the pool has handed on (``FixedCapacityMoE`` keeps its own copy).
    """
    if not is_fp8(w):
        return w
    import cupy

    device = as_cupy(w.values, "values").device.id
    if cupy.cuda.runtime.streamIsCapturing(resolve_stream(stream, device)):
        raise ValueError(
            "FP8 weights cannot run in a CUDA graph capture here: they are dequantized into a per-call "
            "copy that a replay would read after it is freed; capture FixedCapacityMoE, which keeps its own copy"
        )
    return w.dequantize(dtype, stream=stream)
