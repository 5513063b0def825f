"""The kernel step's placement (counts, schedule, each pair's row, the
gathered rows) as prepared launches, for steps that
:func:`~cublas_grouped.moe.kernel_step.places_in_one_launch` leaves out:
shared by the 16-bit step (:func:`~cublas_grouped.moe.kernel_step.step_launches`)
and the FP8 step (:mod:`~cublas_grouped.moe.fp8_step_launches`)."""

from __future__ import annotations

from ..gemm.backends import hopper
from . import kernels as K
from .chunk_capacity import ChunkBuffers

__all__ = ["HISTOGRAM_SCHEDULE", "histogram_schedule", "assign_rows", "placement_launches"]

# The histogram, the column scan and the offsets kernel as one launch
# (dispatch.cu's expert_histogram_schedule: the last block of the histogram
# scans the columns and writes the schedule), so the placement is two
# launches and the gather, not four. At prefill the step's launches do not
# overlap (kernel_step.OVERLAP_MAX_PAIRS), so each launch saved is a
# kernel's start and drain. The same values, bit for bit. False: the three
# launches (a probe's A/B, and the tests that compare both). Read when a
# step is prepared (part of its key).
HISTOGRAM_SCHEDULE = True


def histogram_schedule(stream, arch, buf: ChunkBuffers, ids, e: int):
    """The step's histogram with the schedule (dispatch.cu's
    expert_histogram_schedule) on ``stream`` (or prepared, where it is a
    :class:`~.kernels.Prepare`): block bases in ``buf.block_counts``, counts,
    the Hopper kernel's schedule in ``buf.schedule`` (tiles of BLOCK_M rows,
    both counters zeroed), ``buf.row_to_pair[:T*k]`` reset to -1."""
    pairs = ids.size
    return K.histogram_schedule(
        stream,
        arch,
        ids,
        pairs,
        e,
        buf.block_counts[: K.num_pair_blocks(pairs)],
        buf.row_to_pair[:pairs],
        hopper.BLOCK_M,
        buf.counts,
        hopper.schedule_addresses(buf.schedule.data.ptr, e),
        buf.ticket,
    )


def assign_rows(stream, arch, buf: ChunkBuffers, ids, e: int, dropped, weights, weigh: bool):
    """The step's assign_rows on ``stream`` (or prepared, where it is a
    :class:`~.kernels.Prepare`): each pair's row by the block bases in
    ``buf.block_counts`` and the row offsets at the start of ``buf.schedule``
    (repeats skipped, ``dropped`` counted), and with ``weigh`` each row's
    routing weight from ``weights`` in ``buf.row_weights``."""
    pairs = ids.size
    return K.assign_rows(
        stream,
        arch,
        ids,
        pairs,
        e,
        buf.block_counts[: K.num_pair_blocks(pairs)],
        buf.schedule[: e + 1],  # row_offsets: the first of the schedule's arrays
        buf.pair_to_row[:pairs],
        buf.row_to_pair[:pairs],
        skip_repeats=True,
        dropped=dropped,
        weights=weights if weigh else None,
        row_weights=buf.row_weights[:pairs] if weigh else None,
    )


def placement_launches(
    prep, arch, buf: ChunkBuffers, x, ids, weights, dropped, e: int, gather: bool, weigh: bool = True,
    quantized=None,
):  # fmt: skip
    """The placement as prepared launches (histogram, column scan or None,
    offsets or None, assign, gather or None), for the steps
    :func:`~.kernel_step.places_in_one_launch` leaves out; ``prep``'s slots
    are set here. With :data:`HISTOGRAM_SCHEDULE` the first launch also
    scans and writes the schedule (the next two None).
    ``weigh``: assign_rows writes each row's routing weight (the 16-bit
    step's GEMM 2 epilogue reads them; the FP8 step's combine weighs instead,
    and its assign launch then reads no weights: its slot 11 stays 0).
    ``quantized``: (codes, scales) of T*k rows: the gather writes the rows
    there as e4m3 (``gather_rows_fp8``, the FP8 step's GEMM 1), not into
    ``buf.rows``."""
    pairs = ids.size
    nb = K.num_pair_blocks(pairs)
    block_counts, row_to_pair = buf.block_counts[:nb], buf.row_to_pair[:pairs]
    prep.slots = (0,)  # ids
    if HISTOGRAM_SCHEDULE:
        histogram, column_scan, scan = histogram_schedule(prep, arch, buf, ids, e), None, None
    else:
        totals = buf.counts if nb == 1 else None  # as count_rows: no column scan for one block
        histogram = K.block_histogram(
            prep, arch, ids, pairs, e, block_counts, skip_repeats=True, reset=row_to_pair, counts=totals
        )
        prep.slots = ()
        column_scan = K.column_scan(prep, arch, block_counts, nb, e, buf.counts) if nb > 1 else None
        scan_args = hopper.offsets_args(buf.counts.data.ptr, e, pairs, 0, buf.schedule.data.ptr)
        scan = prep.fixed(
            hopper.offsets_kernel(), 1, hopper.TILE_THREADS, hopper.OFFSETS_SIGNATURE, scan_args
        )
    prep.slots = (0, 10, 11)  # ids, dropped, weights
    assign = assign_rows(prep, arch, buf, ids, e, dropped, weights, weigh)
    prep.slots = (0,)  # x
    rows = None if quantized is not None else buf.rows[:pairs]
    copy = (
        None
        if gather
        else K.gather_rows(prep, arch, x, buf.pair_to_row[:pairs], row_to_pair, ids.shape[1], rows, quantized)
    )
    return histogram, column_scan, scan, assign, copy
