"""Our own Hopper back end: ``kernels/grouped_gemm_sm90.cu`` (TMA loads, wgmma), compiled by NVRTC for sm_90a.

What it runs (algorithm SM90_GROUPED): the grouped product on grouped-contiguous
rows, ``out[o_g + r] = a[o_g + r] @ b[g]`` with weights in the ``[E, K, N]``
layout (gmm's default; wgmma reads them N-major), or ``a[o_g + r] @ b[g].T``
with weights in the ``[E, N, K]`` layout (``trans_b=True``; K-major),
bfloat16 or float16 in and out, fp32 accumulation.
The group sizes are read on the device: a tiny kernel turns them into row and
tile offsets, and the GEMM's CTAs find their tile's group there, so nothing
crosses to the host and the launch sizes depend only on M, N and E.

Where it stands (docs/kernel-notes.md has the measurements): 128 x 256 tiles
(thin 64 x 256 tiles at decode sizes, ``hopper_variants``), a load warpgroup
filling a ring of shared-memory stages ahead of two math warpgroups,
persistent CTAs taking tiles from a device counter (:data:`SCHEDULE`) and
searching the schedule in shared memory. AUTO takes it where measured faster
than cuBLAS (``select.with_own_kernel``, ``select.OWN_KERNEL_MARGIN``).
"""

from __future__ import annotations

import threading

import numpy as np

from ...runtime import launch as _fast
from ...runtime import nvrtc as _kernels
from ...runtime.arrays import BFLOAT16
from ..plan import GemmPlan, Operands
from ..plan import misaligned as _misaligned
from ..pointers import device_sizes
from .hopper_schedule import (
    OFFSETS_SIGNATURE,
    STREAM_SCHEDULE_GROUPS,
    TILE_COUNTERS,
    offsets_args,
    schedule_addresses,
    schedule_base,
    schedule_buffers,
    schedule_ints,
)
from .hopper_schedule import tile_schedule as host_tile_schedule
from .hopper_sizes import READ_DTYPES
from .hopper_variants import THIN_TILE_M, GatedEpilogue, RowGather, choice_key, epilogue_args, kernel_defines
from .tma import MAP_CACHE_SIZE, tensor_map

__all__ = [
    "ARCH",
    "BLOCK_M",
    "BLOCK_N",
    "BLOCK_K",
    "B_SPAN",
    "STAGES",
    "DEFINES",
    "SHARED_BYTES",
    "shared_bytes",
    "unsupported",
    "unsupported_shape",
    "ALIGNMENT",
    "misaligned",
    "tile_schedule",
    "weights_layout",
    "b_map_shape",
    "max_tiles",
    "SCHEDULES",
    "SCHEDULE",
    "CTAS_PER_SM",
    "GRID_LIMIT",
    "grid_size",
    "MAP_CACHE_SIZE",
    "tensor_map",
    "schedule_buffers",
    "grouped_contiguous",
    "masked_fixed_capacity",
    "grouped_rows",
    "schedule_offsets",
    "schedule_ints",
    "schedule_addresses",
    "schedule_base",
    "offsets_kernel",
    "offsets_args",
    "OFFSETS_KERNELS",
    "OFFSETS_SIGNATURE",
    "TILE_COUNTERS",
    "prepared_gemm",
    "PREPARED_LAUNCHES",
    "STREAM_SCHEDULE_GROUPS",
    "GatedEpilogue",
    "RowGather",
    "GATE_UP_BLOCK",
]

# The one source of the kernel's tile shape: kernels/grouped_gemm_sm90.cu gets
# these as NVRTC defines and refuses to compile without them.
BLOCK_M = 128  # rows of a tile: two math warpgroups of wgmma m64
BLOCK_N = 256  # columns of a tile: wgmma n256 (128 fp32 accumulators per thread)
BLOCK_K = 64  # K of one stage: 128 bytes of a 16-bit type, one row of the 128-byte swizzle
# Columns of N in one TMA box of [E, K, N] weights (the kernel's SM90_B_SPAN, fixed
# by the 128-byte swizzle): a 256-column tile is 4 boxes per stage.
B_SPAN = 64
STAGES = 4  # shared-memory stages the load warpgroup fills ahead of the MMAs (48 KiB each)
# Rows of a's small TMA box (two 1024-byte swizzle atoms): a tile with at most
# SMALL_A_ROWS rows of its group loads only the small boxes holding them (a
# decode tile of 4 rows: 2 KiB of a per stage, not 16), others one box of
# BLOCK_M rows (8 small loads per stage cost 6-35% on full tiles, measured).
A_BOX_ROWS = 16
SMALL_A_ROWS = 64  # SM90_SMALL_A_ROWS (docs/kernel-notes.md, "What an FP8 tail tile costs")
TILE_THREADS = 1024  # grouped_tile_offsets' one block
TABLE_MAX_GROUPS = 1024  # schedules copied into shared memory (v14): 4 * (3E + 1) bytes, within 227 KiB
THREADS = 384  # a load warpgroup and two math warpgroups
DEFINES = {
    "SM90_BLOCK_M": BLOCK_M,
    "SM90_BLOCK_N": BLOCK_N,
    "SM90_BLOCK_K": BLOCK_K,
    "SM90_STAGES": STAGES,
    "SM90_TILE_THREADS": TILE_THREADS,
    "SM90_A_BOX_ROWS": A_BOX_ROWS,
    "SM90_SMALL_A_ROWS": SMALL_A_ROWS,
    "SM90_TABLE_MAX_GROUPS": TABLE_MAX_GROUPS,
    "SM90_THIN": 0,  # thin tiles: chosen per launch (hopper_variants.tile_defines)
    "SM90_FOLD_ROWS": 0,  # v15's fold: set per launch (hopper_variants.fold_defines)
}
# The kernel source (kernels/<SOURCE>.cu), read at each call: a probe can time
# an earlier version of the kernel beside this one in the same run.
SOURCE = "grouped_gemm_sm90"
ARCH = "sm_90a"  # wgmma and TMA need the architecture-specific target
# The store's staging areas: per math warpgroup 64 rows of 64 columns at a
# pitch of 72 elements (the kernel's SM90_C_PITCH).
C_PITCH = 72


def shared_bytes(
    stages=STAGES, block_n=BLOCK_N, groups=0, *, thin=0, table_max=TABLE_MAX_GROUPS, fold=0
) -> int:
    """Dynamic shared memory: the ring (``stages`` of ``block_n``-column tiles of
    BLOCK_M rows, or THIN_TILE_M with ``thin``, and ``fold`` rows more per
    stage with v15's fold), the staging areas, 1024 bytes to align the ring,
    the schedule of ``groups`` <= ``table_max``."""
    table = 4 * (3 * groups + 1) if 0 < groups <= table_max else 0
    tile_m = THIN_TILE_M if thin else BLOCK_M
    return stages * (tile_m + block_n + fold) * BLOCK_K * 2 + 2 * 64 * C_PITCH * 2 + 1024 + table


SHARED_BYTES = shared_bytes()
_SUFFIX = {"bfloat16": "bf16", "float16": "f16"}


def unsupported(sm: tuple[int, int], dtype, plan: GemmPlan) -> str | None:
    """Why this back end cannot run ``plan`` (None when it can)."""
    return unsupported_shape(sm, dtype, plan.n, plan.k, trans_a=plan.trans_a)


def unsupported_shape(sm: tuple[int, int], dtype, n: int, k: int, *, trans_a: bool = False) -> str | None:
    """Why this back end cannot run an ``[M, K] @ [K, N]`` grouped product of
    ``dtype`` on an SM ``sm`` GPU (None when it can): what :func:`unsupported`
    asks of a plan, from the sizes alone (AUTO asks it before any plan)."""
    if tuple(sm) != (9, 0):
        return f"needs an SM 9.0 GPU (Hopper); this one is SM {sm[0]}.{sm[1]}"
    if np.dtype(dtype).name not in _SUFFIX:
        return f"takes bfloat16 or float16; got {np.dtype(dtype).name}"
    if trans_a:
        return "does not run the K-grouped product (trans_a)"
    if k % 8 or n % 8:
        return f"needs K and N to be multiples of 8 (16-byte rows); got K={k}, N={n}"
    return None


# TMA reads global memory from 16-byte aligned addresses only, and the
# epilogue stores 16-byte chunks of output rows.
ALIGNMENT = 16


def misaligned(a_ptr: int, b_ptr: int, out_ptr: int) -> str | None:
    """Why the kernel cannot take these addresses (None when it can): each of
    ``a``, ``b`` and ``out`` must start at a multiple of :data:`ALIGNMENT` bytes
    (with K and N multiples of 8, every row then does too)."""
    return _misaligned(a_ptr, b_ptr, out_ptr, ALIGNMENT)


def weights_layout(trans_b: bool) -> str:
    """The kernel family for weights stored ``[E, N, K]`` (``trans_b``, K-major:
    ``"nt"``) or ``[E, K, N]`` (N-major: ``"nn"``)."""
    return "nt" if trans_b else "nn"


def b_map_shape(e: int, n: int, k: int, trans_b: bool, block_n: int = BLOCK_N) -> tuple[tuple, tuple]:
    """(shape, box) of the TMA map of ``E`` groups' weights, outermost first,
    for tiles of ``block_n`` columns.

    ``[E, N, K]``: the 2-D ``[E * N, K]`` with one box of ``block_n`` rows per stage
    (a tile's rows past N read the next group's weights; those columns are
    never stored). ``[E, K, N]``: the 3-D ``[E, K, N]`` with boxes of BLOCK_K
    rows by B_SPAN columns, ``block_n`` / B_SPAN of them per stage; 3-D so that a
    K tail reads zeros and not the next group's first rows (a 2-D
    ``[E * K, N]`` map would rely on the zeros of ``a``, and 0 * inf is NaN).
    """
    if trans_b:
        return (e * n, k), (block_n, BLOCK_K)
    return (e, k, n), (1, BLOCK_K, B_SPAN)


def max_tiles(total_rows: int, num_groups: int) -> int:
    """Tiles of BLOCK_M rows the launch covers: the most any sizes summing to
    ``total_rows`` over ``num_groups`` groups can need (one partial tile per group)."""
    return -(-total_rows // BLOCK_M) + num_groups


# How CTAs take tiles (the kernel is the same; only the grid differs; CTA x
# takes tile x, then whichever tile is next on a counter in device memory
# when its ring has room for one, v7):
#   "persistent": CTAS_PER_SM per SM; a CTA's ring flows from tile to tile, so
#                 the next tile's loads overlap this tile's stores;
#   "per_tile":   one CTA per tile, as through v5 (each CTA's loop runs once).
# A module setting, read at each call, so that a probe can time both in one run.
SCHEDULES = ("persistent", "per_tile")
# Persistent CTAs taking tiles from the device counter (v7): measured on an
# H100 (docs/kernel-notes.md, v7), 2-5% faster than one CTA per tile on
# Mixtral, Qwen3 and DeepSeek-V3 at 16384 tokens and on Mixtral and Qwen3 at
# 4096; 0.6% (nt) and 2.9% (nn) slower on DeepSeek-V3 at 4096, the case
# bound by reading 15 GB of weights. (v6's fixed stride was 9-41% slower
# where groups are uneven in tiles per CTA.)
SCHEDULE = "persistent"
# One CTA per SM: its ring takes most of the 227 KiB an SM offers, and its 384
# threads up to 168 registers each; two would need what one SM does not have.
CTAS_PER_SM = 1


def grid_size(tile_bound: int, sm_count: int, schedule: str | None = None, limit: int | None = None) -> int:
    """CTAs of one launch: ``tile_bound`` (the most tiles the sizes can need,
    :func:`max_tiles` times the column tiles) for ``"per_tile"``; for
    ``"persistent"`` at most ``CTAS_PER_SM * sm_count``, and at most ``limit``
    when given (tests force many tiles per CTA with a small one)."""
    schedule = SCHEDULE if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    if schedule == "per_tile":
        return max(tile_bound, 1)
    cap = CTAS_PER_SM * sm_count if limit is None else limit
    if cap < 1:
        raise ValueError(f"the persistent grid needs at least one CTA; got {cap}")
    return max(min(tile_bound, cap), 1)


# Tests only: the persistent grid's CTA count instead of CTAS_PER_SM per SM.
GRID_LIMIT: int | None = None
_sm_counts: dict[int, int] = {}


def _sm_count(device_id: int) -> int:
    """Multiprocessors of ``device_id`` (asked once per device)."""
    count = _sm_counts.get(device_id)
    if count is None:
        import cupy

        attribute = cupy.cuda.runtime.cudaDevAttrMultiProcessorCount
        count = _sm_counts[device_id] = int(cupy.cuda.runtime.deviceGetAttribute(attribute, device_id))
    return count


def tile_schedule(sizes: np.ndarray, block_m=BLOCK_M, capacity=0, total_rows: int | None = None):
    """:func:`~.hopper_schedule.tile_schedule` (the NumPy model of the offsets
    kernel's schedule, for tests) with this kernel's BLOCK_M by default."""
    return host_tile_schedule(sizes, block_m, capacity, total_rows)


_shared_set: set[tuple] = set()


def _allow_shared_memory(kernel, device_id: int, nbytes: int = SHARED_BYTES) -> None:
    """Raise the kernel's dynamic shared memory limit to ``nbytes`` (once per
    kernel and device): above 48 KiB a launch needs the opt-in."""
    key = (id(kernel), device_id)
    if key in _shared_set:
        return
    from cuda.bindings import driver

    attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    handle = kernel.handle
    if isinstance(handle, driver.CUkernel):
        (status,) = driver.cuKernelSetAttribute(attribute, nbytes, handle, driver.CUdevice(device_id))
    else:
        (status,) = driver.cuFuncSetAttribute(handle, attribute, nbytes)
    if status != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"could not allow {nbytes} bytes of shared memory for the sm90 kernel: {status}")
    _shared_set.add(key)


_scan_kernels: dict = {}  # (SOURCE, sizes' dtype) -> the offsets kernel (reads no define a probe swaps)
# The offsets kernel's entry point per sizes' dtype it reads in place (others are cast to int64 first).
OFFSETS_KERNELS = {np.dtype(np.int32): "grouped_tile_offsets", np.dtype(np.int64): "grouped_tile_offsets_i64"}


def offsets_kernel(dtype=np.int32):
    """The offsets kernel of :data:`SOURCE` reading sizes of ``dtype`` (int32:
    ``grouped_tile_offsets``, int64: ``grouped_tile_offsets_i64``; found once)."""
    scan = _scan_kernels.get((SOURCE, dtype))
    if scan is None:
        name = OFFSETS_KERNELS[np.dtype(dtype)]
        scan = _scan_kernels[(SOURCE, dtype)] = _kernels.get_kernel(SOURCE, name, ARCH, defines=DEFINES)
    return scan


def _scan(res, sizes_ptr: int, e: int, total_rows: int, capacity: int, base: int, dtype=np.int32) -> None:
    """The offsets kernel on ``res``'s stream into the schedule ints at ``base``."""
    args = offsets_args(sizes_ptr, e, total_rows, capacity, base)
    _kernels.launch_signed(res.stream, offsets_kernel(dtype), 1, TILE_THREADS, OFFSETS_SIGNATURE, args)


def _readable(sizes):
    """``sizes`` (a CuPy integer array) as the offsets kernel reads it: int32
    and int64 as they are, other integer dtypes cast to int64 (a cast kernel)."""
    return sizes if sizes.dtype in READ_DTYPES else sizes.astype(np.int64)


def schedule_offsets(res, sizes, e: int, total_rows: int, capacity: int = 0, *, storage=None):
    """Run the offsets kernel on ``res``'s stream for ``sizes`` (an integer
    [E] array on the device; int32 and int64 read in place): fills
    :func:`schedule_buffers` and zeroes both tile counters.
    ``capacity`` 0: grouped-contiguous rows over ``total_rows`` (M) rows,
    sizes made safe on the device (negative ones count as 0, cut where their
    sum reaches M; valid sizes unchanged); > 0: the masked layout (each size
    cut to the capacity; ``total_rows`` not read). Returns the row_offsets
    view [E + 1] (contiguous: the exclusive prefix of the sizes, then their
    total), which callers placing rows may use.
    ``storage``: as in :func:`schedule_buffers`."""
    sizes = _readable(sizes)
    e = int(e)
    _scan(res, sizes.data.ptr, e, int(total_rows), int(capacity), schedule_base(res, e, storage), sizes.dtype)
    return schedule_buffers(res, e, storage)[0]


# Columns of one gate (or up) block of packed first-GEMM weights: half a tile.
GATE_UP_BLOCK = BLOCK_N // 2


# Prepared GEMM launches per thread (runtime.launch.FixedLaunch: tensor maps
# and arguments packed once), keyed by everything their arguments and grid
# hold except the output address, which each launch writes in; at most
# PREPARED_LAUNCHES (then started over). DEFINES are keyed too: a probe swaps
# them between calls (``--define``), and a launch prepared under others would
# replay the other kernel (every probe A/B by define before 2026-11-27 did).
PREPARED_LAUNCHES = 256
_local = threading.local()


def _launch(
    res,
    sizes,
    problem,
    ptrs,
    *,
    capacity,
    tile_bound,
    scanned=False,
    storage=None,
    epilogue=None,
    counter=0,
    gather=None,
) -> None:
    """The offsets kernel (unless ``scanned``: :func:`schedule_offsets` ran
    on this stream with these sizes, and no GEMM since used tile counter
    ``counter``), then the GEMM taking its tiles from that counter, on ``res``'s stream.
    ``problem``: (E, M, N, K, trans_b, dtype); ``ptrs``: (a, b, out) addresses.
    ``capacity`` 0: grouped-contiguous rows; > 0: the masked layout of
    ``capacity`` rows per group. ``tile_bound``: the most row tiles any sizes
    can need (the grid, and so a captured launch, depends on it and not on
    the sizes). ``epilogue``: a :class:`GatedEpilogue` (``out`` is then [M, N /
    2]), a ``RowScaleEpilogue`` or None (the plain product). ``gather``: a :class:`RowGather`
    (``ptrs[0]`` is then x, [gather.rows, K]), or None. ``sizes``: an integer
    CuPy array, or the address of int32 sizes."""
    e = problem[0]
    base = schedule_base(res, e, storage)
    if not scanned:
        if type(sizes) is int:
            _scan(res, sizes, e, problem[1], capacity, base)
        else:
            sizes = _readable(sizes)
            _scan(res, sizes.data.ptr, e, problem[1], capacity, base, sizes.dtype)
    if gather is None:
        prepared_gemm(res.device_id, problem, ptrs, base, tile_bound, epilogue, counter)(res.stream, ptrs[2])
    else:  # x is a slot of the launch, not a key
        gemm = prepared_gemm(
            res.device_id, problem, (0, ptrs[1]), base, tile_bound, epilogue, counter, gather
        )
        gemm(res.stream, ptrs[2], ptrs[0])


def prepared_gemm(
    device_id: int, problem, ptrs, base: int, tile_bound: int, epilogue=None, counter: int = 0, gather=None
):
    """The GEMM of :func:`_launch` as a :class:`~cublas_grouped.runtime.launch.FixedLaunch`
    (call it with the stream and the output address, and with a ``gather``
    the address of x after it), kept per thread by everything else it holds:
    ``base`` is the address of the schedule ints, ``counter`` which of its
    tile counters (0 or 1) the GEMM takes tiles from."""
    key = (device_id, problem, *ptrs[:2], base, tile_bound, epilogue, counter, gather)
    key += (SOURCE, SCHEDULE, GRID_LIMIT, choice_key(DEFINES))  # what a probe swaps between calls

    def build():
        return _prepare_gemm(device_id, problem, ptrs, base, tile_bound, epilogue, counter, gather)

    return _fast.prepared_per_thread(_local, key, build, PREPARED_LAUNCHES)


def _prepare_gemm(
    device_id: int, problem, ptrs, base: int, tile_bound: int, epilogue, counter: int, gather=None
):
    """The GEMM's :class:`FixedLaunch` (slots: the output address; with a
    ``gather``, x's address after it)."""
    e, m, n, k, trans_b, dtype = problem
    dtype = np.dtype(dtype)
    name = f"grouped_gemm_{weights_layout(trans_b)}_{_SUFFIX[dtype.name]}"
    defines = kernel_defines(DEFINES, trans_b, m, e, epilogue, gather, counter)
    gemm = _kernels.get_kernel(SOURCE, name, ARCH, defines=defines)
    # Width and ring as compiled (a probe may change them); the opt-in: the most any E asks, set once.
    block_n, table_max = defines["SM90_BLOCK_N"], defines["SM90_TABLE_MAX_GROUPS"]
    ring = {"thin": defines["SM90_THIN"], "table_max": table_max, "fold": defines["SM90_FOLD_ROWS"]}
    shmem = shared_bytes(defines["SM90_STAGES"], block_n, e, **ring)
    _allow_shared_memory(gemm, device_id, shared_bytes(defines["SM90_STAGES"], block_n, table_max, **ring))
    element = BFLOAT16 if dtype == BFLOAT16 else dtype
    tmap_b = tensor_map(ptrs[1], *b_map_shape(e, n, k, trans_b, block_n), element, device_id)
    if gather is None:
        tmap_a = tensor_map(ptrs[0], (m, k), (BLOCK_M, BLOCK_K), element, device_id)
        tmap_a_rows = tensor_map(ptrs[0], (m, k), (defines["SM90_A_BOX_ROWS"], BLOCK_K), element, device_id)
    else:  # a is read by cp.async: its maps are not read (b's stands in)
        tmap_a = tmap_a_rows = tmap_b
    args = (
        tmap_a,
        tmap_a_rows,
        tmap_b,
        *map(np.intp, schedule_addresses(base, e, counter)),
        *map(np.int32, (e, m, n, k)),
        np.intp(0),  # the output: written by each launch (slot 11)
        *epilogue_args(epilogue),  # the bias (0: none), and a row-scale epilogue's scales
    )
    if gather is not None:  # x (slot 13: written by each launch), src, top_k, x's rows
        args += (np.intp(0), np.intp(gather.src), np.int32(gather.top_k), np.int32(gather.rows))
    grid = grid_size(tile_bound * -(-n // block_n), _sm_count(device_id), limit=GRID_LIMIT)
    label = f"{name} (kernels/{SOURCE}.cu, {ARCH})"
    slots = (11,) if gather is None else (11, 13)
    return _fast.FixedLaunch(gemm, grid, THREADS, args, shmem=shmem, slots=slots, label=label)


def grouped_contiguous(res, plan: GemmPlan, ops: Operands, dtype, *, sizes_dev=None) -> None:
    """SM90_GROUPED: ``plan`` on ``res``'s stream (grouped-contiguous rows,
    ``[E, K, N]`` weights, or ``[E, N, K]`` with ``plan.trans_b``); group sizes
    from ``sizes_dev`` (an integer array on the device, unchecked: made safe
    on the device by the offsets kernel, ``backends/hopper_sizes.py``) when
    given, else the plan's host sizes, uploaded. No host synchronization.

    The caller checked :func:`unsupported`, and that M, N and K are not zero.
    """
    problem = (plan.num_experts, plan.total_rows, plan.n, plan.k, plan.trans_b, dtype)
    sizes = device_sizes(plan, res) if sizes_dev is None else sizes_dev
    grouped_rows(res, problem, (ops.a, ops.b, ops.c), sizes)


def grouped_rows(
    res, problem, ptrs, sizes_dev, *, scanned=False, storage=None, epilogue=None, counter=0, gather=None
) -> None:
    """Grouped-contiguous rows given by addresses: ``problem`` (E, M, N, K,
    trans_b, dtype), ``ptrs`` (a [M, K], b, out [M, N], C-contiguous),
    ``sizes_dev`` an integer [E] array on the device (or the address of int32
    sizes): the offsets kernel counts negative sizes as 0 and cuts them where
    their sum reaches M (rows past their sum are neither computed as tiles of
    their own nor written).
    ``scanned``: :func:`schedule_offsets` already ran on this stream with
    these sizes and ``storage``, and no GEMM since took tiles from counter
    ``counter`` (0 or 1: a layer's GEMM 1 takes 0, its GEMM 2 then 1, with
    one offsets launch for both); ``storage``: as in :func:`schedule_buffers`. No host sync.
    The grid covers any sizes summing to M (:func:`max_tiles`), so it does not
    depend on the sizes: a captured graph replays with new ones. The caller
    checked what :func:`masked_fixed_capacity` lists. ``epilogue``: as in
    :func:`_launch` (N a multiple of 2 * :data:`GATE_UP_BLOCK`). ``gather``: a
    :class:`RowGather`: ``ptrs[0]`` is then x ``[gather.rows, K]`` (16-byte
    aligned) and a's rows are read through ``gather.src`` (v11).
    """
    if gather is not None and ptrs[0] % ALIGNMENT:
        raise ValueError(f"gather: x must start at a multiple of {ALIGNMENT} bytes; got address {ptrs[0]:#x}")
    tile_bound = max_tiles(problem[1], problem[0])
    kw = {"scanned": scanned, "storage": storage, "epilogue": epilogue, "counter": counter, "gather": gather}
    _launch(res, sizes_dev, problem, ptrs, capacity=0, tile_bound=tile_bound, **kw)


def masked_fixed_capacity(res, problem, ptrs, counts_dev, capacity: int, *, storage=None) -> None:
    """The masked fixed-capacity layout on ``res``'s stream: ``problem`` (E, M,
    N, K, trans_b, dtype) with M = E * C (C = ``capacity``), ``ptrs`` (a
    [E, C, K], b, out [E, C, N], C-contiguous), ``counts_dev`` int32 [E] on the
    device: group g's first min(counts[g], C) rows are computed and written,
    its other rows neither (no tile is spent on them, and they keep what they
    held). No host sync; the launch depends on E and C only (graph-safe with
    new counts).

    The caller checked the shapes, dtype and alignment (:func:`unsupported_shape`,
    :func:`misaligned`), that E, C, N and K are not zero and that E * C < 2**31.
    """
    tile_bound = problem[0] * -(-capacity // BLOCK_M)
    kw = {"scanned": False, "storage": storage}
    _launch(res, counts_dev, problem, ptrs, capacity=capacity, tile_bound=tile_bound, **kw)
