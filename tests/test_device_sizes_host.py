"""gmm with group sizes on the device, on SM 9.0 (CPU, GPU side stubbed:
tests/host_stubs.py): AUTO runs our kernel without copying the sizes, in two
launches (the offsets kernel reads the caller's int32 or int64 sizes in place
and makes them safe, backends/hopper_sizes.py; the GEMM), with prepared
launches that pass what the unprepared path passes;
CUBLAS_GROUPED_CHECK_DEVICE_SIZES brings the copy and its checks back; every
bad call still raises after hits."""

from __future__ import annotations

import numpy as np
import pytest
from host_stubs import H100, count_calls, fake_array, stub_gpu

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper_sizes

A100 = dict(sm=(8, 0), cublas_version=130100, name="NVIDIA A100-SXM4-80GB", multiprocessors=108)
E, M, N, K = 4, 16, 256, 256


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    monkeypatch.delenv(hopper_sizes.CHECK_ENV, raising=False)
    with stub_gpu(monkeypatch, info=H100) as rec:
        yield _with_copies(rec)


@pytest.fixture
def a100(monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    with stub_gpu(monkeypatch, info=A100) as rec:
        yield _with_copies(rec)


def _with_copies(rec):
    """Device-to-host copies answer with ``rec.sizes`` and are counted in ``rec.sizes_copies``."""
    rec.sizes, rec.sizes_copies = np.array([4, 4, 4, 4]), []

    def host_values(arr):
        rec.sizes_copies.append(arr.shape)
        return rec.sizes.astype(arr.dtype)

    rec.host_values = host_values
    return rec


def _operands(trans_b=False):
    return fake_array((M, K)), fake_array((E, N, K) if trans_b else (E, K, N))


def _queued(rec, out):
    def name(v):
        return "out" if v == out.data.ptr else v

    return [(h, gb, shm, st, tuple(map(name, vals))) for h, gb, shm, st, vals in rec.decoded]


@pytest.mark.parametrize("dtype", ["int32", "int64"])
@pytest.mark.parametrize("algorithm", ["auto", "sm90_grouped"])
def test_device_sizes_run_the_kernel_without_a_copy(gpu, dtype, algorithm):
    """Two launches, no copy: the offsets kernel of the sizes' dtype reading
    the caller's sizes in place (with M, so it cuts them there), the GEMM
    reading its schedule and tile counter 0; a hit queues the same, and the
    unprepared path (executor.run) too."""
    from host_stubs import STREAM

    from cublas_grouped.gemm.backends import hopper
    from cublas_grouped.gemm.config import Algorithm
    from cublas_grouped.gemm.plan import Operands, plan_gmm
    from cublas_grouped.runtime import device as D
    from cublas_grouped.runtime.arrays import view

    a, b = _operands()
    sizes = fake_array((E,), dtype)
    gpu.clear()
    out = cg.gmm(a, b, sizes, algorithm=algorithm)
    first = _queued(gpu, out)
    assert gpu.sizes_copies == [] and gpu.cublas == []
    scan, gemm = first
    assert scan[0] == hopper.offsets_kernel(np.dtype(dtype)).handle, "the entry point of the sizes' dtype"
    assert hopper.offsets_kernel(np.int32).handle != hopper.offsets_kernel(np.int64).handle
    assert scan[4][:4] == (sizes.data.ptr, E, M, 0), "the caller's sizes, E, M (the cut), contiguous"
    assert scan[1] == (1, 1, 1, hopper.TILE_THREADS, 1, 1)
    base = D.resources(0, STREAM).buffers["sm90-offsets"].data.ptr
    assert scan[4][4:] == hopper.schedule_addresses(base, E)
    assert gemm[4][3:7] == hopper.schedule_addresses(base, E, 0), "the schedule and tile counter 0"
    assert gemm[4][7:11] == (E, M, N, K)
    assert gemm[4][11] == "out" and gemm[1] == (
        hopper.grid_size(hopper.max_tiles(M, E), 132),
        1,
        1,
        384,
        1,
        1,
    )
    for _ in range(2):
        gpu.clear()
        assert _queued(gpu, cg.gmm(a, b, sizes, algorithm=algorithm, out=out)) == first
    # The unprepared path of the same plan: the same launches, value for value.
    plan = plan_gmm(view(a, "a"), view(b, "b"), None, trans_a=False, trans_b=False, num_experts=E)
    ops = Operands.for_plan(plan, a.data.ptr, b.data.ptr, out.data.ptr, 2)
    gpu.clear()
    cg.GroupedGemmExecutor().run(
        plan, ops, a.dtype, Algorithm.SM90_GROUPED, D.resources(0, STREAM), sizes_dev=sizes
    )
    assert _queued(gpu, out) == first


def test_new_operands_and_a_grown_buffer_prepare_anew(gpu):
    """The prepared launches hold a and b's TMA maps and the stream buffers'
    addresses: other operands, or a buffer grown by a call with more groups,
    must give launches with the new addresses, never the old ones."""
    from host_stubs import STREAM

    from cublas_grouped.runtime import device as D

    a, b = _operands()
    sizes = fake_array((E,), "int32")
    cg.gmm(a, b, sizes)
    a2 = fake_array((M, K))
    gpu.clear()
    out = cg.gmm(a2, b, sizes)
    assert _queued(gpu, out)[1][4][0][0] == a2.data.ptr, "the GEMM's A map is a2's"
    res = D.resources(0, STREAM)
    old = res.buffers["sm90-offsets"].data.ptr
    res.buffer("sm90-offsets", 10**6)  # grown, as a call with many groups would
    gpu.clear()
    out = cg.gmm(a2, b, sizes)
    scan, gemm = _queued(gpu, out)
    assert scan[4][4] == res.buffers["sm90-offsets"].data.ptr != old
    assert gemm[4][3:7] == scan[4][4:8], "the GEMM reads the schedule the offsets kernel wrote"


def test_the_check_env_brings_the_copy_and_its_errors_back(gpu, monkeypatch):
    a, b = _operands()
    sizes = fake_array((E,), "int32")
    cg.gmm(a, b, sizes)
    cg.gmm(a, b, sizes)
    gpu.sizes = np.array([4, 4, 4, 3])
    cg.gmm(a, b, sizes)  # unchecked: no copy, no error
    assert gpu.sizes_copies == []
    monkeypatch.setenv(hopper_sizes.CHECK_ENV, "1")
    with pytest.raises(ValueError, match=r"sum\(group_sizes\) = 15 but a has 16 rows"):
        cg.gmm(a, b, sizes)  # a hit of the unchecked entry: the variable is part of AUTO's state
    gpu.sizes = np.array([4, -1, 9, 4])
    with pytest.raises(ValueError, match="negative"):
        cg.gmm(a, b, sizes)
    gpu.sizes = np.array([4, 4, 4, 4])
    gpu.clear()
    cg.gmm(a, b, sizes)
    assert gpu.sizes_copies and gpu.cublas, "checked on the host, run on cuBLAS"
    monkeypatch.setenv(hopper_sizes.CHECK_ENV, "0")
    gpu.sizes_copies.clear()
    gpu.clear()
    cg.gmm(a, b, sizes)
    assert gpu.sizes_copies == [] and gpu.cublas == []


def test_other_gpus_still_copy_and_check(a100):
    a, b = _operands()
    sizes = fake_array((E,), "int32")
    cg.gmm(a, b, sizes)
    cg.gmm(a, b, sizes)
    assert len(a100.sizes_copies) == 2
    a100.sizes = np.array([4, 4, 4, 3])
    with pytest.raises(ValueError, match=r"sum\(group_sizes\) = 15"):
        cg.gmm(a, b, sizes)


def test_what_the_kernel_cannot_take_still_copies_and_checks(gpu):
    """float32, trans_a and misaligned operands keep the copy under AUTO."""
    sizes = fake_array((E,), "int32")
    gpu.sizes = np.array([4, 4, 4, 3])
    with pytest.raises(ValueError, match=r"sum\(group_sizes\) = 15"):
        cg.gmm(fake_array((M, K), "float32"), fake_array((E, K, N), "float32"), sizes)
    base = fake_array((M * K + 8,))
    misaligned = base[1 : M * K + 1].reshape(M, K)  # 2 bytes in: not 16-byte aligned
    with pytest.raises(ValueError, match=r"sum\(group_sizes\) = 15"):
        cg.gmm(misaligned, fake_array((E, K, N)), sizes)


def _bad_calls(a, b, sizes):
    return [
        lambda: cg.gmm(a, b, fake_array((E, 1), "int32")),
        lambda: cg.gmm(a, b, fake_array((E,), "float32")),
        lambda: cg.gmm(a, b, fake_array((E + 1,), "int32")),
        lambda: cg.gmm(fake_array((M, K + 8)), b, sizes),
        lambda: cg.gmm(fake_array((M, K), "float16"), b, sizes),
        lambda: cg.gmm(a, b, sizes, out=fake_array((M, N + 8))),
        lambda: cg.gmm(a, b, sizes, out=fake_array((M, N), "float16")),
        lambda: cg.gmm(a, b, sizes, algorithm="padded_strided"),
        lambda: cg.gmm(a, b, sizes, algorithm="fastest"),
        lambda: cg.gmm(a, b, sizes, stream=object()),
        lambda: cg.gmm(a, b, np.array([4, 4, 4, 3])),
    ]


def test_every_error_still_raises_after_hits(gpu):
    from cublas_grouped.gemm import call_cache

    a, b = _operands()
    sizes = fake_array((E,), "int64")
    expected = []
    for call in _bad_calls(a, b, sizes):
        call_cache.clear()
        with pytest.raises(Exception) as err:
            call()
        expected.append((type(err.value), str(err.value)))
    for call, want in zip(_bad_calls(a, b, sizes), expected):
        cg.gmm(a, b, sizes)
        cg.gmm(a, b, sizes)
        with pytest.raises(Exception) as err:
            call()
        assert (type(err.value), str(err.value)) == want


# Python and C calls of a repeated gmm with device sizes on SM 9.0 (counted
# 2026-11-26: 30 under AUTO with int64 sizes, 27 with sm90_grouped, three
# launches; with the clamp inside the offsets kernel, two launches: 27 and
# 24; before the prepared launches: 40 under AUTO plus the blocking copy,
# cuBLAS's grouped call and its pointer kernel, and 96 with sm90_grouped).
BUDGETS = {"auto": 30, "sm90_grouped": 27}


@pytest.mark.parametrize("algorithm", sorted(BUDGETS))
def test_hot_path_stays_short(gpu, algorithm):
    a, b = _operands(trans_b=algorithm != "auto")
    sizes = fake_array((E,), "int64")

    def call():
        return cg.gmm(a, b, sizes, trans_b=algorithm != "auto", algorithm=algorithm)

    call()
    call()
    assert count_calls(call, repeat=10) <= BUDGETS[algorithm]


def clamp_reference(sizes, total_rows: int) -> np.ndarray:
    """The sizes the offsets kernel (grouped_tile_offsets) schedules on the
    contiguous layout (int64 NumPy): each size clamped to [0, M], then cut
    where the running sum passes M."""
    m = np.clip(np.asarray(sizes, dtype=np.int64), 0, max(total_rows, 0))
    ends = np.cumsum(m)
    return (np.minimum(ends, total_rows) - np.minimum(ends - m, total_rows)).astype(np.int32)


def test_clamp_reference_hand_worked():
    assert clamp_reference([4, 4, 4, 4], 16).tolist() == [4, 4, 4, 4]  # valid sizes pass unchanged
    assert clamp_reference([4, -3, 20, 4], 16).tolist() == [4, 0, 12, 0]  # negative: 0; cut at M
    assert clamp_reference([2**40, 5], 16).tolist() == [16, 0]  # huge: no overflow
    assert clamp_reference([3, 3], 16).tolist() == [3, 3]  # short of M: unchanged (rows past 6 unwritten)
    assert clamp_reference([], 16).tolist() == []


def test_strided_device_sizes_are_copied(gpu):
    """The kernels read E consecutive sizes: a strided view of sizes takes the copy."""
    a, b = _operands()
    sizes = fake_array((2 * E,), "int32")[::2]
    gpu.sizes = np.array([4, 4, 4, 3])
    with pytest.raises(ValueError, match=r"sum\(group_sizes\) = 15"):
        cg.gmm(a, b, sizes, algorithm="sm90_grouped")
    with pytest.raises(ValueError, match=r"sum\(group_sizes\) = 15"):
        cg.gmm(a, b, sizes)


@pytest.mark.parametrize(
    "value, checks",
    [
        (None, False),
        ("", False),
        ("0", False),
        (" 0 ", False),
        ("false", False),
        ("FALSE", False),
        ("no", False),
        ("No", False),
        ("off", False),
        ("OFF", False),
        ("1", True),
        ("true", True),
        ("yes", True),
        ("on", True),
    ],
)
def test_check_variable_values(monkeypatch, value, checks):
    """CUBLAS_GROUPED_CHECK_DEVICE_SIZES: unset, empty, 0, false, no and off
    (any case, spaces around) leave device sizes unchecked; anything else checks."""
    from cublas_grouped.gemm.backends import hopper_sizes

    if value is None:
        monkeypatch.delenv(hopper_sizes.CHECK_ENV, raising=False)
    else:
        monkeypatch.setenv(hopper_sizes.CHECK_ENV, value)
    assert hopper_sizes.checks_device_sizes() is checks


def test_tile_schedule_cuts_where_the_offsets_kernel_does():
    """hopper.tile_schedule(total_rows=M), the GPU tests' model of the offsets
    kernel, schedules exactly the clamped sizes."""
    from cublas_grouped.gemm.backends import hopper

    assert hopper.tile_schedule([5, -3, 300, 4], total_rows=16).tolist() == [[0, 0, 5], [2, 5, 11]]
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(-40, 400, rng.integers(1, 20))
        m = int(rng.integers(0, 1000))
        want = hopper.tile_schedule(clamp_reference(sizes, m))
        np.testing.assert_array_equal(hopper.tile_schedule(sizes, total_rows=m), want)
    # The masked layout ignores total_rows: each size is cut to the capacity alone.
    masked = hopper.tile_schedule([300, -1, 5], capacity=200, total_rows=1)
    assert masked.tolist() == [[0, 0, 128], [0, 128, 72], [2, 400, 5]]
    # A capacity of 1 is the masked layout too (groups g * 1 apart, total_rows unread)...
    assert hopper.tile_schedule([3, 2], capacity=1, total_rows=1).tolist() == [[0, 0, 1], [1, 1, 1]]
    assert hopper.tile_schedule([0, 1], capacity=1).tolist() == [[1, 1, 1]]
    # ...and M <= 0 schedules nothing in the contiguous layout.
    for m in (0, -3):
        assert hopper.tile_schedule([5, 7], total_rows=m).shape == (0, 3)


# Host sizes on SM 9.0 (the AUTO host-sizes regression): SM90_GROUPED uploads
# the sizes once per cache entry (whose key holds their values) and then
# replays the same two prepared launches as device sizes, with no copy.


def test_sm90_host_sizes_upload_once_then_replay_two_launches(gpu):
    from host_stubs import STREAM

    from cublas_grouped.gemm import call_cache
    from cublas_grouped.gemm.backends import hopper
    from cublas_grouped.gemm.backends.hopper_device import PreparedHostSizes
    from cublas_grouped.gemm.config import Algorithm
    from cublas_grouped.gemm.plan import Operands, plan_gmm
    from cublas_grouped.runtime import device as D
    from cublas_grouped.runtime.arrays import view

    a, b = _operands()
    sizes = np.array([4, 4, 4, 4])
    out = fake_array((M, N))
    gpu.clear()
    cg.gmm(a, b, sizes, algorithm="sm90_grouped", out=out)
    (entry,) = [e for e in call_cache._local.calls.values() if e.algorithm is Algorithm.SM90_GROUPED]
    assert isinstance(entry.prepared, PreparedHostSizes)
    owned = entry.prepared.sizes.data.ptr
    uploads = [c for c in gpu.copies if c[0] == owned]
    assert len(uploads) == 1 and uploads[0][2] == 4 * E, "the sizes, once, as int32"
    first = _queued(gpu, out)
    scan, gemm = first
    assert scan[4][:4] == (owned, E, M, 0) and scan[0] == hopper.offsets_kernel(np.int32).handle
    assert gemm[4][11] == "out"
    for _ in range(2):  # hits: the same launches, nothing copied
        gpu.clear()
        assert _queued(gpu, cg.gmm(a, b, sizes, algorithm="sm90_grouped", out=out)) == first
        assert gpu.copies == [] and gpu.cublas == []
    # The unprepared path of the same plan: the same launches but for where the sizes were uploaded.
    plan = plan_gmm(view(a, "a"), view(b, "b"), sizes, trans_a=False, trans_b=False, num_experts=E)
    ops = Operands.for_plan(plan, a.data.ptr, b.data.ptr, out.data.ptr, 2)
    gpu.clear()
    cg.GroupedGemmExecutor().run(plan, ops, a.dtype, Algorithm.SM90_GROUPED, D.resources(0, STREAM))
    plain = _queued(gpu, out)
    assert plain[1] == gemm and plain[0][:4] == scan[:4] and plain[0][4][1:] == scan[4][1:]
    assert plain[0][4][0] != owned
    # Other sizes: another entry, its own upload.
    gpu.clear()
    cg.gmm(a, b, np.array([8, 0, 4, 4]), algorithm="sm90_grouped", out=out)
    assert len(gpu.copies) == 1 and gpu.copies[0][0] != owned
    assert _queued(gpu, out)[0][4][0] == gpu.copies[0][0]


def test_sm90_host_sizes_are_not_prepared_while_capturing(gpu, monkeypatch):
    """A checked call inside a graph capture keeps the unprepared path (an
    upload then would be captured, not done)."""
    import cupy

    from cublas_grouped.gemm import call_cache

    monkeypatch.setattr(cupy.cuda.runtime, "streamIsCapturing", lambda stream: 1)
    a, b = _operands()
    cg.gmm(a, b, np.array([4, 4, 4, 4]), algorithm="sm90_grouped")
    (entry,) = call_cache._local.calls.values()
    assert entry.prepared is None


def test_auto_on_host_sizes_measured_for_sm90_takes_the_prepared_path(gpu, monkeypatch, tmp_path):
    """AUTO with measuring on (CUBLAS_GROUPED_AUTOTUNE=1): where its event
    timing finds SM90_GROUPED fastest (on a tiny problem the spans hold host
    time: the kernel path's is the shorter), the repeated call replays the
    prepared launches: two launches, no copy, no cuBLAS, within the budget of
    device sizes."""
    import contextlib

    from cublas_grouped.gemm import autotune
    from cublas_grouped.gemm.config import Algorithm

    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "1")
    monkeypatch.setenv("CUBLAS_GROUPED_TUNING_DIR", str(tmp_path))
    autotune.reset_measurements()

    @contextlib.contextmanager
    def scratch(nbytes):
        yield 0x7D0000000000

    timed = []

    def time_candidates(candidates, run, stream):
        timed.append(tuple(candidates))
        for algorithm in candidates:
            run(algorithm)
        return {a: (0.004 if a is Algorithm.SM90_GROUPED else 0.02) for a in candidates}

    monkeypatch.setattr(autotune, "_scratch", scratch)
    monkeypatch.setattr(autotune, "time_candidates", time_candidates)
    a, b = _operands()
    sizes = np.array([4, 4, 4, 4])

    def call():
        return cg.gmm(a, b, sizes)

    call()
    assert len(timed) == 1 and Algorithm.SM90_GROUPED in timed[0]
    call()
    gpu.clear()
    call()
    assert len(gpu.decoded) == 2 and gpu.copies == [] and gpu.cublas == []
    assert count_calls(call, repeat=10) <= BUDGETS["auto"]
    autotune.reset_measurements()


@pytest.mark.parametrize("sizes_on", ["host", "device"])
def test_prepared_launches_follow_the_defines(gpu, monkeypatch, sizes_on):
    """A probe swaps hopper.DEFINES between calls on the same operands (an A/B of
    a define): the call must then run a launch prepared under the new defines
    (its kernel and its tensor map of a's rows), not replay the old one."""
    from cublas_grouped.gemm.backends import hopper

    a, b = _operands()
    sizes = np.array([4, 4, 4, 4]) if sizes_on == "host" else fake_array((E,), "int32")
    out = fake_array((M, N))
    prepared = []
    real = hopper._prepare_gemm
    monkeypatch.setattr(
        hopper, "_prepare_gemm", lambda *x: (prepared.append(dict(hopper.DEFINES)), real(*x))[1]
    )
    gpu.clear()
    first = _queued(gpu, cg.gmm(a, b, sizes, algorithm="sm90_grouped", out=out))
    gpu.clear()
    assert _queued(gpu, cg.gmm(a, b, sizes, algorithm="sm90_grouped", out=out)) == first  # a hit
    variant = {**hopper.DEFINES, "SM90_A_BOX_ROWS": hopper.BLOCK_M}
    monkeypatch.setattr(hopper, "DEFINES", variant)
    gpu.clear()
    cg.gmm(a, b, sizes, algorithm="sm90_grouped", out=out)
    assert [d["SM90_A_BOX_ROWS"] for d in prepared] == [hopper.A_BOX_ROWS, hopper.BLOCK_M]


@pytest.mark.parametrize("trans_b", [False, True])
def test_narrow_tiles_launch_with_their_grid_shared_memory_and_box(gpu, monkeypatch, trans_b):
    """Under SM90_BLOCK_N=128 (and 6 stages) the GEMM's launch is built for
    them: twice the column tiles in its grid, the ring's shared memory, and
    for [E, N, K] weights a tensor-map box of 128 rows. Under the default
    defines the choice follows NARROW_MAX_ROWS_PER_GROUP: these 4 rows per
    group take the narrow tiles with [E, N, K] weights only (thin tiles off:
    the next test has them)."""
    from cublas_grouped.gemm.backends import hopper, hopper_variants

    monkeypatch.setattr(hopper_variants, "THIN_MAX_ROWS_PER_GROUP", 0)
    a, b = _operands(trans_b)
    out = fake_array((M, N))
    boxes = []
    real_map = hopper.tensor_map
    monkeypatch.setattr(hopper, "tensor_map", lambda *x: (boxes.append(x[2]), real_map(*x))[1])
    default = dict(hopper.DEFINES)
    launches = {}
    for label, widths, threshold in (("wide", (256, 4), 0), ("narrow", (128, 6), 0), ("chosen", None, 16)):
        defines = (
            default if widths is None else {**default, "SM90_BLOCK_N": widths[0], "SM90_STAGES": widths[1]}
        )
        monkeypatch.setattr(hopper, "DEFINES", defines)
        monkeypatch.setattr(hopper_variants, "NARROW_MAX_ROWS_PER_GROUP", threshold)
        gpu.clear()
        cg.gmm(a, b, np.array([4, 4, 4, 4]), trans_b=trans_b, algorithm="sm90_grouped", out=out)
        gemm = [q for q in _queued(gpu, out) if q[2] > 0]  # the launch with dynamic shared memory
        assert len(gemm) == 1
        launches[label] = gemm[0]
    tiles = hopper.max_tiles(M, E)
    # The ring and staging areas, and E's schedule table (v14).
    assert launches["wide"][2] == hopper.shared_bytes(4, 256, E) == hopper.SHARED_BYTES + 4 * (3 * E + 1)
    assert launches["narrow"][2] == hopper.shared_bytes(6, 128, E)
    assert launches["wide"][1][0] == tiles * 1 and launches["narrow"][1][0] == tiles * 2  # N = 256
    assert launches["chosen"][:3] == launches["narrow" if trans_b else "wide"][:3]
    if trans_b:
        assert (256, hopper.BLOCK_K) in boxes and (128, hopper.BLOCK_K) in boxes


@pytest.mark.parametrize("trans_b", [False, True])
def test_thin_tiles_launch_with_their_grid_shared_memory_and_box(gpu, monkeypatch, trans_b):
    """4 rows per group (at most THIN_MAX_ROWS_PER_GROUP): the thin tiles
    (asked for with [E, K, N] weights, which the rule leaves out), built for
    them: the 256-column tiles' grid (the schedule keeps its 128-row tiles)
    and b's box, and a ring of 5 stages of 64 + 256 rows; with the choice
    off, the tiles chosen before."""
    from cublas_grouped.gemm.backends import hopper, hopper_variants

    if not trans_b:
        monkeypatch.setattr(hopper, "DEFINES", {**hopper.DEFINES, "SM90_THIN": 1})
    a, b = _operands(trans_b)
    out = fake_array((M, N))
    boxes = []
    real_map = hopper.tensor_map
    monkeypatch.setattr(hopper, "tensor_map", lambda *x: (boxes.append(x[2]), real_map(*x))[1])
    launches = {}
    for label, threshold in (("thin", 16), ("off", 0)):
        monkeypatch.setattr(hopper_variants, "THIN_MAX_ROWS_PER_GROUP", threshold)
        if label == "off":
            monkeypatch.setattr(hopper, "DEFINES", {**hopper.DEFINES, "SM90_THIN": 0})
        gpu.clear()
        cg.gmm(a, b, np.array([4, 4, 4, 4]), trans_b=trans_b, algorithm="sm90_grouped", out=out)
        gemm = [q for q in _queued(gpu, out) if q[2] > 0]
        assert len(gemm) == 1
        launches[label] = gemm[0]
    ring = hopper.shared_bytes(5, 256, E, thin=1, table_max=hopper_variants.THIN_TABLE_MAX_GROUPS)
    assert launches["thin"][2] == ring == 5 * (64 + 256) * 64 * 2 + 2 * 64 * 72 * 2 + 1024 + 4 * (3 * E + 1)
    assert launches["thin"][1][0] == hopper.max_tiles(M, E)  # N = 256: one column tile
    assert launches["off"][2] != ring
    if trans_b:
        assert boxes[0] == (256, hopper.BLOCK_K)  # the thin launch's b: a tile's 256 rows of [E * N, K]


def test_thin_tiles_are_chosen_by_rows_per_group_and_variant(monkeypatch):
    """Thin tiles (5 stages, their own schedule-table limit) where groups of
    [E, N, K] weights average at most 16 rows, with the row-scale epilogue
    too; not by the rule with [E, K, N] weights (measured slower there);
    where a probe asks for them (SM90_THIN=1) at any size; never in 128-column
    tiles, with the gated epilogue, a row gather or v12 named by the defines
    (the kernel refuses those); the threshold is part of the launches' key."""
    from cublas_grouped.gemm.backends import hopper
    from cublas_grouped.gemm.backends import hopper_variants as V

    choose, base = V.tile_defines, hopper.DEFINES
    thin = {**base, "SM90_THIN": 1, "SM90_STAGES": 5, "SM90_TABLE_MAX_GROUPS": 597}
    assert V.THIN_MAX_ROWS_PER_GROUP == 16
    assert choose(base, True, 16 * 8, 8) == thin
    assert choose(base, True, 16 * 8 + 1, 8)["SM90_THIN"] == 0
    assert choose(base, False, 16 * 8, 8)["SM90_THIN"] == 0  # [E, K, N]: not by the rule
    for trans_b in (False, True):
        assert choose({**base, "SM90_THIN": 1}, trans_b, 10**6, 8) == thin  # a probe's: any size, any layout
    scale = V.RowScaleEpilogue(0x2000)
    assert V.kernel_defines(base, True, 16, 8, scale, None) == {**thin, "SM90_EPILOGUE_ROW_SCALE": 1}
    gated = V.GatedEpilogue(act=1, codes=(("ACT_SILU", 1),))
    gather = V.RowGather(0x5000, 4, 10)
    asked = {**base, "SM90_THIN": 1}
    assert choose(asked, True, 8, 8, gated)["SM90_THIN"] == 0
    assert choose(asked, True, 8, 8, None, gather)["SM90_THIN"] == 0
    assert choose({**asked, "SM90_SKIP_IDLE": 1}, True, 8, 8)["SM90_THIN"] == 0
    assert choose({**asked, "SM90_BLOCK_N": 128}, True, 8, 8)["SM90_THIN"] == 0
    key = V.choice_key(base)
    monkeypatch.setattr(V, "THIN_MAX_ROWS_PER_GROUP", 0)
    assert choose(base, True, 8, 8)["SM90_THIN"] == 0  # off
    assert V.choice_key(base) != key


def test_narrow_tiles_are_chosen_by_layout_rows_per_group_and_epilogue(monkeypatch):
    from cublas_grouped.gemm.backends import hopper, hopper_variants

    monkeypatch.setattr(hopper_variants, "THIN_MAX_ROWS_PER_GROUP", 0)  # the tiles chosen before them

    base = {**hopper.DEFINES, "SM90_SKIP_IDLE": 0}  # v12's choice made: this test is about the width
    narrow = {**base, "SM90_BLOCK_N": 128, "SM90_STAGES": 6}
    limit = hopper_variants.NARROW_MAX_ROWS_PER_GROUP
    choose = hopper_variants.tile_defines
    assert limit == 16
    assert choose(base, True, 16 * 8, 8, None) == narrow  # decode-sized groups, [E, N, K]
    assert choose(base, True, 16 * 8 + 1, 8, None) is base  # more rows per group
    assert choose(base, False, 8, 8, None) is base  # [E, K, N]: slower there
    epilogue = hopper_variants.GatedEpilogue(act=1, codes=(("ACT_SILU", 1),))
    assert choose(base, True, 8, 8, epilogue) is base  # gate | up need 256 columns
    assert choose(narrow, True, 10**6, 8, None) is narrow  # a probe's variant stays as it is
    probe = {**base, "SM90_BLOCK_N": 128, "SM90_STAGES": 5}
    assert choose(probe, True, 8, 8, None) is probe  # ... where the rule would take narrow tiles too
    monkeypatch.setattr(hopper_variants, "NARROW_MAX_ROWS_PER_GROUP", 0)
    assert choose(base, True, 8, 8, None) is base  # off


@pytest.mark.parametrize("trans_b", [False, True])
def test_idle_warpgroup_skip_is_chosen_for_small_groups(monkeypatch, trans_b):
    """v12 (SM90_SKIP_IDLE=1) where groups average at most 512 rows, in both
    layouts and with the gated epilogue; never where the defines name it (a
    probe's A/B); and part of the prepared launches' key."""
    from cublas_grouped.gemm.backends import hopper, hopper_variants

    choose = hopper_variants.tile_defines
    limit = hopper_variants.SKIP_IDLE_MAX_ROWS_PER_GROUP
    assert limit == 512
    rows = 2000  # past the narrow tiles' limit: only v12's choice is left
    epilogue = hopper_variants.GatedEpilogue(act=1, codes=(("ACT_SILU", 1),))
    for e in (epilogue, None):
        assert choose(hopper.DEFINES, trans_b, limit * 8, 8, e) == {**hopper.DEFINES, "SM90_SKIP_IDLE": 1}
        assert choose(hopper.DEFINES, trans_b, limit * 8 + 1, 8, e) is hopper.DEFINES
    assert choose(hopper.DEFINES, trans_b, rows, 8, None)["SM90_SKIP_IDLE"] == 1
    forced = {**hopper.DEFINES, "SM90_SKIP_IDLE": 0}
    assert choose(forced, trans_b, rows, 8, None)["SM90_SKIP_IDLE"] == 0
    key = hopper_variants.choice_key(hopper.DEFINES)
    monkeypatch.setattr(hopper_variants, "SKIP_IDLE_MAX_ROWS_PER_GROUP", 0)
    assert choose(hopper.DEFINES, trans_b, rows, 8, None) is hopper.DEFINES  # off
    assert hopper_variants.choice_key(hopper.DEFINES) != key


def test_row_scale_epilogue_defines_arguments_and_refusals():
    """The weighting epilogue: a zero scale address refused by name; its
    define; refused with a row gather (GEMM 2 never gathers); its kernel
    arguments after the output (b2, then the scales) against the gated
    epilogue's and the plain product's; kernel_defines passes the epilogue
    to both choices (the gated one keeps 256-column tiles, the row-scale
    one takes the thin tiles at decode)."""
    import numpy as np

    from cublas_grouped.gemm.backends import hopper
    from cublas_grouped.gemm.backends import hopper_variants as V

    with pytest.raises(ValueError, match=r"^row scale: scale must be the address of a float32 \[M\] array"):
        V.RowScaleEpilogue(0, 0x100)
    scale = V.RowScaleEpilogue(0x2000, 0x3000)
    gated = V.GatedEpilogue(act=1, codes=(("ACT_SILU", 1),), bias=0x4000)
    gather = V.RowGather(0x5000, 4, 10)
    base = {**hopper.DEFINES, "SM90_SKIP_IDLE": 0}
    assert V.variant_defines(base, scale, None) == {**base, "SM90_EPILOGUE_ROW_SCALE": 1}
    with pytest.raises(ValueError, match=r"^the row-scale epilogue \(GEMM 2\) does not take a row gather"):
        V.variant_defines(base, scale, gather)
    assert V.variant_defines(base, None, gather) == {**base, "SM90_GATHER_A": 1}
    assert V.epilogue_args(None) == (0,) and V.epilogue_args(gated) == (0x4000,)
    assert V.epilogue_args(scale) == (0x3000, 0x2000)
    assert all(isinstance(a, np.intp) for a in V.epilogue_args(scale))
    decode = (True, 16, 8)  # [E, N, K] weights, 2 rows per group: thin tiles unless gated
    thin = V.kernel_defines(base, *decode, scale, None)
    assert thin == {
        **base,
        "SM90_THIN": 1,
        "SM90_STAGES": 5,
        "SM90_TABLE_MAX_GROUPS": 597,
        "SM90_EPILOGUE_ROW_SCALE": 1,
    }
    wide = V.kernel_defines(base, *decode, gated, None)
    assert wide["SM90_BLOCK_N"] == 256 and wide["SM90_EPILOGUE_ACT"] == 1
    assert V.kernel_defines(base, *decode, None, gather)["SM90_GATHER_A"] == 1


def test_gemm2_prefetches_its_weights_before_it_waits(monkeypatch):
    """A layer's GEMM 2 (tile counter 1: its schedule written before GEMM 1)
    compiles with SM90_PREFETCH_B, any tile shape or epilogue; GEMM 1
    (counter 0) and a row gather never; PREFETCH_B False turns it off, and
    is part of the prepared launches' keys. The FP8 kernel has none."""
    from cublas_grouped.gemm.backends import hopper, hopper_fp8
    from cublas_grouped.gemm.backends import hopper_variants as V

    scale = V.RowScaleEpilogue(0x2000)
    for rows in (16, 4096):  # thin and 128-row tiles
        assert V.kernel_defines(hopper.DEFINES, True, rows, 8, scale, None, 1)["SM90_PREFETCH_B"] == 1
        assert "SM90_PREFETCH_B" not in V.kernel_defines(hopper.DEFINES, True, rows, 8, scale, None, 0)
    gather = V.RowGather(0x5000, 4, 10)
    assert "SM90_PREFETCH_B" not in V.kernel_defines(hopper.DEFINES, True, 16, 8, None, gather, 1)
    assert not any("PREFETCH" in name for thin in (False, True) for name in hopper_fp8.launch_defines(thin))
    key = V.choice_key(hopper.DEFINES)
    monkeypatch.setattr(V, "PREFETCH_B", False)
    assert "SM90_PREFETCH_B" not in V.kernel_defines(hopper.DEFINES, True, 16, 8, scale, None, 1)
    assert V.choice_key(hopper.DEFINES) != key
