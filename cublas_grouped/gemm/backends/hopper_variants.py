"""The compiled variants of the Hopper kernel beyond its plain product, and
the defines that select them (``kernels/grouped_gemm_sm90.cu``'s header):

- :class:`GatedEpilogue` (v9, ``SM90_EPILOGUE_ACT``): the first expert GEMM's
  gated activation in the epilogue;
- :class:`RowGather` (v11, ``SM90_GATHER_A``): a's rows read through an index
  array (``a[r] = x[src[r] // top_k]``), so no gathered copy of the tokens is
  written. The load warpgroup copies them into the stage with cp.async in the
  layout TMA's 128-byte swizzle gives; :func:`swizzle_128b_offset` is that
  layout's model on the host (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GatedEpilogue", "RowGather", "variant_defines", "swizzle_128b_offset"]


@dataclass(frozen=True)
class GatedEpilogue:
    """The first expert GEMM's activation in the kernel's epilogue (v9):
    ``out = act(gate + bias) * (up + bias)`` from the fp32 accumulators, with
    the weights' gate and up columns packed in blocks of ``hopper.GATE_UP_BLOCK``
    (the kernel source's header). ``act``: the activation's code,
    ``codes``: every code by define name (``ACT_SILU`` ...), which the kernel
    is compiled with; ``bias``: the address of a ``[E, 2I]`` bias in the plain
    order, or 0."""

    act: int
    codes: tuple[tuple[str, int], ...]
    bias: int = 0


@dataclass(frozen=True)
class RowGather:
    """a's rows gathered inside the GEMM (v11): row ``r`` of the grouped rows
    is ``x[src[r] // top_k]``, zeros where ``src[r] < 0`` or that row is ``>=
    rows``. ``src``: the address of an int32 ``[M]`` on the device (the MoE
    step's ``row_to_pair``, with ``top_k`` its k: each row's token);
    ``rows``: x's rows (T). x itself (``[rows, K]``, 16-byte aligned) is the
    launch's a address, which changes from call to call (a slot of the
    prepared launch)."""

    src: int
    top_k: int
    rows: int

    def __post_init__(self):
        if not self.src:
            raise ValueError("gather: src must be the address of an int32 [M] array on the device; got 0")
        if self.top_k < 1:
            raise ValueError(f"gather: top_k must be at least 1; got {self.top_k}")
        if self.rows < 0:
            raise ValueError(f"gather: rows (of x) must not be negative; got {self.rows}")


def variant_defines(defines: dict, epilogue: GatedEpilogue | None, gather: RowGather | None) -> dict:
    """``defines`` (the plain kernel's) with those of ``epilogue`` and ``gather``."""
    if epilogue is None and gather is None:
        return defines
    out = dict(defines)
    if epilogue is not None:
        out.update(dict(epilogue.codes), SM90_EPILOGUE_ACT=epilogue.act)
    if gather is not None:
        out["SM90_GATHER_A"] = 1
    return out


def swizzle_128b_offset(row: int, chunk: int) -> int:
    """Byte offset of 16-byte chunk ``chunk`` (0..7) of row ``row`` in a tile of
    128-byte rows as TMA's 128-byte swizzle writes it (1024-byte aligned base):
    within each 8-row atom the chunk index is XORed with the row's index in the
    atom. The host model of ``swizzle_128b_offset`` in ``kernels/sm90.cuh``."""
    return row * 128 + ((chunk ^ (row & 7)) << 4)
