"""Launch wrappers for the MoE backward kernels (``kernels/moe_backward.cu``).

One function per kernel: it picks the dtype variant, the grid and the block,
and types every argument. No checks happen here: callers validate first.
The constants below are the only copy: the source gets them as NVRTC defines
(with the activation codes of :mod:`.kernels`) and refuses to compile without.
"""

from __future__ import annotations

import numpy as np

from ..runtime import nvrtc as _kernels
from .kernels import ACTIVATIONS, MAX_GRID

__all__ = [
    "DEFINES",
    "activation_backward",
    "column_sums",
    "BACKWARD_THREADS",
    "COLSUM_COLS",
    "COLSUM_SLICES",
]

# expert_activation_backward: threads per row (a multiple of 32; the dot
# product of d(topk_weights) is a reduction over them, so this also fixes its
# summation order).
BACKWARD_THREADS = 256
# expert_column_sums: a block of COLSUM_COLS columns x COLSUM_SLICES row slices.
COLSUM_COLS = 32
COLSUM_SLICES = 8

#: NVRTC defines of kernels/moe_backward.cu.
DEFINES: dict[str, dict[str, int]] = {
    "moe_backward": {
        **{f"ACT_{name.upper()}": code for name, code in ACTIVATIONS.items()},
        "COLSUM_COLS": COLSUM_COLS,
        "COLSUM_SLICES": COLSUM_SLICES,
    }
}
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _ptr(array) -> np.intp:
    return np.intp(0 if array is None else array.data.ptr)


def _kernel(name: str, arch: str, dtype):
    name = f"{name}_{_SUFFIX[np.dtype(dtype).name]}"
    return _kernels.get_kernel("moe_backward", name, arch, defines=DEFINES["moe_backward"])


def activation_backward(
    stream, arch, g, h, inter, gated, act, bias1, row_to_pair, ids, weights, dy, bias2, dz, aw, d_weights
) -> None:
    """moe_backward.cu ``expert_activation_backward``: dz, w * a and d(topk_weights), row by row."""
    rows = dz.shape[0]
    kernel = _kernel("expert_activation_backward", arch, g.dtype)
    args = (
        _ptr(g),
        _ptr(h),
        np.int32(inter),
        np.int32(gated),
        np.int32(act),
        _ptr(bias1),
        _ptr(row_to_pair),
        _ptr(ids),
        _ptr(weights),
        _ptr(dy),
        _ptr(bias2),
        np.int32(0 if dy is None else dy.shape[1]),
        np.int32(ids.shape[1]),
        np.int32(rows),
        _ptr(dz),
        _ptr(aw),
        _ptr(d_weights),
    )
    _kernels.launch(stream, kernel, max(1, min(rows, MAX_GRID)), BACKWARD_THREADS, args)


def column_sums(stream, arch, src, row_offsets, counts, row_to_pair, weights, out) -> None:
    """moe_backward.cu ``expert_column_sums``: ``out[e] = sum of (weighted) rows of expert e``."""
    experts, width = out.shape
    kernel = _kernel("expert_column_sums", arch, src.dtype)
    tiles = max(1, min(-(-width // COLSUM_COLS), MAX_GRID))
    args = (
        _ptr(src),
        np.int32(width),
        _ptr(row_offsets),
        _ptr(counts),
        _ptr(row_to_pair),
        _ptr(weights),
        np.int32(experts),
        _ptr(out),
    )
    _kernels.launch(stream, kernel, (tiles, experts), (COLSUM_COLS, COLSUM_SLICES), args)
