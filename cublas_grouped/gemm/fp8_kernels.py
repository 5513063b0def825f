"""Launch wrappers of ``kernels/fp8.cu`` (FP8 quantization and dequantization).

No checks happen here: :mod:`.fp8` validates first. :data:`FP8_THREADS` is the
only copy of the block size; the source refuses to compile without it.
"""

from __future__ import annotations

import numpy as np

from ..runtime import launch as _launch
from ..runtime import nvrtc as _nvrtc

__all__ = [
    "FP8_THREADS",
    "DEFINES",
    "quantize",
    "quantize_rows",
    "prepared_quantize_rows",
    "rows_per_warp",
    "dequantize",
]

FP8_THREADS = 256  # threads per block of quantize_fp8 (one block per tile)
DEQUANT_THREADS = 256  # dequantize_fp8 takes any block size: the launcher's choice
# Blocks per launch: both kernels stride over the rest, so this caps the grid
# without limiting the size of what they cover.
MAX_GRID = 1 << 20

# quantize_rows_fp8's vector path: tile pairs one warp loads before it reduces
# any (four 16-byte loads in flight per thread; measured 3-11% faster than one,
# docs/kernel-notes.md, "The row quantizer").
QROWS_PAIRS = 4
#: NVRTC defines of kernels/fp8.cu.
DEFINES: dict[str, int] = {"FP8_THREADS": FP8_THREADS, "QROWS_PAIRS": QROWS_PAIRS}
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _kernel(name: str, arch: str, dtype):
    return _nvrtc.get_kernel("fp8", f"{name}_{_SUFFIX[np.dtype(dtype).name]}", arch, defines=DEFINES)


def _grid(n: int) -> int:
    return max(1, min(n, MAX_GRID))


def quantize(stream, arch, x, batch, rows, cols, tile_rows, tile_cols, scales, q) -> None:
    """``quantize_fp8``: ``x`` [batch, rows, cols] to e4m3 codes ``q`` and one scale per tile."""
    tiles = batch * -(-rows // tile_rows) * -(-cols // tile_cols)
    args = (
        np.intp(x.data.ptr),
        np.int64(batch),
        np.int32(rows),
        np.int32(cols),
        np.int32(tile_rows),
        np.int32(tile_cols),
        np.intp(scales.data.ptr),
        np.intp(q.data.ptr),
    )
    _nvrtc.launch(stream, _kernel("quantize_fp8", arch, x.dtype), _grid(tiles), FP8_THREADS, args)


ROWS_THREADS = 256  # quantize_rows_fp8: 8 warps per block


def rows_per_warp(cols: int, x_ptr: int, q_ptr: int) -> int:
    """1 x 128 tiles one warp of ``quantize_rows_fp8`` takes per pass: 2 *
    QROWS_PAIRS on the kernel's vector path (cols % 8 == 0, x 16-byte and q
    8-byte aligned: 16-byte loads, a half-warp per tile), else one."""
    return 2 * QROWS_PAIRS if cols % 8 == 0 and x_ptr % 16 == 0 and q_ptr % 8 == 0 else 1


def quantize_rows(stream, arch, x, rows, cols, scales, q) -> None:
    """``quantize_rows_fp8``: ``x`` [rows, cols] to e4m3 with one scale per row per
    128 columns (bit for bit ``quantize`` with 1 x 128 tiles)."""
    kernel, grid, args = _rows_launch(arch, x.data.ptr, rows, cols, scales.data.ptr, q.data.ptr, x.dtype)
    _nvrtc.launch(stream, kernel, grid, ROWS_THREADS, args)


def prepared_quantize_rows(arch, x_ptr: int, rows: int, cols: int, scales_ptr: int, q_ptr: int, dtype):
    """:func:`quantize_rows` of the ``dtype`` rows at ``x_ptr`` as a
    :class:`~cublas_grouped.runtime.launch.FixedLaunch` (arguments packed
    once; one slot, x's address: a new x of the same alignment class, since
    the grid depends on it, :func:`rows_per_warp`)."""
    kernel, grid, args = _rows_launch(arch, x_ptr, rows, cols, scales_ptr, q_ptr, dtype)
    label = f"quantize_rows_fp8 (kernels/fp8.cu, {arch})"
    return _launch.FixedLaunch(kernel, grid, ROWS_THREADS, args, slots=(0,), label=label)


def _rows_launch(arch, x_ptr: int, rows: int, cols: int, scales_ptr: int, q_ptr: int, dtype):
    """(kernel, grid, typed arguments) of one ``quantize_rows_fp8`` launch."""
    tiles = rows * -(-cols // 128)
    per_warp = rows_per_warp(cols, x_ptr, q_ptr)
    args = (np.intp(x_ptr), np.int64(rows), np.int32(cols), np.intp(scales_ptr), np.intp(q_ptr))
    grid = _grid(-(-tiles // (per_warp * ROWS_THREADS // 32)))
    return _kernel("quantize_rows_fp8", arch, dtype), grid, args


def dequantize(stream, arch, q, scales, batch, rows, cols, tile_rows, tile_cols, out) -> None:
    """``dequantize_fp8``: e4m3 codes times their tile's scale, into ``out`` (its dtype)."""
    args = (
        np.intp(q.data.ptr),
        np.intp(scales.data.ptr),
        np.int64(batch),
        np.int32(rows),
        np.int32(cols),
        np.int32(tile_rows),
        np.int32(tile_cols),
        np.intp(out.data.ptr),
    )
    _nvrtc.launch(
        stream, _kernel("dequantize_fp8", arch, out.dtype), _grid(batch * rows), DEQUANT_THREADS, args
    )
