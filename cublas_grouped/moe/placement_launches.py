"""The kernel step's placement (counts, schedule, each pair's row, the
gathered rows) as four prepared launches, for steps that
:func:`~cublas_grouped.moe.kernel_step.places_in_one_launch` leaves out:
shared by the 16-bit step (:func:`~cublas_grouped.moe.kernel_step.step_launches`)
and the FP8 step (:mod:`~cublas_grouped.moe.fp8_step_launches`)."""

from __future__ import annotations

from ..gemm.backends import hopper
from . import kernels as K
from .chunk_capacity import ChunkBuffers

__all__ = ["four_placement_launches"]


def four_placement_launches(
    prep, arch, buf: ChunkBuffers, x, ids, weights, dropped, e: int, gather: bool, weigh: bool = True
):
    """The placement as four prepared launches (histogram, column scan or
    None, offsets, assign, gather or None), for the steps
    :func:`~.kernel_step.places_in_one_launch` leaves out; ``prep``'s slots are set here.
    ``weigh``: assign_rows writes each row's routing weight (the 16-bit
    step's GEMM 2 epilogue reads them; the FP8 step's combine weighs instead,
    and its assign launch then reads no weights: its slot 11 stays 0)."""
    pairs = ids.size
    nb = K.num_pair_blocks(pairs)
    block_counts, pair_to_row, row_to_pair = (
        buf.block_counts[:nb],
        buf.pair_to_row[:pairs],
        buf.row_to_pair[:pairs],
    )
    prep.slots = (0,)  # ids
    totals = buf.counts if nb == 1 else None  # as count_rows: no column scan for one block
    histogram = K.block_histogram(
        prep, arch, ids, pairs, e, block_counts, skip_repeats=True, reset=row_to_pair, counts=totals
    )
    prep.slots = ()
    column_scan = K.column_scan(prep, arch, block_counts, nb, e, buf.counts) if nb > 1 else None
    scan_args = hopper.offsets_args(buf.counts.data.ptr, e, pairs, 0, buf.schedule.data.ptr)
    scan = prep.fixed(hopper.offsets_kernel(), 1, hopper.TILE_THREADS, hopper.OFFSETS_SIGNATURE, scan_args)
    offsets = buf.schedule[: e + 1]  # row_offsets: the first of the schedule's arrays
    prep.slots = (0, 10, 11)  # ids, dropped, weights
    assign = K.assign_rows(
        prep,
        arch,
        ids,
        pairs,
        e,
        block_counts,
        offsets,
        pair_to_row,
        row_to_pair,
        skip_repeats=True,
        dropped=dropped,
        weights=weights if weigh else None,
        row_weights=buf.row_weights[:pairs] if weigh else None,
    )
    prep.slots = (0,)  # x
    copy = None if gather else K.gather_rows(prep, arch, x, row_to_pair, ids.shape[1], buf.rows[:pairs])
    return histogram, column_scan, scan, assign, copy
