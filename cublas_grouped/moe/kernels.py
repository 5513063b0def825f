"""Launch wrappers for the MoE kernels (routing, dispatch, activation, combine).

One function per kernel: it picks the dtype variant, computes the grid and
shared memory the kernel's header comment asks for, and types every argument.
No checks happen here: callers validate first.

The block sizes and flag bits below are the only copy: each kernel file is
compiled with its entry of :data:`DEFINES` as NVRTC defines, and the sources
refuse to compile without them.
"""

from __future__ import annotations

import numpy as np

from ..runtime import launch as _fast
from ..runtime import nvrtc as _kernels

__all__ = [
    "ACTIVATIONS",
    "SCORINGS",
    "DEFINES",
    "route_topk",
    "block_histogram",
    "column_scan",
    "histogram_schedule",
    "assign_rows",
    "gather_rows",
    "place_one_block",
    "PLACE_MAX_EXPERTS",
    "PLACE_MAX_GRID",
    "expert_activation",
    "expert_activation_fp8",
    "combine_rows",
    "sum_rows",
    "scatter_rows",
    "num_pair_blocks",
    "Prepare",
]

DISPATCH_THREADS = 256  # threads per block of dispatch.cu's three sort kernels
PAIRS_PER_BLOCK = 1024  # (token, choice) pairs per block of those kernels
SKIP_REPEATS = 1  # dispatch.cu's flag: a token's repeated expert id aliases its first row
# place_one_block keeps a counter per expert per warp in shared memory: at most
# this many experts stay under the 48 KiB a launch gets without an opt-in.
PLACE_MAX_EXPERTS = 1024
# Its blocks each rank every pair (a few KiB of ids), then gather their share
# of the rows: about two blocks per SM of an H100 or H200, all in one wave.
PLACE_MAX_GRID = 256
ROUTE_THREADS = 128  # routing.cu: one warp per token, so 4 tokens per block
ROUTE_WARPS = ROUTE_THREADS // 32
# The row kernels (gather, activation, combine, scatter) take any block and
# grid size (expert_activation_fp8 any multiple of 32 threads: its warps
# reduce each 128-column block's amax): these two are the launcher's choice.
ROW_THREADS = 128
MAX_GRID = 65535
#: The gathers walk tokens (dispatch.cu ``gather_rows_by_token``, and
#: ``gather_rows_fp8_by_token`` for the FP8 step's e4m3 rows): each token's
#: row of x is read (and quantized) once and written to its k rows. In row
#: order (``gather_rows`` / ``gather_rows_fp8``, what False restores) a
#: token's row is read k times, from HBM once x outgrows L2, so the gather
#: read as many bytes as it wrote (docs/kernel-notes.md, "The gather walked
#: by token"). The same bits either way.
GATHER_BY_TOKEN = True
# 16-byte chunks (or elements) each thread of gather_rows_by_token carries
# (dispatch.cu's GATHER_UNITS define): a work item is ROW_THREADS * this many.
# 2 measured 0.968 of 4's time at Qwen3 4096 and 0.993-0.997 on the other
# prefill cases (H200; 256 and 512 threads a block were slower:
# docs/kernel-notes.md, "The gather's two knobs").
GATHER_UNITS = 2

#: The ``act`` argument of activation.cu and the ``scoring`` one of routing.cu.
ACTIVATIONS = {"silu": 0, "gelu": 1, "relu": 2}
SCORINGS = {"softmax": 0, "sigmoid": 1}

#: NVRTC defines per kernels/<file>.cu: the constants each source shares with
#: its launcher here. combine.cu shares none.
DEFINES: dict[str, dict[str, int]] = {
    "routing": {
        "ROUTE_THREADS": ROUTE_THREADS,
        "SCORE_SOFTMAX": SCORINGS["softmax"],
        "SCORE_SIGMOID": SCORINGS["sigmoid"],
    },
    "dispatch": {
        "DISPATCH_THREADS": DISPATCH_THREADS,
        "PAIRS_PER_BLOCK": PAIRS_PER_BLOCK,
        "SKIP_REPEATS": SKIP_REPEATS,
        "GATHER_UNITS": GATHER_UNITS,
    },
    "activation": {f"ACT_{name.upper()}": code for name, code in ACTIVATIONS.items()},
    "combine": {},
}
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _ptr(array) -> int:
    return 0 if array is None else array.data.ptr


# Each kernel's parameter widths as struct codes ("q": a pointer or int64, "i":
# int32), in the order of its CUDA signature: arguments are then plain Python
# ints, packed without a NumPy scalar per argument (runtime/launch.py).
_ROUTE_TOPK = "qiiiiiqq"
_PAIRS = "qiiii"  # the arguments both pair kernels start with (see _pair_args)
_HISTOGRAM = _PAIRS + "qqiq"
_COLUMN_SCAN = "qiiq"
_HISTOGRAM_SCHEDULE = _PAIRS + "qqiiq" + "qqqq" + "q"  # ..., counts, the schedule's four addresses, ticket
_ASSIGN_ROWS = _PAIRS + "qqiqqqqq"
_GATHER_ROWS = "qiqiiq"
_GATHER_ROWS_FP8 = _GATHER_ROWS + "q"  # the rows' codes and scales in place of the rows
_GATHER_ROWS_BY_TOKEN = "qiqqiiiq"
_GATHER_ROWS_FP8_BY_TOKEN = _GATHER_ROWS_BY_TOKEN + "q"  # the rows' codes and scales in place of the rows
_PLACE_ONE_BLOCK = _PAIRS + "qqii" + "q" * 10
_PLACE_ONE_BLOCK_FP8 = _PLACE_ONE_BLOCK + "q"  # the rows' codes and scales in place of the rows
_ACTIVATION = "qiiiiqqqiq"  # h, inter, gated, gate_up_block, act, bias, row_to_pair, ids, rows, out
_ACTIVATION_FP8 = _ACTIVATION + "q"  # out: the codes, then the scales
_COMBINE_ROWS = "qiqqqqiiq"
_SUM_ROWS = "qiqiiq"
_SCATTER_ROWS = "qiqiq"

# (file, kernel, arch, dtype) -> Kernel: DEFINES are constants, so this skips
# get_kernel's key building (sorting and checking the defines) on every launch.
_found: dict[tuple, object] = {}


def _kernel(file: str, name: str, arch: str, dtype=None):
    key = (file, name, arch, dtype)
    kernel = _found.get(key)
    if kernel is None:
        full = name if dtype is None else f"{name}_{_SUFFIX[np.dtype(dtype).name]}"
        kernel = _found[key] = _kernels.get_kernel(file, full, arch, defines=DEFINES[file])
    return kernel


class Prepare:
    """Passed as the ``stream`` of a launcher below: instead of launching, the
    launcher returns the launch as a :class:`~cublas_grouped.runtime.launch.FixedLaunch`
    (arguments packed once; set :attr:`slots` first to the indices of the
    pointer arguments that change from call to call)."""

    __slots__ = ("slots",)

    def __init__(self):
        self.slots = ()

    def fixed(self, kernel, grid, block, signature, args, shmem=0):
        """The FixedLaunch of one launcher's launch (its arguments typed by ``signature``)."""
        typed = [np.int32(a) if code == "i" else np.int64(a) for code, a in zip(signature, args)]
        return _fast.FixedLaunch(kernel, grid, block, typed, shmem=int(shmem), slots=self.slots)


def num_pair_blocks(num_pairs: int) -> int:
    """Blocks of ``PAIRS_PER_BLOCK`` pairs the sort kernels run over (at least one)."""
    return max(1, -(-num_pairs // PAIRS_PER_BLOCK))


def route_topk(stream, arch, logits, top_k, scoring, renormalize, weights, ids) -> None:
    """routing.cu ``route_topk``: top-k experts and weights of every token (one warp per token)."""
    tokens, experts = logits.shape
    kernel = _kernel("routing", "route_topk", arch, logits.dtype)
    grid = max(1, -(-tokens // ROUTE_WARPS))
    args = (
        logits.data.ptr,
        tokens,
        experts,
        int(top_k),
        int(scoring),
        int(renormalize),
        weights.data.ptr,
        ids.data.ptr,
    )
    _kernels.launch_signed(stream, kernel, grid, ROUTE_THREADS, _ROUTE_TOPK, args, ROUTE_WARPS * experts * 4)


def _pair_args(ids, num_pairs, num_experts, skip_repeats) -> tuple:
    """The arguments both pair kernels start with (they must agree on which pairs take rows)."""
    flags = SKIP_REPEATS if skip_repeats else 0
    return (ids.data.ptr, int(num_pairs), ids.shape[1], int(num_experts), flags)


def block_histogram(
    stream, arch, ids, num_pairs, num_experts, block_counts, *, skip_repeats=False, reset=None, counts=None
) -> None:
    """dispatch.cu ``expert_block_histogram``: each expert's pairs in each block of
    pairs; every entry of ``reset`` (an int32 array, e.g. a row_to_pair) set to -1.
    ``counts`` (only where :func:`num_pair_blocks` is 1): the column scan's
    results written too, so :func:`column_scan` is not to be launched."""
    kernel = _kernel("dispatch", "expert_block_histogram", arch)
    resets = (0, 0) if reset is None else (reset.data.ptr, reset.size)
    if counts is not None and num_pair_blocks(num_pairs) != 1:
        raise ValueError(f"counts from the histogram needs one block of pairs; {num_pairs} pairs take more")
    totals = 0 if counts is None else counts.data.ptr
    args = (*_pair_args(ids, num_pairs, num_experts, skip_repeats), block_counts.data.ptr, *resets, totals)
    if type(stream) is Prepare:
        return stream.fixed(kernel, num_pair_blocks(num_pairs), DISPATCH_THREADS, _HISTOGRAM, args)
    _kernels.launch_signed(stream, kernel, num_pair_blocks(num_pairs), DISPATCH_THREADS, _HISTOGRAM, args)


def column_scan(stream, arch, block_counts, num_blocks, num_experts, counts) -> None:
    """dispatch.cu ``expert_column_scan``: block counts to block bases in place, and each expert's total."""
    kernel = _kernel("dispatch", "expert_column_scan", arch)
    args = (block_counts.data.ptr, int(num_blocks), int(num_experts), counts.data.ptr)
    if type(stream) is Prepare:
        return stream.fixed(kernel, int(num_experts), DISPATCH_THREADS, _COLUMN_SCAN, args)
    _kernels.launch_signed(stream, kernel, int(num_experts), DISPATCH_THREADS, _COLUMN_SCAN, args)


def histogram_schedule(
    stream, arch, ids, num_pairs, num_experts, block_counts, reset, tile_rows, counts, schedule, ticket
) -> None:
    """dispatch.cu ``expert_histogram_schedule``: :func:`block_histogram` (repeats
    skipped, ``reset`` set to -1), :func:`column_scan` and the Hopper offsets
    kernel's contiguous schedule in one launch (``schedule``: the addresses of
    its row_offsets, row_ends, tile_offsets and first tile counter, both
    counters zeroed; tiles of ``tile_rows`` rows; ``counts`` each expert's
    rows). ``ticket``: a uint32 [1] on the device, 0 before the launch and
    after it (the launch's last block counts on it; one per stream of steps)."""
    kernel = _kernel("dispatch", "expert_histogram_schedule", arch)
    args = (
        *_pair_args(ids, num_pairs, num_experts, True),
        block_counts.data.ptr,
        reset.data.ptr,
        reset.size,
        int(tile_rows),
        counts.data.ptr,
        *schedule,
        ticket.data.ptr,
    )
    grid = num_pair_blocks(num_pairs)
    if type(stream) is Prepare:
        return stream.fixed(kernel, grid, DISPATCH_THREADS, _HISTOGRAM_SCHEDULE, args)
    _kernels.launch_signed(stream, kernel, grid, DISPATCH_THREADS, _HISTOGRAM_SCHEDULE, args)


def assign_rows(
    stream,
    arch,
    ids,
    num_pairs,
    num_experts,
    block_base,
    row_offsets,
    pair_to_row,
    row_to_pair,
    *,
    skip_repeats=False,
    dropped=None,
    weights=None,
    row_weights=None,
) -> None:
    """dispatch.cu ``assign_rows``: rows for every pair; ``row_to_pair``'s length is the
    row capacity the kernel respects, and ``dropped`` (uint64 [1] or None) counts pairs
    that got none. ``row_weights`` (float32, ``row_to_pair``'s length, or None): each
    row's routing weight from ``weights`` (float32 [T, k], or None for 1), repeats
    added to their first choice's row (for GEMM 2's weighting epilogue)."""
    kernel = _kernel("dispatch", "assign_rows", arch)
    args = (
        *_pair_args(ids, num_pairs, num_experts, skip_repeats),
        block_base.data.ptr,
        row_offsets.data.ptr,
        row_to_pair.shape[0],
        pair_to_row.data.ptr,
        row_to_pair.data.ptr,
        _ptr(dropped),
        _ptr(weights),
        _ptr(row_weights),
    )
    shmem = (DISPATCH_THREADS // 32 + 1) * num_experts * 4
    grid = num_pair_blocks(num_pairs)
    if type(stream) is Prepare:
        return stream.fixed(kernel, grid, DISPATCH_THREADS, _ASSIGN_ROWS, args, int(shmem))
    _kernels.launch_signed(stream, kernel, grid, DISPATCH_THREADS, _ASSIGN_ROWS, args, int(shmem))


def _row_grid(rows: int) -> int:
    return max(1, min(rows, MAX_GRID))


def gather_rows(stream, arch, x, pair_to_row, row_to_pair, top_k, out, quantized=None) -> None:
    """dispatch.cu ``gather_rows``: token rows of ``x`` into expert order
    (zeros for padding rows), one row of ``out`` per entry of ``row_to_pair``;
    ``pair_to_row`` ([T * top_k], its inverse) lets the gather walk tokens
    instead (``gather_rows_by_token``, :data:`GATHER_BY_TOKEN`).
    ``quantized``: (codes uint8 [rows, H], scales float32 [rows, ceil(H/128)]):
    ``gather_rows_fp8_by_token`` (``gather_rows_fp8`` in row order) instead,
    which writes the rows there as ``quantize_rows_fp8`` would quantize them;
    ``out`` is then not written (None is fine)."""
    rows = (out if quantized is None else quantized[0]).shape[0]
    outs = (out.data.ptr,) if quantized is None else (quantized[0].data.ptr, quantized[1].data.ptr)
    if GATHER_BY_TOKEN:
        tokens = pair_to_row.shape[0] // top_k
        args = (x.data.ptr, x.shape[1], pair_to_row.data.ptr, row_to_pair.data.ptr, int(top_k), tokens, rows)
        args += outs
        if quantized is None:  # work items: (token, ROW_THREADS * GATHER_UNITS 16-byte chunks of its row)
            name, signature = "gather_rows_by_token", _GATHER_ROWS_BY_TOKEN
            per_item = ROW_THREADS * GATHER_UNITS * 16 // x.dtype.itemsize
            grid = max(1, min(tokens * -(-x.shape[1] // per_item), MAX_GRID))
        else:  # a block per token
            name, signature = "gather_rows_fp8_by_token", _GATHER_ROWS_FP8_BY_TOKEN
            grid = max(1, min(tokens, MAX_GRID))
    else:
        name, signature = (
            ("gather_rows", _GATHER_ROWS) if quantized is None else ("gather_rows_fp8", _GATHER_ROWS_FP8)
        )
        args = (x.data.ptr, x.shape[1], row_to_pair.data.ptr, int(top_k), rows, *outs)
        grid = _row_grid(rows)
    kernel = _kernel("dispatch", name, arch, x.dtype)
    if type(stream) is Prepare:
        return stream.fixed(kernel, grid, ROW_THREADS, signature, args)
    _kernels.launch_signed(stream, kernel, grid, ROW_THREADS, signature, args)


def place_one_block(
    stream,
    arch,
    ids,
    num_experts,
    weights,
    x,
    tile_rows,
    counts,
    schedule,
    pair_to_row,
    row_to_pair,
    *,
    row_weights=None,
    dropped=None,
    rows=None,
    quantized=None,
):
    """dispatch.cu ``place_one_block``: the decode step's whole placement in one
    launch (T*k at most ``PAIRS_PER_BLOCK``, E at most :data:`PLACE_MAX_EXPERTS`,
    repeats skipped): ``counts``, the Hopper kernel's schedule (``schedule``:
    the addresses of its row_offsets, row_ends, tile_offsets and first tile
    counter, both counters zeroed; tiles of ``tile_rows`` rows), ``pair_to_row``
    and ``row_to_pair`` (T*k each), ``row_weights`` (or None: not written; then
    ``weights`` is not read), ``dropped`` (uint64 [1] or None) and the gathered
    ``rows`` (T*k rows of x, or None: GEMM 1 gathers).
    ``quantized``: (codes uint8 [T*k, H], scales float32 [T*k, ceil(H/128)]):
    ``place_one_block_fp8`` instead, which writes the gathered rows there as
    ``quantize_rows_fp8`` would quantize them, and not as ``rows`` (ignored)."""
    num_pairs = ids.size
    fp8 = quantized is not None
    kernel = _kernel("dispatch", "place_one_block_fp8" if fp8 else "place_one_block", arch, x.dtype)
    args = (
        *_pair_args(ids, num_pairs, num_experts, True),
        _ptr(weights),
        x.data.ptr,
        x.shape[1],
        int(tile_rows),
        counts.data.ptr,
        *schedule,
        pair_to_row.data.ptr,
        row_to_pair.data.ptr,
        _ptr(row_weights),
        _ptr(dropped),
        *((quantized[0].data.ptr, quantized[1].data.ptr) if fp8 else (_ptr(rows),)),
    )
    signature = _PLACE_ONE_BLOCK_FP8 if fp8 else _PLACE_ONE_BLOCK
    shmem = ((DISPATCH_THREADS // 32 + 2) * num_experts + PAIRS_PER_BLOCK) * 4
    grid = 1 if rows is None and not fp8 else max(1, min(num_pairs, PLACE_MAX_GRID))
    if type(stream) is Prepare:
        return stream.fixed(kernel, grid, DISPATCH_THREADS, signature, args, shmem)
    _kernels.launch_signed(stream, kernel, grid, DISPATCH_THREADS, signature, args, shmem)


def expert_activation(
    stream, arch, h, inter, gated, act, bias, row_to_pair, ids, out, gate_up_block=0
) -> None:
    """activation.cu ``expert_activation``: optional bias, then the (gated) activation, row by row.
    ``gate_up_block``: 0 when h holds the gate columns then the up columns, B
    when they are packed in blocks of B (``w1_layout="gate_up_blocked"``)."""
    args = (h, inter, gated, act, bias, row_to_pair, ids, gate_up_block)
    return _activation(stream, arch, "expert_activation", _ACTIVATION, args, out.shape[0], (out.data.ptr,))


def expert_activation_fp8(
    stream, arch, h, inter, gated, act, bias, row_to_pair, ids, out, gate_up_block=0
) -> None:
    """activation.cu ``expert_activation_fp8``: :func:`expert_activation` written
    as the FP8 GEMM's operand: ``out`` = (codes uint8 [rows, inter], scales
    float32 [rows, ceil(inter/128)]), bit for bit ``quantize_rows_fp8`` of
    what :func:`expert_activation` writes, without its bf16 rows or a launch
    of the quantizer."""
    codes, scales = out
    args = (h, inter, gated, act, bias, row_to_pair, ids, gate_up_block)
    ptrs = (codes.data.ptr, scales.data.ptr)
    return _activation(stream, arch, "expert_activation_fp8", _ACTIVATION_FP8, args, codes.shape[0], ptrs)


def _activation(stream, arch, name, signature, params, rows, out_ptrs):
    """Launch (or, under :class:`Prepare`, prepare) activation kernel ``name``
    over ``rows`` rows writing ``out_ptrs``: the two kernels' common arguments."""
    h, inter, gated, act, bias, row_to_pair, ids, gate_up_block = params
    kernel = _kernel("activation", name, arch, h.dtype)
    args = (
        h.data.ptr,
        int(inter),
        int(gated),
        int(gate_up_block),
        int(act),
        _ptr(bias),
        row_to_pair.data.ptr,
        ids.data.ptr,
        rows,
        *out_ptrs,
    )
    if type(stream) is Prepare:
        return stream.fixed(kernel, _row_grid(rows), ROW_THREADS, signature, args)
    _kernels.launch_signed(stream, kernel, _row_grid(rows), ROW_THREADS, signature, args)


def combine_rows(stream, arch, y, pair_to_row, weights, ids, bias, num_tokens, top_k, out) -> None:
    """combine.cu ``combine_rows``: each token's k expert rows, weighted and summed in choice order."""
    kernel = _kernel("combine", "combine_rows", arch, y.dtype)
    args = (
        y.data.ptr,
        y.shape[1],
        pair_to_row.data.ptr,
        _ptr(weights),
        ids.data.ptr,
        _ptr(bias),
        int(num_tokens),
        int(top_k),
        out.data.ptr,
    )
    if type(stream) is Prepare:
        return stream.fixed(kernel, _row_grid(num_tokens), ROW_THREADS, _COMBINE_ROWS, args)
    _kernels.launch_signed(stream, kernel, _row_grid(num_tokens), ROW_THREADS, _COMBINE_ROWS, args)


def sum_rows(stream, arch, y, pair_to_row, num_tokens, top_k, out) -> None:
    """combine.cu ``sum_rows``: each token's k expert rows summed in choice order, as
    they are (their weights applied by GEMM 2's epilogue; repeats add nothing)."""
    kernel = _kernel("combine", "sum_rows", arch, y.dtype)
    args = (y.data.ptr, y.shape[1], pair_to_row.data.ptr, int(num_tokens), int(top_k), out.data.ptr)
    if type(stream) is Prepare:
        return stream.fixed(kernel, _row_grid(num_tokens), ROW_THREADS, _SUM_ROWS, args)
    _kernels.launch_signed(stream, kernel, _row_grid(num_tokens), ROW_THREADS, _SUM_ROWS, args)


def scatter_rows(stream, arch, y, pair_to_row, out) -> None:
    """combine.cu ``scatter_rows``: expert rows back to pair order, unweighted (zeros where dropped)."""
    pairs = out.shape[0]
    kernel = _kernel("combine", "scatter_rows", arch, y.dtype)
    args = (y.data.ptr, y.shape[1], pair_to_row.data.ptr, pairs, out.data.ptr)
    _kernels.launch_signed(stream, kernel, _row_grid(pairs), ROW_THREADS, _SCATTER_ROWS, args)
