"""The schedule ints of our Hopper kernel (``kernels/grouped_gemm_sm90.cu``):
where the offsets kernel ``grouped_tile_offsets`` writes each group's rows
and tiles and the GEMMs read them, and the two tile counters it zeroes.

One int32 array holds, for E groups: row_offsets [E + 1], row_ends [E],
tile_offsets [E + 1], tile_counters [2] (:func:`schedule_ints` in all). Two
counters, so that two GEMMs over the same sizes (a layer's GEMM 1 and GEMM 2)
need one offsets launch: each takes its tiles from its own counter, which
the offsets kernel zeroed (a counter left at a launch's count would make the
next launch skip its tiles). The array is the stream's buffer, or a caller's
own (``storage``: a layer captured in CUDA graphs beside other layers keeps
its own, since the stream's buffer moves when it grows).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "STREAM_SCHEDULE_GROUPS",
    "TILE_COUNTERS",
    "schedule_ints",
    "schedule_buffers",
    "schedule_base",
    "schedule_addresses",
    "offsets_args",
    "OFFSETS_SIGNATURE",
    "tile_schedule",
]

# Groups the stream's schedule buffer holds from its first use (the MoE
# layer's limit on experts): see schedule_buffers.
STREAM_SCHEDULE_GROUPS = 1024
# The tile counters the offsets kernel zeroes (the module notes say why two).
TILE_COUNTERS = 2


def schedule_ints(num_groups: int) -> int:
    """int32 entries of :func:`schedule_buffers` for ``num_groups`` groups."""
    return 3 * int(num_groups) + 2 + TILE_COUNTERS


def schedule_buffers(res, num_groups: int, storage=None):
    """(row_offsets [E + 1], row_ends [E], tile_offsets [E + 1], tile_counters [2]):
    int32 views of ``res``'s stream buffer that the offsets kernel fills and
    the GEMMs read (the kernel source's header says what each holds).
    After a launch with ``counter=c`` (``hopper.grouped_rows``), tile_counters[c]
    holds the number of tiles the GEMM took after each CTA's first (one atomic
    per tile loaded), which equals the launch's tile count when no tile was
    taken twice.

    ``storage``: an int32 device array of at least :func:`schedule_ints`
    entries to use instead of the stream's buffer: a caller whose launches
    are captured in CUDA graphs beside other layers' keeps its own, since the
    stream's buffer moves when a call with more groups grows it."""
    import cupy

    e = int(num_groups)
    if storage is not None:
        offsets = storage
    else:
        # Sized for at least STREAM_SCHEDULE_GROUPS groups from the first call
        # (12 KiB): a graph captured on this stream keeps the buffer's address,
        # and a later call with more groups would move it. Up to that many
        # groups, it never moves.
        nbytes = 4 * schedule_ints(max(e, STREAM_SCHEDULE_GROUPS))
        offsets = res.buffer("sm90-offsets", nbytes).view(cupy.int32)
    return (
        offsets[: e + 1],
        offsets[e + 1 : 2 * e + 1],
        offsets[2 * e + 1 : 3 * e + 2],
        offsets[3 * e + 2 : 3 * e + 2 + TILE_COUNTERS],
    )


def schedule_base(res, e: int, storage=None) -> int:
    """The device address of :func:`schedule_buffers`' ints (no views built;
    ``storage`` as there)."""
    if storage is not None:
        return storage.data.ptr
    nbytes = 4 * schedule_ints(max(e, STREAM_SCHEDULE_GROUPS))
    buf = res.buffers.get("sm90-offsets")
    return (buf if buf is not None and buf.nbytes >= nbytes else res.buffer("sm90-offsets", nbytes)).data.ptr


def schedule_addresses(base: int, e: int, counter: int = 0) -> tuple[int, int, int, int]:
    """Device addresses of :func:`schedule_buffers`' four arrays in the ints at
    ``base``; the last is tile counter ``counter`` (0 or 1) of the two."""
    return (base, base + 4 * (e + 1), base + 4 * (2 * e + 1), base + 4 * (3 * e + 2 + counter))


# The offsets kernel's parameter types (grouped_tile_offsets{,_i64}): q a
# 64-bit address, i an int32.
OFFSETS_SIGNATURE = "qiiiqqqq"


def offsets_args(sizes_ptr: int, e: int, total_rows: int, capacity: int, base: int) -> tuple:
    """The offsets kernel's arguments (:data:`OFFSETS_SIGNATURE`): the sizes at
    ``sizes_ptr``, E, ``total_rows`` (M: contiguous sizes are cut where their
    sum reaches it), ``capacity`` (0: contiguous), the schedule ints at ``base``."""
    return (sizes_ptr, e, total_rows, capacity, *schedule_addresses(base, e))


def tile_schedule(sizes, block_m: int, capacity: int, total_rows: int | None) -> np.ndarray:
    """The kernel's tile schedule, on the host: one row (group, first row, rows)
    per tile of ``block_m`` rows, in tile order (the CTA ``blockIdx.x`` of each), for tests.

    Negative sizes count as 0, as on the device. ``capacity`` > 0: the masked
    layout (group g's rows start at g * capacity; sizes past it are cut to it).
    ``total_rows`` (contiguous layout): M, where the offsets kernel cuts the
    sizes' running sum (None: sizes already within it).
    """
    sizes = np.maximum(np.asarray(sizes, dtype=np.int64), 0)
    if capacity <= 0 and total_rows is not None:
        cap = max(int(total_rows), 0)
        ends = np.cumsum(np.minimum(sizes, cap))
        sizes = np.minimum(ends, cap) - np.minimum(ends - np.minimum(sizes, cap), cap)
    if capacity > 0:
        sizes = np.minimum(sizes, capacity)
        starts = np.arange(len(sizes), dtype=np.int64) * capacity
    else:
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    tiles = -(-sizes // block_m)
    group = np.repeat(np.arange(len(sizes)), tiles)
    index = np.arange(len(group)) - np.repeat(np.cumsum(tiles) - tiles, tiles)
    first = starts[group] + index * block_m
    rows = np.minimum(block_m, starts[group] + sizes[group] - first)
    return np.stack([group, first, rows], axis=1).astype(np.int64).reshape(-1, 3)
