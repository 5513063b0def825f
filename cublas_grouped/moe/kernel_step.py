"""The sync-free layer step on our Hopper kernel (SM 9.0): every expert's
rows back to back in T*k rows, both GEMMs reading the per-expert counts on
the device, nothing copied to the host, every launch's size fixed by T (a
CUDA graph replays it with new tokens and routing).

Who runs it: :class:`~cublas_grouped.FixedCapacityMoE` and
``moe_forward(fixed_capacity=True)`` where :func:`fixed_capacity_backend`
says so, and ``moe_forward``'s default path on SM 9.0 under AUTO (which
counts the pairs dropped for ids outside [0, E) on the device and raises on
them later, without waiting: moe/dropped_pairs.py).
With ``w1_layout="gate_up_blocked"`` the activation runs in GEMM 1's epilogue
(:data:`GATED_EPILOGUE_MIN_ROWS_PER_GROUP`).
With :data:`GATHER_IN_GEMM1`, GEMM 1 reads the tokens' rows itself (v11).
"""

from __future__ import annotations

from threading import get_ident

from ..gemm.backends import hopper
from ..gemm.backends.hopper_variants import RowScaleEpilogue, choice_key
from . import kernels as K
from . import placement_launches as _placement
from .checks import LayerShape, kernel_arch
from .chunk_capacity import ChunkBuffers
from .dispatch import mark_stage
from .placement_launches import placement_launches
from .step_backend import (  # where they were first: kept importable from here
    CHUNKED_DECODE_MAX_EXPERTS,
    CHUNKED_DECODE_MAX_TOKENS,
    fixed_capacity_backend,
)

# Prepared steps kept per buffers (then started over): one per T and weights,
# so a model's layers on one stream share the buffers and need one each.
MAX_PREPARED_STEPS = 512


def _ptr(array) -> int:
    return 0 if array is None else array.data.ptr


__all__ = [
    "GATHER_IN_GEMM1",
    "OVERLAP_LAUNCHES",
    "OVERLAP_MAX_PAIRS",
    "overlapped",
    "PLACE_IN_ONE_LAUNCH",
    "TIME_PREPARED",
    "places_in_one_launch",
    "GATED_EPILOGUE_MIN_ROWS_PER_GROUP",
    "gated_epilogue",
    "gather_in_gemm1",
    "CHUNKED_DECODE_MAX_EXPERTS",
    "CHUNKED_DECODE_MAX_TOKENS",
    "fixed_capacity_backend",
    "count_rows",
    "place_rows",
    "kernel_step",
    "step_launches",
    "StepLaunches",
    "placement_launches",
    "MAX_PREPARED_STEPS",
]

# GEMM 1 reads each row's token from x through row_to_pair (the kernel's
# SM90_GATHER_A variant, v11: row r is x[row_to_pair[r] // k]) instead of
# from the gathered copy that gather_rows writes, which the step then skips.
# The kernel takes row_to_pair and k (not a token array written by
# assign_rows): no new buffer and no change to the placement. Off until
# measured on a GPU (docs/kernel-notes.md, v11); an x that does not start on
# a 16-byte boundary keeps the copy either way. Read at each call.
GATHER_IN_GEMM1 = False

# The prepared step's launches are programmatic dependent launches
# (runtime/launch.py, kernels/common.cuh): the driver starts each kernel's
# blocks while the previous kernel drains, and each kernel waits on the
# device (griddepcontrol.wait) before it touches what earlier kernels wrote.
# Every kernel of the step does so first thing (the GEMMs let the next kernel
# start when they run out of tiles). The step runs on SM 9.0 only, where the
# instructions exist. Only for steps of at most OVERLAP_MAX_PAIRS pairs:
# measured on an H200 (docs/kernel-notes.md, "Overlapped launches"), graph
# replays of decode steps (32-512 pairs) took 0.971-1.001 of the plain
# launches' time, but Qwen3 at 4096 tokens (32768 pairs) 1.003-1.013; other
# sizes are not measured. False: plain launches (a probe's A/B). Both are
# read when a step is prepared (part of the prepared steps' key).
OVERLAP_LAUNCHES = True
OVERLAP_MAX_PAIRS = 1024


def overlapped(pairs: int) -> bool:
    """Whether a prepared step of ``pairs`` pairs overlaps its launches (the
    16-bit and the FP8 step alike): :data:`OVERLAP_LAUNCHES`, at most
    :data:`OVERLAP_MAX_PAIRS` pairs."""
    return OVERLAP_LAUNCHES and pairs <= OVERLAP_MAX_PAIRS


# Steps of one block of pairs (T*k <= kernels.PAIRS_PER_BLOCK: decode) with at
# most kernels.PLACE_MAX_EXPERTS experts place their rows in one launch
# (dispatch.cu's place_one_block: counts, the GEMMs' schedule, each pair's row
# and weight, and the gathered rows), where the other steps take four (the
# histogram, the offsets kernel, assign_rows, gather_rows): the same values,
# bit for bit. False: four launches everywhere (a probe's A/B, and the tests
# that compare both). Read when a step is prepared (part of its key).
PLACE_IN_ONE_LAUNCH = True

# With a timer (the benchmark's stage split), the step replays its prepared
# launches too, with the timer's marks between them, and plainly (not
# overlapped: a mark ends each stage). Launched afresh, as before 2026-11-27,
# the split timed the host building each launch as much as the GPU running
# it: at Qwen3-30B-A3B's 4096 tokens its placement stage read 0.10-0.14 ms
# where the graph of the same step spends about 0.03 (docs/benchmarks.md).
# False: each kernel launched afresh with a timer (the tests check the
# prepared launches against those).
TIME_PREPARED = True


# With w1 packed (w1_layout="gate_up_blocked"), GEMM 1 computes the gated
# activation in its epilogue where the experts average more than this many
# rows; below it, GEMM 1 writes h (in the packed column order) and the
# activation kernel reads it in that order. 0 (every size) since the
# epilogue's SiLU takes fast intrinsics (SM90_FAST_ACT): measured on an H200
# (docs/kernel-notes.md, "The gated epilogue's SiLU"), decode layers with the
# epilogue against without it took 0.98-1.01x on Qwen3-30B-A3B and
# DeepSeek-V3 and 0.979-0.983x on Mixtral at 16 and 64 tokens. (With the IEEE
# division, 16: at Qwen3 decode its GEMM 1 took 167 us where the plain one
# took 133 and the activation kernel 4.) Read at each call (the prepared
# steps' key holds the choice).
GATED_EPILOGUE_MIN_ROWS_PER_GROUP = 0


def gated_epilogue(shape: LayerShape, pairs: int) -> bool:
    """Whether a step of ``pairs`` pairs runs the activation in GEMM 1's
    epilogue (w1 packed, and :data:`GATED_EPILOGUE_MIN_ROWS_PER_GROUP`)."""
    return bool(shape.gate_up_block) and pairs > GATED_EPILOGUE_MIN_ROWS_PER_GROUP * shape.num_experts


def places_in_one_launch(num_experts: int, pairs: int) -> bool:
    """Whether a step of ``pairs`` pairs over ``num_experts`` experts places its
    rows with the one-launch kernel (:data:`PLACE_IN_ONE_LAUNCH`)."""
    return PLACE_IN_ONE_LAUNCH and pairs <= K.PAIRS_PER_BLOCK and num_experts <= K.PLACE_MAX_EXPERTS


def count_rows(res, arch, buf: ChunkBuffers, ids, e: int, pairs: int, rows: int | None = None):
    """Rows per expert into ``buf.counts`` (repeats within a token counted once),
    and ``row_to_pair[:rows]`` (default T*k) reset to -1, every byte 0xFF, so
    rows no pair takes read as padding (by the histogram kernel: no memset
    launch). Returns the views the placement uses: (block counts, pair_to_row,
    row_to_pair)."""
    rows = pairs if rows is None else rows
    nb = K.num_pair_blocks(pairs)
    block_counts = buf.block_counts[:nb]
    row_to_pair = buf.row_to_pair[:rows]
    # One block of pairs (decode): the histogram writes the column scan's results itself.
    totals = buf.counts if nb == 1 else None
    stream = res.launch_stream
    K.block_histogram(
        stream, arch, ids, pairs, e, block_counts, skip_repeats=True, reset=row_to_pair, counts=totals
    )
    if nb > 1:
        K.column_scan(stream, arch, block_counts, nb, e, buf.counts)
    return block_counts, buf.pair_to_row[:pairs], row_to_pair


def place_rows(
    res,
    shape: LayerShape,
    buf: ChunkBuffers,
    x,
    ids,
    dropped,
    timer=None,
    copy=True,
    weights=None,
    weigh_rows=False,
    quantized=None,
):
    """The kernel step's first stages on ``res``'s stream: the counts, the
    kernel's offsets (its schedule in ``buf.schedule``, both tile counters
    zeroed, so GEMM 1 (counter 0) and GEMM 2 (counter 1) pass
    ``scanned=True``), each pair's row, (with ``weigh_rows``) each row's
    routing weight from ``weights`` in ``buf.row_weights``, and (unless not
    ``copy``: GEMM 1 gathers them) the gathered rows in ``buf.rows[:T*k]``
    (zeros where no pair was placed). One launch where
    :func:`places_in_one_launch`, else four.
    ``quantized`` (the FP8 step): (codes, scales) of T*k rows; the launch
    that gathers the rows (the one placement launch, or the gather after
    the others) writes them there as e4m3 (``quantize_rows_fp8``'s bits)
    and not into ``buf.rows``.
    Returns (pair_to_row, row_to_pair). Shared by the 16-bit and FP8 steps."""
    arch, stream = kernel_arch(res), res.launch_stream
    tokens, k = ids.shape
    e, pairs = shape.num_experts, tokens * k
    if places_in_one_launch(e, pairs):
        pair_to_row, row_to_pair = buf.pair_to_row[:pairs], buf.row_to_pair[:pairs]
        K.place_one_block(
            stream,
            arch,
            ids,
            e,
            weights if weigh_rows else None,
            x,
            hopper.BLOCK_M,
            buf.counts,
            hopper.schedule_addresses(buf.schedule.data.ptr, e),
            pair_to_row,
            row_to_pair,
            row_weights=buf.row_weights[:pairs] if weigh_rows else None,
            dropped=dropped,
            rows=buf.rows[:pairs] if copy and quantized is None else None,
            quantized=quantized,
        )
        mark_stage(timer, "plan", res.cupy_stream)
        mark_stage(timer, "gather", res.cupy_stream)  # in the same launch: 0 ms
        return pair_to_row, row_to_pair
    pair_to_row, row_to_pair = buf.pair_to_row[:pairs], buf.row_to_pair[:pairs]
    if _placement.HISTOGRAM_SCHEDULE:  # one launch for the counts and the schedule, as the prepared step's
        _placement.histogram_schedule(stream, arch, buf, ids, e)
    else:
        count_rows(res, arch, buf, ids, e, pairs)
        # The kernel's own offsets kernel gives the contiguous row offsets that
        # assign_rows places pairs by (in buf.schedule); GEMM 1 then reuses its schedule.
        hopper.schedule_offsets(res, buf.counts, e, pairs, storage=buf.schedule)
    _placement.assign_rows(stream, arch, buf, ids, e, dropped, weights, weigh_rows)
    mark_stage(timer, "plan", res.cupy_stream)
    if copy:  # with quantized (the FP8 step): the gather writes e4m3 rows, not buf.rows
        rows = None if quantized is not None else buf.rows[:pairs]
        K.gather_rows(stream, arch, x, pair_to_row, row_to_pair, k, rows, quantized)
    mark_stage(timer, "gather", res.cupy_stream)  # none when GEMM 1 gathers: 0 ms
    return pair_to_row, row_to_pair


def kernel_step(
    res, shape: LayerShape, buf: ChunkBuffers, x, ids, weights, params, out, dropped, timer=None
) -> None:
    """One layer step on our Hopper kernel on ``res``'s stream: the counts,
    each expert's rows back to back in T*k rows (no expert has more than T,
    so they always fit), the GEMMs over the device counts, the combine.
    Rows past the counts' sum are never placed (their row_to_pair stays -1),
    computed or read back. ``params`` = (w1, w2, b1, b2) as CuPy arrays;
    ``dropped``: a uint64 [1] counter to which pairs with an id outside
    [0, E) are added, or None; ``timer``: a StageTimer (the caller marked
    "start"). The caller checked that ``buf`` holds T*k rows.

    The launches are those of :func:`step_launches`, prepared once per
    buffers, T and weights, then replayed; with a ``timer``, with its marks
    between stages (or, without :data:`TIME_PREPARED`, launched afresh)."""
    w1, w2, b1, b2 = params
    gather = gather_in_gemm1(x)
    if timer is None or TIME_PREPARED:
        overlap = timer is None and OVERLAP_LAUNCHES and ids.size <= OVERLAP_MAX_PAIRS  # overlapped(), inline
        key = (
            gather,
            ids.shape,
            w1.data.ptr,
            w2.data.ptr,
            0 if b1 is None else b1.data.ptr,
            0 if b2 is None else b2.data.ptr,
            get_ident(),  # a step's slots are written before each launch: one per thread
            overlap,
            places_in_one_launch(shape.num_experts, ids.size),
            _placement.HISTOGRAM_SCHEDULE,
            K.GATHER_BY_TOKEN,
            gated_epilogue(shape, ids.size),
            hopper.SOURCE,  # what a probe swaps between steps (the kernel, its defines and choices)
            choice_key(hopper.DEFINES),
        )
        step = buf.launches.get(key)
        if step is None:
            if len(buf.launches) >= MAX_PREPARED_STEPS:
                buf.launches.clear()
            step = buf.launches[key] = step_launches(
                res, shape, buf, x, ids, weights, params, out, dropped, gather, overlap
            )
        w_ptr, d_ptr = 0 if weights is None else weights.data.ptr, 0 if dropped is None else dropped.data.ptr
        mark = None if timer is None else lambda name: mark_stage(timer, name, res.cupy_stream)
        step(res.stream, x.data.ptr, ids.data.ptr, w_ptr, out.data.ptr, d_ptr, mark)
        return
    arch, stream = kernel_arch(res), res.launch_stream
    tokens, k = ids.shape
    e, pairs = shape.num_experts, tokens * k
    pair_to_row, row_to_pair = place_rows(
        res, shape, buf, x, ids, dropped, timer, copy=not gather, weights=weights, weigh_rows=True
    )
    x_rows, h, act, y = buf.rows[:pairs], buf.h[:pairs], buf.act[:pairs], buf.y[:pairs]
    gemm1 = (e, pairs, shape.width, shape.hidden, shape.trans_b, shape.dtype)
    # GEMM 1's a: the gathered copy, or x itself read through row_to_pair.
    a1, rows1 = (
        (x.data.ptr, hopper.RowGather(row_to_pair.data.ptr, k, tokens)) if gather else (x_rows.data.ptr, None)
    )
    if gated_epilogue(shape, pairs):
        # w1 packed in blocks (w1_layout="gate_up_blocked"): the activation
        # runs in GEMM 1's epilogue and writes act; h is never written.
        codes = tuple((f"ACT_{name.upper()}", code) for name, code in K.ACTIVATIONS.items())
        fused = hopper.GatedEpilogue(K.ACTIVATIONS[shape.activation], codes, 0 if b1 is None else b1.data.ptr)
        ptrs1 = (a1, w1.data.ptr, act.data.ptr)
        kw = {"epilogue": fused, "gather": rows1}
        hopper.grouped_rows(res, gemm1, ptrs1, buf.counts, scanned=True, storage=buf.schedule, **kw)
        mark_stage(timer, "gemm1", res.cupy_stream)
    else:
        ptrs1 = (a1, w1.data.ptr, h.data.ptr)
        hopper.grouped_rows(res, gemm1, ptrs1, buf.counts, scanned=True, storage=buf.schedule, gather=rows1)
        mark_stage(timer, "gemm1", res.cupy_stream)
        K.expert_activation(
            stream,
            arch,
            h,
            shape.inter,
            int(shape.gated),
            K.ACTIVATIONS[shape.activation],
            b1,
            row_to_pair,
            ids,
            act,
            shape.gate_up_block,
        )
    mark_stage(timer, "activation", res.cupy_stream)  # none when fused: 0 ms
    gemm2 = (e, pairs, shape.hidden, shape.inter, shape.trans_b, shape.dtype)
    ptrs2 = (act.data.ptr, w2.data.ptr, y.data.ptr)
    # Scanned too: GEMM 1 used up tile counter 0; counter 1, zeroed by the same
    # offsets launch, is GEMM 2's. Its epilogue weights each row and adds b2.
    kw = {"scanned": True, "storage": buf.schedule, "counter": 1, "epilogue": _weighting(buf, b2)}
    hopper.grouped_rows(res, gemm2, ptrs2, buf.counts, **kw)
    mark_stage(timer, "gemm2", res.cupy_stream)
    K.sum_rows(stream, arch, y, pair_to_row, tokens, k, out)
    mark_stage(timer, "combine", res.cupy_stream)


def _weighting(buf: ChunkBuffers, b2) -> RowScaleEpilogue:
    """GEMM 2's epilogue in the step: each row times its routing weight
    (``buf.row_weights``, written by the placement), b2 added first; the
    combine is then a plain sum of each token's rows (``sum_rows``)."""
    return RowScaleEpilogue(buf.row_weights.data.ptr, _ptr(b2))


class StepLaunches:
    """The launches of one kernel step (see :func:`kernel_step`), arguments
    packed once: calling it queues the step for new inputs (x, ids, weights,
    out, dropped given by address) at the cost of one driver call per launch.
    ``overlap``: each launch a programmatic dependent launch
    (:data:`OVERLAP_LAUNCHES`)."""

    def __init__(self, launches, gemm_outs, overlap: bool = False):
        if overlap:
            launches = tuple(None if f is None else f.launch_overlapped for f in launches)
        self.place, self.histogram, self.column_scan, self.scan, self.assign, self.gather = launches[:6]
        self.gemm1, self.activation, self.gemm2, self.combine = launches[6:]
        self.gemm1_out, self.gemm2_out = gemm_outs

    def __call__(
        self, stream: int, x: int, ids: int, weights: int, out: int, dropped: int, mark=None
    ) -> None:
        """Queue the step on the raw stream handle ``stream``; ``mark``: called
        with each stage's name after its launches (a timer's marks, as the step
        launched afresh makes them; an empty stage is marked too)."""
        if self.place is not None:  # the whole placement in one launch (places_in_one_launch)
            self.place(stream, ids, weights, x, dropped)
        else:
            self.histogram(stream, ids)  # also resets row_to_pair to -1
            if self.column_scan is not None:  # one block of pairs: the histogram did its work
                self.column_scan(stream)
            if self.scan is not None:  # None: the histogram launch wrote the schedule
                self.scan(stream)
            self.assign(stream, ids, dropped, weights)
            if mark is not None:
                mark("plan")
            if self.gather is not None:  # None: GEMM 1 reads x through row_to_pair
                self.gather(stream, x)
        if mark is not None:  # (one test per stage, no call: the hot path's count of calls is held)
            if self.place is not None:
                mark("plan")
            mark("gather")
        self.gemm1(stream, self.gemm1_out, x)  # x: a slot of the gathering GEMM only (zip stops at the slots)
        if mark is not None:
            mark("gemm1")
        if self.activation is not None:
            self.activation(stream, ids)
        if mark is not None:
            mark("activation")
        self.gemm2(stream, self.gemm2_out)  # tile counter 1: no second offsets launch
        if mark is not None:
            mark("gemm2")
        self.combine(stream, out)
        if mark is not None:
            mark("combine")


def step_launches(
    res,
    shape: LayerShape,
    buf: ChunkBuffers,
    x,
    ids,
    weights,
    params,
    out,
    dropped,
    gather=False,
    overlap=None,
) -> StepLaunches:
    """The launches :func:`kernel_step` makes afresh with a timer, prepared
    (:class:`~cublas_grouped.moe.kernels.Prepare`): every argument but the
    addresses of x, ids, weights, out and dropped is fixed by the buffers, T
    and the weights (``params``); the slots below name where those go in each
    kernel's parameters (moe/kernels.py's signatures). ``gather``: GEMM 1
    reads x through row_to_pair (:func:`gather_in_gemm1`), no gather launch.
    ``overlap``: programmatic dependent launches (None: :func:`overlapped`)."""
    w1, w2, b1, b2 = params
    arch = kernel_arch(res)
    tokens, k = ids.shape
    e, pairs = shape.num_experts, tokens * k
    pair_to_row, row_to_pair = buf.pair_to_row[:pairs], buf.row_to_pair[:pairs]
    x_rows, h, act, y = buf.rows[:pairs], buf.h[:pairs], buf.act[:pairs], buf.y[:pairs]
    prep = K.Prepare()
    base = buf.schedule.data.ptr
    if places_in_one_launch(e, pairs):
        prep.slots = (0, 5, 6, 17)  # ids, weights, x, dropped
        place = K.place_one_block(
            prep,
            arch,
            ids,
            e,
            weights,
            x,
            hopper.BLOCK_M,
            buf.counts,
            hopper.schedule_addresses(base, e),
            pair_to_row,
            row_to_pair,
            row_weights=buf.row_weights[:pairs],
            dropped=dropped,
            rows=None if gather else x_rows,
        )
        four = (None, None, None, None, None)
    else:
        place, four = None, placement_launches(prep, arch, buf, x, ids, weights, dropped, e, gather)
    gemm1 = (e, pairs, shape.width, shape.hidden, shape.trans_b, shape.dtype)
    tile_bound = hopper.max_tiles(pairs, e)
    # GEMM 1's a: the copy's address, or (gathering) x, a slot of the launch.
    a1, rows1 = (0, hopper.RowGather(row_to_pair.data.ptr, k, tokens)) if gather else (x_rows.data.ptr, None)
    activation = None
    if gated_epilogue(shape, pairs):
        codes = tuple((f"ACT_{name.upper()}", code) for name, code in K.ACTIVATIONS.items())
        fused = hopper.GatedEpilogue(K.ACTIVATIONS[shape.activation], codes, _ptr(b1))
        first = hopper.prepared_gemm(
            res.device_id, gemm1, (a1, w1.data.ptr), base, tile_bound, fused, gather=rows1
        )
        first_out = act.data.ptr
    else:
        first = hopper.prepared_gemm(res.device_id, gemm1, (a1, w1.data.ptr), base, tile_bound, gather=rows1)
        first_out = h.data.ptr
        prep.slots = (7,)  # ids
        activation = K.expert_activation(
            prep,
            arch,
            h,
            shape.inter,
            int(shape.gated),
            K.ACTIVATIONS[shape.activation],
            b1,
            row_to_pair,
            ids,
            act,
            shape.gate_up_block,
        )
    gemm2 = (e, pairs, shape.hidden, shape.inter, shape.trans_b, shape.dtype)
    second = hopper.prepared_gemm(
        res.device_id, gemm2, (act.data.ptr, w2.data.ptr), base, tile_bound, _weighting(buf, b2), counter=1
    )
    prep.slots = (5,)  # out
    combine = K.sum_rows(prep, arch, y, pair_to_row, tokens, k, out)
    launches = (place, *four, first, activation, second, combine)
    overlap = overlapped(pairs) if overlap is None else overlap
    return StepLaunches(launches, (first_out, y.data.ptr), overlap=overlap)


def gather_in_gemm1(x) -> bool:
    """Whether this step's GEMM 1 reads x through row_to_pair (:data:`GATHER_IN_GEMM1`
    and x 16-byte aligned: the kernel copies 16-byte chunks of its rows)."""
    return GATHER_IN_GEMM1 and x.data.ptr % hopper.ALIGNMENT == 0
