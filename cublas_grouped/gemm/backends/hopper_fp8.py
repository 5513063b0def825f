"""Our FP8 Hopper back end: ``kernels/grouped_gemm_fp8_sm90.cu`` (TMA loads, e4m3 wgmma, block scales), for sm_90a.

What it runs: the grouped product on grouped-contiguous rows with FP8 on both
sides, ``out[o_g + r] = A[o_g + r] @ B_g.T`` where ``A = e4m3(a_q) * sa``
(activations quantized per token per 128 columns, as
:func:`~cublas_grouped.gemm.fp8.quantize_rows_fp8` gives them) and ``B_g`` is
expert g of :class:`~cublas_grouped.gemm.fp8.FP8ExpertWeights` in the
checkpoint layout (``trans_b=True``, ``[E, N, K]``) with ``"block128"``
scales; fp32 accumulation (the scales applied in fp32 once per 128 of K),
bfloat16 out. Group sizes on the host or the device; no host synchronization:
the tile schedule comes from the 16-bit kernel's ``grouped_tile_offsets``
(the same 128-row tiles), so the launch sizes depend only on M, N and E and a
captured CUDA graph replays with new sizes.

Tile shape and why (docs/kernel-notes.md, "FP8 kernel"): 128 x 128 tiles,
128-deep K stages (one scale block and one 128-byte swizzle row each), 6
stages of 32 KiB, a load warpgroup and two math warpgroups, persistent CTAs
taking tiles from a device counter, as in :mod:`.hopper`; each stage's scales
applied while the next stage's MMAs run (:data:`OVERLAP`). At decode sizes
(:func:`thin_tiles`) thin tiles of 64 x 256 keep more weight bytes in flight.
Where groups average at least 128 rows (:func:`fold_tiles`) a group's last
1 .. 16 rows are computed by the tile before them (the bf16 kernel's v15 fold).
"""

from __future__ import annotations

import threading

import numpy as np

from ...runtime import launch as _fast
from ...runtime import nvrtc as _kernels
from ...runtime.arrays import BFLOAT16, as_cupy, view
from ...runtime.device import device_info, stream_resources
from ..fp8 import is_fp8
from . import hopper, tma
from .hopper_fp8_checks import ALIGNMENT, check, check_operands, misaligned, unsupported

__all__ = [
    "ARCH",
    "BLOCK_M",
    "BLOCK_N",
    "BLOCK_K",
    "STAGES",
    "OVERLAP",
    "THREADS",
    "A_BOX_ROWS",
    "DEFINES",
    "SOURCE",
    "KERNEL",
    "SHARED_BYTES",
    "SHARED_LIMIT",
    "CLUSTER",
    "LOADERS",
    "THIN",
    "THIN_MAX_ROWS_PER_GROUP",
    "THIN_TILE_N",
    "THIN_STAGES",
    "FOLD",
    "FOLD_ROWS",
    "FOLD_MIN_ROWS_PER_GROUP",
    "FOLD_SHARED_BYTES",
    "FOLD_TABLE_MAX_GROUPS",
    "fold_tiles",
    "THIN_SHARED_BYTES",
    "THIN_TABLE_MAX_GROUPS",
    "WIDE",
    "WIDE_SHARED_BYTES",
    "WIDE_TABLE_MAX_GROUPS",
    "WIDE_DEFINES",
    "thin_tiles",
    "tile_n",
    "launch_defines",
    "shared_bytes",
    "ALIGNMENT",
    "unsupported",
    "misaligned",
    "check_operands",
    "grid_size",
    "GRID_LIMIT",
    "grouped_fp8",
    "grouped_rows_fp8",
    "launch_choice",
    "prepared_fp8_gemm",
    "PREPARED_LAUNCHES",
]

ARCH = hopper.ARCH
# The one source of the kernel's tile shape (NVRTC defines; the source refuses
# to compile without them or with other values).
BLOCK_M = hopper.BLOCK_M  # 128: hopper's grouped_tile_offsets makes this kernel's row and tile offsets
BLOCK_N = 128  # one B scale block per tile and stage; 64 fp32 registers per fragment (acc, tmp0, tmp1)
BLOCK_K = 128  # 128 bytes of e4m3: one 128-byte swizzle row and exactly one scale block
STAGES = 6  # 32 KiB each: 192 KiB of ring, the most that fits beside the store's staging areas
THREADS = 384  # a load warpgroup and two math warpgroups
# Rows of a's small TMA box: a tile whose group has at most 64 rows loads only
# the 16-row boxes that hold them (decode: 2 KiB of a per stage, not 16 KiB),
# as the bf16 kernel's SM90_A_BOX_ROWS. BLOCK_M gives the one-box load (with
# CLUSTER 1 only: a CTA pair splits the 128 rows, and takes boxes of at most 32).
A_BOX_ROWS = 16
# At most this many rows of its group, a 128 x 128 tile loads them in those
# small boxes; more, a's whole box (FP8_SMALL_A_ROWS; thin tiles always use
# the small boxes). Measured on an H200 against 64 (docs/kernel-notes.md,
# "What an FP8 tail tile costs"): groups ending in a 64-row tile 1.06-1.11x
# faster, the benchmark's routings at 1024-16384 tokens 1.000-1.036x; 16
# lost 2% on DeepSeek-V3 at 1024 tokens (32 rows a group), where the kernel
# streams weights and the whole box reads more of a.
SMALL_A_ROWS = 32
# Stage kt + 1's MMAs overlap stage kt's promotion (two temporary fragments;
# docs/kernel-notes.md, "FP8: the promotion overlapped"). 0: the serial form.
OVERLAP = 1
# CTAs per cluster (FP8_CLUSTER). 1: one CTA per tile (the default). 2: each
# schedule slot of 256 columns on a CTA pair that shares each stage of a by
# TMA multicast, so each CTA reads 24 KiB from L2 per stage instead of 32.
# Correct and bit for bit the same, but measured 1.00-1.09x slower on an H200
# with one load thread, 1.01-1.10x with two (docs/kernel-notes.md, "FP8 CTA
# pairs"): L2 does not bind the kernel. Kept for probes. Thin tiles run 1.
CLUSTER = 1
# Load threads (FP8_LOADERS). 2: thread 0 of the load warpgroup takes the
# tiles and loads a, thread 32 loads b. Measured 1.13-1.26x faster than one
# thread issuing both at prefill on an H200 (Qwen3 and DeepSeek-V3, 4096 and
# 16384 tokens), 1.00-1.03x at decode, bit for bit the same
# (docs/kernel-notes.md, "FP8 with two load threads"); CTA pairs too.
LOADERS = 2
DEFINES = {
    "FP8_BLOCK_M": BLOCK_M,
    "FP8_BLOCK_N": BLOCK_N,
    "FP8_BLOCK_K": BLOCK_K,
    "FP8_STAGES": STAGES,
    "FP8_OVERLAP": OVERLAP,
    "FP8_TABLE_MAX_GROUPS": hopper.TABLE_MAX_GROUPS,
    "FP8_A_BOX_ROWS": A_BOX_ROWS,
    "FP8_THIN": 0,
    "FP8_CLUSTER": CLUSTER,
    "FP8_LOADERS": LOADERS,
    "FP8_FOLD_ROWS": 0,  # the fold's launches set it (fold_tiles, launch_defines)
    "FP8_SMALL_A_ROWS": SMALL_A_ROWS,
}
SOURCE = "grouped_gemm_fp8_sm90"
KERNEL = "grouped_gemm_fp8_nt_bf16"
# The ring (1-byte elements), the two 64 x 64 bf16 staging areas at the pitch
# of sm90.cuh's SM90_C_PITCH, and 1024 bytes to align the ring for the swizzle.
SHARED_BYTES = STAGES * (BLOCK_M + BLOCK_N) * BLOCK_K + 2 * 64 * hopper.C_PITCH * 2 + 1024
# The most shared memory a block may have on SM 9.0 (227 KiB), less 1 KiB
# for the kernel's static part (barriers, mailboxes: 176-192 bytes by ptxas),
# which counts against it: the dynamic opt-in may not exceed the rest.
SHARED_LIMIT = 227 * 1024 - 1024

# Thin tiles (FP8_THIN, the decode shape): 64 rows x 256 columns, each math
# warpgroup 128 of the columns, 5 stages of 8 KiB of a and 32 KiB of b: 160
# KiB of weights in flight per SM where the 128 x 128 tiles keep 96 KiB (the
# measured bound of decode, docs/kernel-notes.md "FP8 thin tiles"). A group's
# 128-row schedule tile with more than 64 rows runs as two passes, each
# streaming its band of b: chosen only where groups average at most
# THIN_MAX_ROWS_PER_GROUP rows (M <= that times E: a rule of M and E alone,
# so a captured graph replays with any sizes).
THIN = True  # False: 128 x 128 tiles everywhere (a probe's A/B)
THIN_MAX_ROWS_PER_GROUP = 16
THIN_TILE_N = 2 * BLOCK_N
THIN_STAGES = 5
THIN_SHARED_BYTES = THIN_STAGES * (64 + THIN_TILE_N) * BLOCK_K + 2 * 64 * hopper.C_PITCH * 2 + 1024
# The schedule table (4 * (3E + 1) bytes) fits beside the thin ring up to this E.
THIN_TABLE_MAX_GROUPS = (SHARED_LIMIT - THIN_SHARED_BYTES - 4) // 12


def thin_tiles(m: int, e: int) -> bool:
    """Whether a launch of ``m`` rows over ``e`` groups runs thin tiles (see :data:`THIN`)."""
    return THIN and m <= THIN_MAX_ROWS_PER_GROUP * e


# Wide tiles (FP8_BLOCK_N 192, 5 stages of 40 KiB; True: prefill runs them):
# 1.2x the MMA per byte of a and b from L2. Bit for bit the 128 x 128 tiles'
# results, measured 0.95-0.98x their speed on an H200 (0.89-0.98x serial;
# docs/kernel-notes.md, "FP8 wide tiles"), so off; kept for probes.
# WIDE_DEFINES is DEFINES at import with the wide changes: a probe that
# changes DEFINES for wide tiles changes WIDE_DEFINES too.
WIDE = False
WIDE_SHARED_BYTES = 5 * (BLOCK_M + 192) * BLOCK_K + 2 * 64 * hopper.C_PITCH * 2 + 1024
WIDE_TABLE_MAX_GROUPS = (SHARED_LIMIT - WIDE_SHARED_BYTES - 4) // 12
WIDE_DEFINES = {**DEFINES, "FP8_BLOCK_N": 192, "FP8_STAGES": 5, "FP8_TABLE_MAX_GROUPS": WIDE_TABLE_MAX_GROUPS}


# The bf16 kernel's v15 fold in the FP8 kernel (FP8_FOLD_ROWS): a group's
# last 1 .. 16 rows past a whole tile computed by the tile before them (16
# rows of a more a stage: 2 KiB, 12 KiB over the ring), their own tail tile
# skipped; the folding tile walks K in the serial form (the kernel's header
# says why). Taken on 128 x 128 tiles where groups average at least
# FOLD_MIN_ROWS_PER_GROUP rows (M over E: a rule of the launch's shape, so a
# captured graph replays with any sizes; below it few groups pass a whole
# tile). Unlike the bf16 kernel's fold (128 to 256 rows), no upper bound:
# measured on an H200 (docs/kernel-notes.md, "The fold in the FP8 kernel"),
# with / without the fold, time: 4096 tokens Qwen3-30B-A3B 0.948 / 0.992
# (uniform / skewed routing), DeepSeek-V3 0.859 / 0.976; 16384 tokens (1024
# and 512 rows a group) 0.97 / 0.97 and 0.945 / 0.97; the same bits. False
# turns it off (a probe's A/B).
FOLD = True
FOLD_ROWS = 16
FOLD_MIN_ROWS_PER_GROUP = 128
FOLD_SHARED_BYTES = STAGES * (BLOCK_M + BLOCK_N + FOLD_ROWS) * BLOCK_K + 2 * 64 * hopper.C_PITCH * 2 + 1024
# The schedule table fits beside the fold's ring up to this E (255: DeepSeek-V3's
# 256 groups search the schedule in global memory when folded).
FOLD_TABLE_MAX_GROUPS = (SHARED_LIMIT - FOLD_SHARED_BYTES - 4) // 12


def fold_tiles(m: int, e: int) -> bool:
    """Whether a launch of ``m`` rows over ``e`` groups folds (see :data:`FOLD`):
    128 x 128 tiles, not thin, not wide, one CTA per tile."""
    return (
        FOLD
        and not thin_tiles(m, e)
        and not WIDE
        and DEFINES["FP8_CLUSTER"] == 1
        and DEFINES["FP8_OVERLAP"] == 1
        and m >= FOLD_MIN_ROWS_PER_GROUP * e
    )


def launch_defines(thin: bool, fold: bool = False) -> dict:
    """The kernel's defines for 128 x 128 tiles (:data:`DEFINES`, read at
    each call: a probe may vary them), with the fold when ``fold``
    (:func:`fold_tiles`), or for thin tiles. (No early prefetch of
    a layer's GEMM 2, unlike the bf16 kernel's ``SM90_PREFETCH_B``: measured
    1.04-1.19x slower on Qwen3-30B-A3B decode layers, docs/kernel-notes.md.)"""
    if not thin and fold:
        return {**DEFINES, "FP8_FOLD_ROWS": FOLD_ROWS, "FP8_TABLE_MAX_GROUPS": FOLD_TABLE_MAX_GROUPS}
    if not thin:
        return WIDE_DEFINES if WIDE else DEFINES
    return {
        **DEFINES,
        "FP8_THIN": 1,
        "FP8_CLUSTER": 1,
        "FP8_STAGES": THIN_STAGES,
        "FP8_TABLE_MAX_GROUPS": THIN_TABLE_MAX_GROUPS,
    }


def tile_n(defines: dict) -> int:
    """Columns of one CTA's tile under ``defines`` (thin tiles: two boxes of b)."""
    return defines["FP8_BLOCK_N"] * (2 if defines["FP8_THIN"] else 1)


def shared_bytes(groups: int, thin: bool = False, defines: dict | None = None) -> int:
    """The launch's dynamic shared memory under ``defines`` (default
    :func:`launch_defines` of ``thin``): the ring, the store's two staging
    areas and 1024 bytes of alignment (:data:`SHARED_BYTES`,
    :data:`THIN_SHARED_BYTES`, :data:`WIDE_SHARED_BYTES`), and the schedule
    table of ``groups`` groups (as the bf16 kernel's, v14) where the kernel
    keeps one (at most the defines' ``FP8_TABLE_MAX_GROUPS``)."""
    d = launch_defines(thin) if defines is None else defines
    tile_m = 64 if d["FP8_THIN"] else BLOCK_M
    ring = d["FP8_STAGES"] * (tile_m + tile_n(d) + d["FP8_FOLD_ROWS"]) * BLOCK_K
    base = ring + 2 * 64 * hopper.C_PITCH * 2 + 1024
    return base + (4 * (3 * groups + 1) if 0 < groups <= d["FP8_TABLE_MAX_GROUPS"] else 0)


def grid_size(
    m: int, n: int, e: int, sm_count: int, limit: int | None = None, tile_n: int = BLOCK_N, cluster: int = 1
) -> int:
    """CTAs of one launch: one per SM (at most ``limit`` when given), never more
    than the most tiles of ``tile_n`` columns any sizes summing to ``m`` over
    ``e`` groups can need. ``cluster`` 2 (CTA pairs): an even count, a pair
    per schedule slot of ``2 * tile_n`` columns; ``sm_count`` is then the
    most CTAs in pairs the GPU runs at once (:func:`_pair_ctas`)."""
    if cluster == 2:
        half = None if limit is None else max(limit // 2, 1)
        return 2 * grid_size(m, n, e, sm_count // 2, half, 2 * tile_n)
    tile_bound = hopper.max_tiles(m, e) * -(-n // tile_n)
    cap = sm_count if limit is None else limit
    if cap < 1:
        raise ValueError(f"the persistent grid needs at least one CTA; got {cap}")
    return max(min(tile_bound, cap), 1)


_pair_counts: dict = {}


def _pair_ctas(gemm, device_id: int, shmem: int) -> int:
    """The most CTAs of ``gemm`` (compiled with FP8_CLUSTER 2) that the GPU
    runs at once, in pairs: twice the driver's count of co-resident clusters
    (a persistent grid larger than that would leave pairs waiting for the
    first ones to finish: a whole slot's time at the end), asked once per
    kernel and device; every SM's when the driver cannot say."""
    key = (id(gemm), device_id)
    count = _pair_counts.get(key)
    if count is None:
        count = hopper._sm_count(device_id)
        try:
            from cuda.core import Device, LaunchConfig

            device = Device(device_id)
            config = LaunchConfig(grid=2, cluster=2, block=THREADS, shmem_size=shmem)
            count = 2 * int(gemm.occupancy.max_active_clusters(config, stream=device.default_stream))
        except Exception:  # an older cuda.core or driver: one pair per two SMs
            pass
        _pair_counts[key] = count = max(min(count, hopper._sm_count(device_id)), 2)
    return count


# Tests only: the grid's CTA count instead of one per SM.
GRID_LIMIT: int | None = None


def grouped_fp8(a_q, a_scales, weights, group_sizes, *, out=None, stream=None):
    """``out[o_g + r] = (e4m3(a_q) * a_scales)[o_g + r] @ (weights[g]).T`` for
    every group g and row r < group_sizes[g], in bfloat16, on an SM 9.0 GPU.

    Parameters
    ----------
    a_q : GPU array, uint8 [M, K]
        e4m3fn codes, rows grouped contiguously (group g at rows
        ``o_g = sum(group_sizes[:g])`` onwards).
    a_scales : GPU array, float32 [M, ceil(K / 128)]
        One scale per row per 128 columns (what ``quantize_rows_fp8`` returns).
    weights : FP8ExpertWeights, ``trans_b=True``, ``"block128"``, ``[E, N, K]``
    group_sizes : host integers (checked: E of them, not negative, summing to
        M) or a 1-D integer GPU array of E (read on the device: nothing waits
        for the host; sizes summing to more than M store no row at or past M,
        sizes summing to less leave the rows after their sum unwritten).
    out : GPU array, bfloat16 [M, N], optional (allocated when omitted).
    stream : optional; ``None`` is the current stream of ``a_q``'s device.

    Requires K % 16 == 0 and N % 8 == 0 and 16-byte aligned ``a_q``, values and
    ``out``. Bad arguments raise ``ValueError`` naming them before any GPU work.
    Bitwise deterministic. With caller-owned arrays and device sizes it can be
    captured in a CUDA graph and replayed with new sizes.
    """
    import cupy

    e, n, k = weights.shape if is_fp8(weights) else (0, 0, 0)
    a = view(a_q, "a_q")
    device = a.device if a.device is not None else cupy.cuda.Device().id
    if out is None:
        check(a.ndim == 2, f"a_q must be a 2-D array [M, K]; got {a.shape}")
        with cupy.cuda.Device(device):
            out = cupy.empty((a.shape[0], n), dtype=BFLOAT16)
    m, host_sizes = check_operands(a_q, a_scales, weights, out, group_sizes)
    reason = unsupported(device_info(device).sm, weights, BFLOAT16)
    check(reason is None, f"grouped_fp8 {reason}")
    values, o = as_cupy(weights.values, "weights.values"), as_cupy(out, "out")
    reason = misaligned(a.ptr, values.data.ptr, o.data.ptr)
    check(reason is None, f"grouped_fp8 {reason}")
    res = stream_resources(device, stream)
    with cupy.cuda.Device(device), res.cupy_stream:
        if m == 0 or n == 0:
            return out
        if k == 0:
            o.fill(0)  # an empty sum
            return out
        if host_sizes is not None:
            sizes = res.upload("sizes", host_sizes.astype(np.int32))
        else:
            sizes = as_cupy(group_sizes, "group_sizes")  # int32 and int64 read in place by the offsets kernel
        scales_ptr = as_cupy(a_scales, "a_scales").data.ptr
        _launch(res, weights, m, (a.ptr, scales_ptr, o.data.ptr), sizes)
    return out


def grouped_rows_fp8(
    res, weights, m: int, ptrs, sizes_dev, *, scanned: bool = False, storage=None, counter: int = 0
) -> None:
    """The FP8 GEMM on checked operands, on ``res``'s stream, for callers that
    own every buffer (the fixed-capacity layer's FP8 step): ``ptrs`` = the
    addresses of (e4m3 rows uint8 [m, K], their scales float32 [m, ceil(K/128)],
    out bfloat16 [m, N]); ``sizes_dev``: integer [E] group sizes on the device.
    ``scanned``: :func:`hopper.schedule_offsets` ran on this stream with
    these sizes and ``storage``, and no GEMM since took tiles from tile
    counter ``counter`` (0 or 1), so the offsets kernel is not run again;
    ``storage``: as in :func:`hopper.schedule_buffers`.
    Allocates nothing and reads nothing on the host: a CUDA graph can capture
    it. The caller checked :func:`unsupported` and :func:`misaligned`, and that
    m, N and K are not zero."""
    _launch(res, weights, m, ptrs, sizes_dev, scanned=scanned, storage=storage, counter=counter)


def _launch(
    res, weights, m: int, ptrs, sizes, *, scanned: bool = False, storage=None, counter: int = 0
) -> None:
    """The offsets kernel (grouped-contiguous rows over ``m``; not when
    ``scanned``), then the FP8 GEMM taking its tiles from tile counter
    ``counter``, on ``res``'s stream. ``ptrs``: (a_q, a_scales, out) addresses."""
    e = weights.shape[0]
    if not scanned:
        hopper.schedule_offsets(res, sizes, e, m, 0, storage=storage)
    base = hopper.schedule_base(res, e, storage)
    prepared_fp8_gemm(res.device_id, weights, m, ptrs[:2], base, counter)(res.stream, ptrs[2])


# Prepared FP8 GEMM launches per thread (runtime.launch.FixedLaunch: the three
# tensor maps and the arguments packed once), as hopper.prepared_gemm keeps the
# 16-bit kernel's: building the maps and the argument block took most of an
# eager call's host time (docs/kernel-notes.md, "The eager FP8 gmm's host
# path"). At most PREPARED_LAUNCHES (then started over).
PREPARED_LAUNCHES = 256
_local = threading.local()


def launch_choice(m: int, e: int) -> tuple:
    """What picks the kernel and grid of an FP8 launch of ``m`` rows over ``e``
    groups besides its operands, and what a probe may change between calls:
    the tile shape (:func:`thin_tiles`: :data:`THIN` and its threshold), the
    defines compiled (:func:`launch_defines`, read at each call), the grid
    limit of tests and the maps' L2 promotion. Part of every prepared FP8
    launch's key, so that a change prepares new ones."""
    thin, fold = thin_tiles(m, e), fold_tiles(m, e)
    return thin, tuple(launch_defines(thin, fold).items()), GRID_LIMIT, tma.L2_PROMOTION


def prepared_fp8_gemm(device_id: int, weights, m: int, a_ptrs, base: int, counter: int = 0):
    """The FP8 GEMM of :func:`_launch` as a :class:`~cublas_grouped.runtime.launch.FixedLaunch`
    (call it with the stream and the output address: its one slot), kept per
    thread by everything else it holds: ``a_ptrs`` = the addresses of the
    e4m3 rows and their scales, ``base`` the schedule ints' address,
    ``counter`` the tile counter (0 or 1) it takes tiles from."""
    values = as_cupy(weights.values, "weights.values")
    scales_b = as_cupy(weights.scales, "weights.scales")
    choice = launch_choice(m, weights.shape[0])
    key = (device_id, weights.shape, values.data.ptr, scales_b.data.ptr, m, *a_ptrs, base, counter, choice)

    def build():
        return _prepare_gemm(
            device_id, weights.shape, values.data.ptr, scales_b.data.ptr, m, a_ptrs, base, counter
        )

    return _fast.prepared_per_thread(_local, key, build, PREPARED_LAUNCHES)


def _prepare_gemm(device_id: int, shape, values_ptr: int, scales_ptr: int, m: int, a_ptrs, base, counter):
    """The FP8 GEMM's :class:`FixedLaunch` (slot: the output address, argument 13)."""
    e, n, k = shape
    a_ptr, a_scales_ptr = a_ptrs
    thin = thin_tiles(m, e)
    defines = launch_defines(thin, fold_tiles(m, e))
    gemm = _kernels.get_kernel(SOURCE, KERNEL, ARCH, defines=defines)
    most = defines["FP8_TABLE_MAX_GROUPS"]
    hopper._allow_shared_memory(gemm, device_id, shared_bytes(most, thin, defines))  # the most any E asks
    cluster = defines["FP8_CLUSTER"]
    # With CTA pairs each CTA loads half of a's 128-row box (and multicasts it).
    tmap_a = hopper.tensor_map(a_ptr, (m, k), (BLOCK_M // cluster, BLOCK_K), np.uint8, device_id)
    # The box the source was compiled for (a probe may vary the define).
    box_rows = defines["FP8_A_BOX_ROWS"]
    tmap_a_rows = hopper.tensor_map(a_ptr, (m, k), (box_rows, BLOCK_K), np.uint8, device_id)
    tmap_b = hopper.tensor_map(values_ptr, (e * n, k), (defines["FP8_BLOCK_N"], BLOCK_K), np.uint8, device_id)
    args = (
        tmap_a,
        tmap_a_rows,
        tmap_b,
        np.intp(a_scales_ptr),
        np.intp(scales_ptr),
        *map(np.intp, hopper.schedule_addresses(base, e, counter)),
        np.int32(e),
        np.int32(m),
        np.int32(n),
        np.int32(k),
        np.intp(0),  # the output: written by each launch (slot 13)
    )
    shmem = shared_bytes(e, thin, defines)
    ctas = _pair_ctas(gemm, device_id, shmem) if cluster == 2 else hopper._sm_count(device_id)
    grid = grid_size(m, n, e, ctas, GRID_LIMIT, tile_n(defines), cluster)
    label = f"{KERNEL} (kernels/{SOURCE}.cu, {ARCH})"
    return _fast.FixedLaunch(gemm, grid, THREADS, args, shmem=shmem, slots=(13,), label=label)
