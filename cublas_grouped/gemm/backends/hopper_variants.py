"""The compiled variants of the Hopper kernel beyond its plain product, and
the defines that select them (``kernels/grouped_gemm_sm90.cu``'s header):

- :class:`GatedEpilogue` (v9, ``SM90_EPILOGUE_ACT``): the first expert GEMM's
  gated activation in the epilogue;
- :class:`RowScaleEpilogue` (``SM90_EPILOGUE_ROW_SCALE``): the second expert
  GEMM's routing weight per row and bias in the epilogue;
- 128-column tiles (``SM90_BLOCK_N=128``, 6 stages): :func:`tile_defines`
  chooses them where they measured faster;
- v12 (``SM90_SKIP_IDLE``): a thin tile's second math warpgroup runs no
  MMAs; :func:`tile_defines` chooses it for small groups;
- thin tiles (``SM90_THIN``, 5 stages): both math warpgroups on the same 64
  rows, 128 columns each, so the ring holds 160 KiB of weights where the
  128-row tiles hold 128 (96 for the 128-column ones); :func:`tile_defines`
  chooses them at decode sizes;
- ``SM90_PREFETCH_B``: a step's GEMM 2 prefetches its first weights before
  it waits on the previous kernel (:func:`prefetch_b`);
- v15's fold (``SM90_FOLD_ROWS``): a group's last 1 .. 16 rows past a whole
  tile computed by the tile before them, their own tail tile skipped;
  :func:`fold_defines` keeps it where groups are small enough for it to pay;
- :class:`RowGather` (v11, ``SM90_GATHER_A``): a's rows read through an index
  array (``a[r] = x[src[r] // top_k]``), so no gathered copy of the tokens is
  written. The load warpgroup copies them into the stage with cp.async in the
  layout TMA's 128-byte swizzle gives; :func:`swizzle_128b_offset` is that
  layout's model on the host (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "GatedEpilogue",
    "RowScaleEpilogue",
    "epilogue_args",
    "RowGather",
    "NARROW_MAX_ROWS_PER_GROUP",
    "SKIP_IDLE_MAX_ROWS_PER_GROUP",
    "THIN_MAX_ROWS_PER_GROUP",
    "THIN_TILE_M",
    "THIN_STAGES",
    "THIN_TABLE_MAX_GROUPS",
    "PREFETCH_B",
    "prefetch_b",
    "tile_defines",
    "FOLD_TABLE_MAX_GROUPS",
    "FOLD_MAX_ROWS_PER_GROUP",
    "FOLD_MIN_ROWS_PER_GROUP",
    "FOLD_SMALL_A_ROWS",
    "FOLD_ROWS",
    "fold_defines",
    "choice_key",
    "variant_defines",
    "kernel_defines",
    "swizzle_128b_offset",
]

# 128-column tiles where they measured faster than 256-column ones: weights
# [E, N, K] (K-major B) with few rows per group, as at decode: 2.0-3.6% at
# 16 and 64 tokens on Qwen3, DeepSeek-V3 and Mixtral shapes (every such case
# measured had at most 16 rows per group on average). Slower with [E, K, N]
# weights at decode (up to 5%) and at prefill in both layouts (10-26%)
# (docs/kernel-notes.md, "128-column tiles"). 0 turns the choice off.
NARROW_MAX_ROWS_PER_GROUP = 16
_NARROW = {"SM90_BLOCK_N": 128, "SM90_STAGES": 6}

# v12 where groups average at most this many rows: there a large share of
# tiles hold at most 64 rows of their group (thin), whose second warpgroup
# then skips its MMAs. Measured (docs/kernel-notes.md, v12 and "Overlapped
# launches"): H200, 4096 tokens, Qwen3 (256 rows per group) 3.6-4.8% faster,
# DeepSeek-V3 (128) 1.3-4.2%; H100: decode up to 1.5%, Qwen3 4096 1.6-1.9%,
# DeepSeek-V3 16384 (512) 0.1-2.8%; but Mixtral at 1024 and 2048 rows per
# group 3.7-5.1% slower and Qwen3 16384 (1024) -1.1 to +0.6%. 0 turns it off.
SKIP_IDLE_MAX_ROWS_PER_GROUP = 512

# Thin tiles (SM90_THIN) for [E, N, K] weights where groups average at most
# this many rows: the decode sizes, where the stream of weights is the whole
# cost (the rule is the FP8 kernel's, of M and E alone, so a captured graph
# replays with any sizes). Measured on an H200 (docs/kernel-notes.md, "Thin
# tiles in the bf16 kernel"): against the 128-column tiles chosen there
# before, decode GEMMs 0.953-1.033 of the time (Mixtral T=64 0.953,
# DeepSeek-V3 GEMM 2 0.970-0.973) and decode layers 0.971-0.996; with
# [E, K, N] weights 0.998-1.022 against the 128 x 256 tiles: not chosen
# there. A schedule tile with more than THIN_TILE_M of its group's rows runs
# as two passes, each streaming its band of weights again, so the rule stays
# at decode sizes. 0 turns the choice off.
THIN_MAX_ROWS_PER_GROUP = 16
THIN_TILE_M = 64  # rows of a thin tile's pass
THIN_STAGES = 5  # 5 x (8 + 32) KiB: the ring; the staging areas take 18 KiB more
# The most groups whose schedule a thin launch copies into shared memory
# (4 * (3E + 1) bytes): the rest of 226 KiB (the 227 KiB opt-in limit less
# 1 KiB for the kernel's static shared memory, which counts against it).
THIN_TABLE_MAX_GROUPS = 597
# A layer's GEMM 2 (the launch taking tiles from tile counter 1, whose
# schedule the offsets launch before GEMM 1 wrote) asks for its first tile's
# first stages of weights (into L2) before it waits on the previous kernel,
# and the activation kernel before it lets it start early (lead_next_grid in
# kernels/common.cuh): the weights then stream during the activation and
# GEMM 1's last tiles (SM90_PREFETCH_B). Measured (docs/kernel-notes.md,
# "GEMM 2's first weights prefetched before it waits"): decode layers 0.974-0.993
# of the time on Qwen3-30B-A3B (H100), 0.98-1.01 on an H200; the FP8 kernel
# was 1.04-1.19x slower with the same prefetch and has none. False turns it off.
PREFETCH_B = True


def prefetch_b(counter: int) -> bool:
    """Whether a launch taking tiles from tile counter ``counter`` prefetches
    its weights before waiting: a layer's GEMM 2 (counter 1), under :data:`PREFETCH_B`."""
    return PREFETCH_B and counter == 1


_THIN = {"SM90_THIN": 1, "SM90_STAGES": THIN_STAGES, "SM90_TABLE_MAX_GROUPS": THIN_TABLE_MAX_GROUPS}
# v15's fold (SM90_FOLD_ROWS, 16 rows of a more per stage: 8 KiB over the
# ring): the groups whose schedule a launch with it copies into shared memory
# (the rest of 226 KiB, as for THIN_TABLE_MAX_GROUPS).
FOLD_TABLE_MAX_GROUPS = 597
# The fold's rows (SM90_FOLD_ROWS when a launch takes it): one small box of a
# (hopper.A_BOX_ROWS), one wgmma n16.
FOLD_ROWS = 16
# The fold where groups average at most this many rows (M over E: the rule
# depends on the launch's shape alone, so a captured graph replays with any
# sizes). Measured on an H200 (docs/kernel-notes.md, v15), fold / plain time
# of the first GEMM: 128 rows a group (DeepSeek-V3 at 4096 tokens) 0.875-0.905
# uniform, 0.978-0.985 skewed; 256 (Qwen3 4096) 0.941-0.969 uniform,
# 1.023-1.026 skewed; 512-4096 (16384 tokens, Mixtral) 0.99-1.03 either way:
# a folded tile costs about 1.3 tiles (its MMAs read the band of b from shared
# memory once more), which pays only where many groups end in a tail tile.
# 0 turns the fold off (a probe's way to time without it). Nor is it taken
# below a whole tile (BLOCK_M rows) a group on average: few groups pass one
# there, and decode launches would compile the fold for nothing.
FOLD_MAX_ROWS_PER_GROUP = 256
FOLD_MIN_ROWS_PER_GROUP = 128
# The launches that fold also load a's whole box for any tile of more than
# this many rows of its group (SM90_SMALL_A_ROWS; 64 elsewhere): a tail of 17
# .. 64 rows in four small boxes a stage cost more than a whole tile's one.
# Measured on an H200 (docs/kernel-notes.md, "What an FP8 tail tile costs"),
# time against 64: Qwen3-30B-A3B at 4096 tokens 0.975 / 0.955 (uniform /
# skewed), DeepSeek-V3 0.997 / 0.999; equal groups ending in 34- and 64-row
# tiles 0.91-0.96; but 1.00-1.016 at 1024 and 16384 tokens (32 and 512-1024
# rows a group), so only here.
FOLD_SMALL_A_ROWS = 16


def fold_defines(defines: dict, gather, rows: int, groups: int) -> dict:
    """``defines`` as a launch of ``rows`` rows over ``groups`` groups takes
    v15's fold: ``SM90_FOLD_ROWS`` set to :data:`FOLD_ROWS` (and the table's
    limit lowered to :data:`FOLD_TABLE_MAX_GROUPS`) for 128-row tiles of 256
    columns without a row gather where groups average at most
    :data:`FOLD_MAX_ROWS_PER_GROUP` rows and at least
    :data:`FOLD_MIN_ROWS_PER_GROUP`; else ``defines`` as they are."""
    pays = (
        FOLD_ROWS
        and FOLD_MAX_ROWS_PER_GROUP
        and FOLD_MIN_ROWS_PER_GROUP * groups <= rows <= FOLD_MAX_ROWS_PER_GROUP * groups
    )
    takes = not defines["SM90_THIN"] and defines["SM90_BLOCK_N"] == 256 and gather is None
    if not (pays and takes):
        return defines
    most = min(defines["SM90_TABLE_MAX_GROUPS"], FOLD_TABLE_MAX_GROUPS)
    small = min(defines["SM90_SMALL_A_ROWS"], FOLD_SMALL_A_ROWS)
    return {**defines, "SM90_FOLD_ROWS": FOLD_ROWS, "SM90_TABLE_MAX_GROUPS": most, "SM90_SMALL_A_ROWS": small}


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
class RowScaleEpilogue:
    """The second expert GEMM's epilogue: ``out[r, c] = scale[r] * (acc[r, c] +
    bias[g, c])`` in fp32, rounded once (the routing weight of each row, so
    that the combine is a plain sum). ``scale``: the address of a float32
    ``[M]`` on the device (the MoE step's row weights); ``bias``: of a
    ``[E, N]`` bias of the output's dtype, or 0."""

    scale: int
    bias: int = 0

    def __post_init__(self):
        if not self.scale:
            raise ValueError(
                "row scale: scale must be the address of a float32 [M] array on the device; got 0"
            )


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


def tile_defines(
    defines: dict, trans_b: bool, rows: int, groups: int, epilogue=None, gather: RowGather | None = None
) -> dict:
    """``defines`` with thin tiles where groups of ``[E, N, K]`` weights
    average at most :data:`THIN_MAX_ROWS_PER_GROUP` rows (``rows`` over
    ``groups`` groups) or ``defines`` ask for them (``SM90_THIN=1``: a
    probe's, either layout), in 256-column
    tiles without the gated epilogue, a row gather or v12 named by ``defines``,
    which they do not take.
    Else v12's idle-warpgroup skip where groups average at most
    :data:`SKIP_IDLE_MAX_ROWS_PER_GROUP` rows (unless ``defines`` name
    ``SM90_SKIP_IDLE`` already), and 128-column tiles where
    :data:`NARROW_MAX_ROWS_PER_GROUP` says they are faster (``[E, N, K]``
    weights); the width as it is otherwise, and always where the defines
    already name a width other than 256 (a probe's variant) or with the gated
    epilogue, whose tiles hold gate and up of 128 outputs."""
    thin_fits = (
        defines["SM90_BLOCK_N"] == 256
        and not defines.get("SM90_SKIP_IDLE")
        and not isinstance(epilogue, GatedEpilogue)
        and gather is None
    )
    by_rule = trans_b and THIN_MAX_ROWS_PER_GROUP and rows <= THIN_MAX_ROWS_PER_GROUP * groups
    if thin_fits and (defines["SM90_THIN"] or by_rule):
        return {**defines, **_THIN}
    if defines["SM90_THIN"]:  # asked for where thin tiles do not go
        defines = {**defines, "SM90_THIN": 0}
    if SKIP_IDLE_MAX_ROWS_PER_GROUP and "SM90_SKIP_IDLE" not in defines:  # a probe's value stands
        if rows <= SKIP_IDLE_MAX_ROWS_PER_GROUP * groups:
            defines = {**defines, "SM90_SKIP_IDLE": 1}
    wide = defines["SM90_BLOCK_N"] == 256
    if not (NARROW_MAX_ROWS_PER_GROUP and trans_b and wide and not isinstance(epilogue, GatedEpilogue)):
        return defines
    return {**defines, **_NARROW} if rows <= NARROW_MAX_ROWS_PER_GROUP * groups else defines


def choice_key(defines: dict) -> tuple:
    """What decides which kernel a launch runs that a probe may change
    between calls (the defines, the narrow tiles' threshold): part of the
    keys of prepared launches, so that a change prepares a new one."""
    return (
        tuple(defines.items()),
        NARROW_MAX_ROWS_PER_GROUP,
        SKIP_IDLE_MAX_ROWS_PER_GROUP,
        THIN_MAX_ROWS_PER_GROUP,
        PREFETCH_B,
        FOLD_MAX_ROWS_PER_GROUP,
        FOLD_MIN_ROWS_PER_GROUP,
        FOLD_ROWS,
        FOLD_SMALL_A_ROWS,
    )


def variant_defines(defines: dict, epilogue, gather: RowGather | None) -> dict:
    """``defines`` (the plain kernel's) with those of ``epilogue`` (a
    :class:`GatedEpilogue`, a :class:`RowScaleEpilogue` or None) and ``gather``."""
    if epilogue is None and gather is None:
        return defines
    if isinstance(epilogue, RowScaleEpilogue) and gather is not None:
        raise ValueError("the row-scale epilogue (GEMM 2) does not take a row gather (GEMM 1)")
    out = dict(defines)
    if isinstance(epilogue, RowScaleEpilogue):
        out["SM90_EPILOGUE_ROW_SCALE"] = 1
    elif epilogue is not None:
        out.update(dict(epilogue.codes), SM90_EPILOGUE_ACT=epilogue.act)
    if gather is not None:
        out["SM90_GATHER_A"] = 1
    return out


def kernel_defines(
    defines: dict, trans_b: bool, rows: int, groups: int, epilogue, gather, counter: int = 0
) -> dict:
    """The defines a launch compiles its kernel with: :func:`tile_defines`'s
    choices for the problem, then :func:`variant_defines`'s, and the early
    prefetch of a layer's GEMM 2 (:func:`prefetch_b` of its tile ``counter``)."""
    tiles = fold_defines(tile_defines(defines, trans_b, rows, groups, epilogue, gather), gather, rows, groups)
    out = variant_defines(tiles, epilogue, gather)
    return {**out, "SM90_PREFETCH_B": 1} if prefetch_b(counter) and gather is None else out


def epilogue_args(epilogue) -> tuple:
    """The kernel arguments an epilogue adds after the output: the bias (0:
    none; the plain product reads none), then, for a :class:`RowScaleEpilogue`,
    its scales."""
    if epilogue is None:
        return (np.intp(0),)
    if isinstance(epilogue, RowScaleEpilogue):
        return np.intp(epilogue.bias), np.intp(epilogue.scale)
    return (np.intp(epilogue.bias),)


def swizzle_128b_offset(row: int, chunk: int) -> int:
    """Byte offset of 16-byte chunk ``chunk`` (0..7) of row ``row`` in a tile of
    128-byte rows as TMA's 128-byte swizzle writes it (1024-byte aligned base):
    within each 8-row atom the chunk index is XORed with the row's index in the
    atom. The host model of ``swizzle_128b_offset`` in ``kernels/sm90.cuh``."""
    return row * 128 + ((chunk ^ (row & 7)) << 4)
