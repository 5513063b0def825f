"""First-GEMM weights with gate and up columns packed in blocks, for the
Hopper kernel's fused activation.

A gated layer's ``w1`` is ``[E, H, 2I]`` with the gate in columns ``[0, I)``
and the up projection in ``[I, 2I)`` (``[E, 2I, H]`` rows with ``trans_b``).
The kernel computes 256 columns per tile; to apply ``act(gate) * up`` before
anything is stored, a tile must hold the gate and the up columns of the same
outputs. :func:`pack_gate_up` reorders the columns once so that block j of
256 holds gate columns ``128j .. 128j + 127`` then up columns
``128j .. 128j + 127`` (``I`` must be a multiple of 128). The product with
packed weights is the same matrix with its columns in that order.
"""

from __future__ import annotations

from ..gemm.backends.hopper import GATE_UP_BLOCK
from ..runtime.arrays import as_cupy, view

__all__ = ["pack_gate_up", "unpack_gate_up", "gate_up_width_error", "GATE_UP_BLOCK"]


def gate_up_width_error(width: int, name: str = "w1") -> str | None:
    """Why a gate|up width ``2I`` cannot be packed in blocks (None if it can):
    it must be a multiple of ``2 * GATE_UP_BLOCK``. ``name`` names the array."""
    if width % (2 * GATE_UP_BLOCK) == 0:
        return None
    return (
        f"{name}'s gate|up width 2I={width} must be a multiple of {2 * GATE_UP_BLOCK} to pack it "
        f"in blocks of {GATE_UP_BLOCK} (I a multiple of {GATE_UP_BLOCK})"
    )


def _blocks(w1, trans_b: bool):
    v = view(w1, "w1")
    if v.ndim != 3 or not v.is_c_contiguous():
        raise ValueError(f"w1 must be a C-contiguous 3-D array; got shape {v.shape}")
    width = v.shape[1] if trans_b else v.shape[2]
    error = gate_up_width_error(width)
    if error:
        raise ValueError(error)
    return v.shape, width // (2 * GATE_UP_BLOCK)


def pack_gate_up(w1, *, trans_b: bool = False):
    """A new array: ``w1`` ([E, H, 2I], or [E, 2I, H] with ``trans_b``) with its
    gate and up columns interleaved in blocks of 128 (the module docstring)."""
    (e, a, b), nb = _blocks(w1, trans_b)
    w = as_cupy(w1, "w1")
    import cupy

    with cupy.cuda.Device(w.device.id):
        if trans_b:  # rows [2, nb, 128] -> [nb, 2, 128]
            return cupy.ascontiguousarray(
                w.reshape(e, 2, nb, GATE_UP_BLOCK, b).transpose(0, 2, 1, 3, 4)
            ).reshape(e, a, b)
        return cupy.ascontiguousarray(w.reshape(e, a, 2, nb, GATE_UP_BLOCK).transpose(0, 1, 3, 2, 4)).reshape(
            e, a, b
        )


def unpack_gate_up(packed, *, trans_b: bool = False):
    """The inverse of :func:`pack_gate_up` (a new array)."""
    (e, a, b), nb = _blocks(packed, trans_b)
    w = as_cupy(packed, "packed")
    import cupy

    with cupy.cuda.Device(w.device.id):
        if trans_b:
            return cupy.ascontiguousarray(
                w.reshape(e, nb, 2, GATE_UP_BLOCK, b).transpose(0, 2, 1, 3, 4)
            ).reshape(e, a, b)
        return cupy.ascontiguousarray(w.reshape(e, a, nb, 2, GATE_UP_BLOCK).transpose(0, 1, 3, 2, 4)).reshape(
            e, a, b
        )
