"""NumPy model of the FP8 (e4m3fn) format and of the library's FP8 kernels.

The twin of ``kernels/fp8.cu``, bit for bit: the same integer arithmetic for
the float32 -> e4m3 conversion, the same float32 operations for the scales,
so GPU tests can compare the kernels' bytes with this model exactly, and CPU
tests can check the model itself against ``ml_dtypes.float8_e4m3fn``. Pure
NumPy; it imports nothing of the package (like :mod:`cublas_grouped.testing`).

The format: e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
infinities; the codes 0x7F and 0xFF are NaN; largest finite 448, smallest
subnormal 2^-9). Conversion to it rounds to nearest, ties to even, and
*saturates*: a finite value or an infinity beyond 448 becomes +-448 (what
Hopper's ``cvt.rn.satfinite`` does; ``ml_dtypes`` gives NaN instead). NaN
stays NaN with its sign.

Block scales: a tile of ``tile_rows x tile_cols`` elements of a matrix gets one
float32 scale, ``amax / 448`` where ``amax`` is the largest finite ``|x|`` of
the tile, raised to at least 2^-126 (the smallest normal float32, so no
quotient overflows for tiny tiles); a tile with no finite non-zero value gets
scale 1. Values are stored as ``e4m3(x / scale)`` (a float32 division), and
read back as ``float32(e4m3) * scale`` (``value = e4m3 * scale``: the
``weight_scale_inv`` convention of FP8 checkpoints). Edge tiles of a matrix
whose sides are not multiples of the tile are partial and have their own scale.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "E4M3_MAX",
    "MIN_SCALE",
    "e4m3_decode",
    "e4m3_encode",
    "tile_scales_ref",
    "quantize_ref",
    "dequantize_ref",
    "grouped_fp8_ref",
]

#: Largest finite e4m3fn value.
E4M3_MAX = 448.0
#: Smallest scale a tile gets (the smallest normal float32).
MIN_SCALE = np.float32(2.0**-126)

_F32_448 = 0x43E00000  # bits of 448.0f: at or above it, saturate
_F32_MIN_NORMAL_E4M3 = 0x3C800000  # bits of 2^-6, the smallest normal e4m3


def e4m3_decode(codes) -> np.ndarray:
    """float32 values of e4m3fn codes (any integer array of bytes); NaN codes give NaN."""
    c = np.asarray(codes).astype(np.uint32) & 0xFF
    exp, man = (c >> 3) & 0xF, c & 7
    normal = (8 + man).astype(np.float64) * np.exp2(exp.astype(np.float64) - 10.0)
    value = np.where(exp == 0, man * 2.0**-9, normal)
    value = np.where((exp == 15) & (man == 7), np.nan, value)
    return np.where(c & 0x80, -value, value).astype(np.float32)


def e4m3_encode(x) -> np.ndarray:
    """e4m3fn codes (uint8) of float32 values: round to nearest even, saturating to
    +-448, NaN to 0x7F / 0xFF. The kernel's ``float_to_e4m3``, step for step."""
    u = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32).astype(np.uint64)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    # Normal e4m3: keep 3 of float32's 23 mantissa bits, rounding to nearest
    # even by adding just under half an ulp plus the lowest kept bit; a carry
    # moves into the exponent. float32's exponent bias 127 is e4m3's 7 + 120.
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal e4m3 (|x| < 2^-6): the code is round(|x| * 2^9) itself. With
    # |x| = mm * 2^(ef - 150), that is mm >> (141 - ef), rounded to even.
    ef = a >> 23
    mm = (a & 0x7FFFFF) | np.where(ef > 0, 0x800000, 0).astype(np.uint64)
    shift = np.minimum(141 - ef.astype(np.int64), 40).astype(np.uint64)
    q = mm >> shift
    rem = mm & ((np.uint64(1) << shift) - np.uint64(1))
    half = np.uint64(1) << (shift - np.uint64(1))
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).astype(np.uint64)
    code = np.where(a >= _F32_MIN_NORMAL_E4M3, normal, q)
    code = np.where(a >= _F32_448, 0x7E, code)  # beyond 448, infinities included: saturate
    code = np.where(a > 0x7F800000, 0x7F, code)  # NaN
    return (sign | code).astype(np.uint8)


def _tiles(shape, tile_rows: int, tile_cols: int) -> tuple[int, int, int]:
    batch, rows, cols = shape
    return batch, -(-rows // tile_rows), -(-cols // tile_cols)


def tile_scales_ref(x, tile_rows: int, tile_cols: int) -> np.ndarray:
    """float32 scales ``[B, ceil(R / tile_rows), ceil(C / tile_cols)]`` of ``x`` [B, R, C]."""
    x32 = np.asarray(x).astype(np.float32)
    if x32.ndim == 2:
        x32 = x32[None]
    batch, tr, tc = _tiles(x32.shape, tile_rows, tile_cols)
    mag = np.abs(x32)
    mag = np.where(np.isfinite(mag), mag, np.float32(0))
    scales = np.empty((batch, tr, tc), dtype=np.float32)
    for i in range(tr):
        for j in range(tc):
            tile = mag[:, i * tile_rows : (i + 1) * tile_rows, j * tile_cols : (j + 1) * tile_cols]
            amax = tile.reshape(batch, -1).max(axis=1) if tile.size else np.zeros(batch, np.float32)
            scale = np.maximum(amax / np.float32(E4M3_MAX), MIN_SCALE)
            scales[:, i, j] = np.where(amax == 0, np.float32(1), scale)
    return scales


def _expand(scales: np.ndarray, shape, tile_rows: int, tile_cols: int) -> np.ndarray:
    """Each element's scale, [B, R, C]."""
    full = np.repeat(np.repeat(scales, tile_rows, axis=1), tile_cols, axis=2)
    return full[:, : shape[1], : shape[2]]


def quantize_ref(x, tile_rows: int, tile_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes uint8 [B, R, C], scales float32)`` of ``x`` [B, R, C] (or [R, C],
    then codes [R, C] and scales [ceil(R/tr), ceil(C/tc)]), as the kernel makes them."""
    x32 = np.asarray(x).astype(np.float32)
    flat = x32[None] if x32.ndim == 2 else x32
    scales = tile_scales_ref(flat, tile_rows, tile_cols)
    with np.errstate(over="ignore", invalid="ignore"):
        codes = e4m3_encode(flat / _expand(scales, flat.shape, tile_rows, tile_cols))
    if x32.ndim == 2:
        return codes[0], scales[0]
    return codes, scales


def dequantize_ref(codes, scales, tile_rows: int, tile_cols: int) -> np.ndarray:
    """float32 ``e4m3 * scale`` per element (the kernel rounds this to its output dtype)."""
    c = np.asarray(codes)
    s = np.asarray(scales, dtype=np.float32)
    if c.ndim == 2:
        return dequantize_ref(c[None], s[None], tile_rows, tile_cols)[0]
    return e4m3_decode(c) * _expand(s, c.shape, tile_rows, tile_cols)


def grouped_fp8_ref(a_codes, a_scales, w_codes, w_scales, sizes) -> np.ndarray:
    """float64 ``out[o_g + r] = A[o_g + r] @ B_g.T`` of the FP8 grouped GEMM:
    ``A`` = activations dequantized (codes ``[M, K]``, one scale per row per 128
    columns ``[M, ceil(K/128)]``), ``B_g`` expert g of weights dequantized
    (codes ``[E, N, K]``, "block128" scales ``[E, ceil(N/128), ceil(K/128)]``).
    ``sizes``: rows per group, summing to M. What the kernel computes, before
    its fp32 accumulation and bf16 rounding."""
    a = dequantize_ref(a_codes, a_scales, 1, 128).astype(np.float64)
    w = dequantize_ref(w_codes, w_scales, 128, 128).astype(np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    out = np.zeros((a.shape[0], w.shape[1]), dtype=np.float64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    for g in range(len(sizes)):
        rows = slice(int(offsets[g]), int(offsets[g + 1]))
        out[rows] = a[rows] @ w[g].T
    return out
