"""Our Hopper kernel's persistent CTAs (SM90_GROUPED, v7) against float64 on an
SM 9.0 GPU: each CTA takes tile x, then the next tile of a device counter
whenever it has room, through one shared-memory ring, so the ring's stages and mbarrier phases must carry from
tile to tile. Grids forced small (1, 3, 7 CTAs) give many tiles per CTA on
small problems, K with stage counts that do and do not divide the ring,
tiles of one CTA in several groups, fewer tiles than CTAs, the real grid (one
CTA per SM) with more tiles than CTAs, both weight layouts, bf16 and fp16, the
earlier one-CTA-per-tile schedule, bitwise agreement between schedules, and
a graph captured with a small grid and replayed with new sizes."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, poisoned, random_sizes, wait_for_current_stream

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm.backends import hopper

pytestmark = pytest.mark.gpu

DTYPES = [ml_dtypes.bfloat16, np.float16]
TOL = 1e-2
GUARD = 7.0  # exact in bf16 and fp16; the rows around an output keep it


@pytest.fixture(autouse=True)
def _hopper_only_and_no_fallback(monkeypatch):
    """SM 9.0 only; every call must run the kernel (a cuBLAS fallback is an
    error); the schedule settings are restored after each test."""
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("SM90_GROUPED runs on SM 9.0 GPUs only")
    from cublas_grouped.gemm.backends import cublas as cublas_backend

    def refuse(*args, **kwargs):
        raise AssertionError("the cuBLAS back end ran: SM90_GROUPED fell back")

    monkeypatch.setattr(cublas_backend, "run", refuse)
    monkeypatch.setattr(hopper, "SCHEDULE", "persistent")
    monkeypatch.setattr(hopper, "GRID_LIMIT", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*SM90_GROUPED.*")
        yield


def _case(rng, sizes, n, k, dtype, layout):
    m = int(np.sum(sizes))
    a, a64 = device_random(rng, (m, k), dtype)
    shape = (len(sizes), n, k) if layout == "nt" else (len(sizes), k, n)
    b, b64 = device_random(rng, shape, dtype, scale=k**-0.5)
    return a, a64, b, b64


def _gmm(a, b, sizes, out, layout):
    cg.gmm(a, b, sizes, trans_b=layout == "nt", out=out, algorithm="sm90_grouped")


def _reference(a64, b64, sizes, layout):
    return ref.gmm_ref(a64, b64, sizes, trans_b=layout == "nt")


def _guarded(rows, n, dtype):
    """(buffer, out): out is rows x n inside buffer, NaN-poisoned, one guard row
    of GUARD before and after it."""
    import cupy

    buf = cupy.full(((rows + 2) * n,), GUARD, dtype=dtype)
    out = buf[n : (rows + 1) * n].reshape(rows, n)
    out.fill(np.nan)
    return buf, out


def _sm_count():
    import cupy

    runtime = cupy.cuda.runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, cupy.cuda.Device().id)


def _tiles_and_groups(sizes, n):
    """(tiles, groups with tiles) of the kernel's schedule for ``sizes`` and N = ``n``."""
    groups = hopper.tile_schedule(np.asarray(sizes))[:, 0]  # per row tile, in schedule order
    return len(groups) * -(-n // hopper.BLOCK_N), len(set(groups.tolist()))


@pytest.mark.parametrize("layout", ["nn", "nt"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", [1, 3, 7])
@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([37, 0, 200, 5, 0, 300, 1, 129], 392, 40),  # 1 K stage (a tail): a tile per ring slot
        ([37, 0, 200, 5, 0, 300, 1, 129], 264, 72),  # 2 K stages: half a ring per tile
        ([130, 0, 0, 250, 64, 3], 520, 200),  # 4 K stages: one ring per tile; 3 column tiles
        ([90, 17, 0, 400, 260, 33], 392, 328),  # 6 K stages: phases flip mid-tile
        ([300, 0, 41, 200, 129], 520, 1032),  # 17 K stages and a K tail of 8
    ],
)
def test_many_tiles_per_cta(sizes, n, k, grid, dtype, layout):
    """A grid of a few CTAs: each takes many tiles, across groups, through one ring."""
    import os

    # Tiles are handed out at run time, so which CTA takes which is not known,
    # but by counting: more than 2 tiles per CTA means some CTA takes 3 or
    # more; with 1 or 3 CTAs, more groups than CTAs means some CTA takes
    # tiles of two groups (with 7 it is likely, not certain).
    tiles, groups = _tiles_and_groups(sizes, n)
    assert tiles > 2 * grid, "the case must give some CTA several tiles"
    assert groups > min(grid, 3), "the case must give some CTA tiles of several groups"
    hopper.GRID_LIMIT = grid
    seed = int.from_bytes(os.urandom(4), "little")  # fresh data each run; the message names it
    a, a64, b, b64 = _case(np.random.default_rng(seed), sizes, n, k, dtype, layout)
    buf, out = _guarded(a.shape[0], n, dtype)
    _gmm(a, b, sizes, out, layout)
    what = f"grid={grid} {layout} {sizes} N={n} K={k} seed={seed}"
    check_close(out, _reference(a64, b64, sizes, layout), TOL, what)
    host = buf.get().astype(np.float64)
    assert (host[:n] == GUARD).all() and (host[(a.shape[0] + 1) * n :] == GUARD).all(), f"{what}: guard row"


@pytest.mark.parametrize("layout", ["nn", "nt"])
@pytest.mark.parametrize("extra", [0, 1, 700])
def test_schedule_in_shared_memory_and_past_its_limit(extra, layout):
    """v14: the GEMM copies the schedule of up to TABLE_MAX_GROUPS groups into
    shared memory and searches it there; with more groups it searches the
    global arrays. At the limit and past it (1024, 1025 and 1724 groups, many
    empty, a few CTAs so each searches many tiles), against float64, and the
    rows past the sizes' sum stay poisoned."""
    groups = hopper.TABLE_MAX_GROUPS + extra
    rng = np.random.default_rng(groups)
    sizes = rng.integers(0, 3, groups)
    sizes[rng.random(groups) < 0.5] = 0
    sizes[-1] = 5  # the last group's tiles use tile_offsets[E]
    n, k = 136, 200
    hopper.GRID_LIMIT = 5
    a, a64, b, b64 = _case(rng, sizes, n, k, ml_dtypes.bfloat16, layout)
    out = poisoned((a.shape[0] + 3, n), ml_dtypes.bfloat16)
    _gmm(a, b, sizes, out[: a.shape[0]], layout)
    what = f"{groups} groups {layout}"
    check_close(out[: a.shape[0]], _reference(a64, b64, sizes, layout), TOL, what)
    assert np.isnan(out[a.shape[0] :].get().astype(np.float64)).all(), f"{what}: a row past M was written"


@pytest.mark.parametrize("layout", ["nn", "nt"])
def test_more_tiles_than_ctas_on_the_real_grid(layout):
    """One CTA per SM, several hundred tiles of 300 groups: every CTA takes tiles
    of several groups."""

    sms = _sm_count()
    rng = np.random.default_rng(21)
    sizes = rng.integers(1, 200, 300)
    sizes[rng.random(300) < 0.2] = 0
    n, k = 264, 136
    tiles = len(hopper.tile_schedule(sizes)) * 2
    assert tiles > 2 * sms, (tiles, sms)
    a, a64, b, b64 = _case(rng, sizes, n, k, ml_dtypes.bfloat16, layout)
    out = poisoned((a.shape[0], n), ml_dtypes.bfloat16)
    _gmm(a, b, sizes, out, layout)
    check_close(out, _reference(a64, b64, sizes, layout), TOL, f"{tiles} tiles on {sms} CTAs")


@pytest.mark.parametrize("layout", ["nn", "nt"])
def test_back_to_back_launches_each_take_every_tile(layout):
    """Three launches in a row on one stream, with different tile counts, on 3
    CTAs: each launch hands out its tiles from a counter the offsets kernel
    zeroed just before (a counter left at the last launch's count would skip
    tiles, which stay NaN)."""
    hopper.GRID_LIMIT = 3
    rng = np.random.default_rng(26)
    for sizes, n, k in (([300, 0, 41, 200], 520, 136), ([5, 3], 264, 72), ([129, 600, 0, 1], 392, 200)):
        a, a64, b, b64 = _case(rng, sizes, n, k, ml_dtypes.bfloat16, layout)
        out = poisoned((a.shape[0], n), ml_dtypes.bfloat16)
        _gmm(a, b, sizes, out, layout)
        check_close(out, _reference(a64, b64, sizes, layout), TOL, f"{layout} {sizes} after another launch")


@pytest.mark.parametrize("grid", [1, 3, 7, None, 100000])
def test_every_tile_is_taken_once(grid):
    """After a launch the offsets match the host schedule, and the tile counter
    equals the number of tiles: one atomic per tile loaded, so no tile was
    taken twice (a double take computes the same values, which no output
    check can see)."""
    import cupy

    from cublas_grouped.runtime.device import resolve_stream, resources

    hopper.GRID_LIMIT = grid
    rng = np.random.default_rng(27)
    sizes, n, k = [300, 0, 41, 200, 129, 0, 7], 520, 136
    a, a64, b, b64 = _case(rng, sizes, n, k, ml_dtypes.bfloat16, "nn")
    out = poisoned((a.shape[0], n), ml_dtypes.bfloat16)
    _gmm(a, b, sizes, out, "nn")
    cupy.cuda.get_current_stream().synchronize()
    res = resources(cupy.cuda.Device().id, resolve_stream(None))
    row_offsets, row_ends, tile_offsets, counter = (x.get() for x in hopper.schedule_buffers(res, len(sizes)))
    row_tiles = -(-np.asarray(sizes) // hopper.BLOCK_M)
    np.testing.assert_array_equal(row_offsets, np.concatenate(([0], np.cumsum(sizes))))
    np.testing.assert_array_equal(row_ends, np.cumsum(sizes))
    np.testing.assert_array_equal(tile_offsets, np.concatenate(([0], np.cumsum(row_tiles))))
    tiles = int(row_tiles.sum()) * -(-n // hopper.BLOCK_N)
    assert int(counter[0]) == tiles, (int(counter[0]), tiles)
    check_close(out, _reference(a64, b64, sizes, "nn"), TOL, f"grid={grid}")


@pytest.mark.parametrize("grid", [None, 1000])
def test_fewer_tiles_than_ctas(grid):
    """Two tiles on one CTA per SM (or on 200 CTAs, the bound of 200 groups):
    the CTAs without a tile exit before any barrier."""

    hopper.GRID_LIMIT = grid
    rng = np.random.default_rng(22)
    sizes = np.zeros(200, np.int64)
    sizes[[7, 150]] = [5, 3]
    sms = _sm_count()
    ctas = hopper.grid_size(hopper.max_tiles(8, 200), sms, limit=grid)
    assert ctas >= min(sms, 200) > 2, ctas
    a, a64, b, b64 = _case(rng, sizes, 256, 200, ml_dtypes.bfloat16, "nn")
    out = poisoned((8, 256), ml_dtypes.bfloat16)
    _gmm(a, b, sizes, out, "nn")
    check_close(out, _reference(a64, b64, sizes, "nn"), TOL, f"2 tiles on {ctas} CTAs")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nn", "nt"])
def test_one_cta_per_tile_schedule_still_runs(layout, dtype):
    """The v5 schedule (one CTA per tile), kept for comparison, on tails and empty groups."""
    hopper.SCHEDULE = "per_tile"
    rng = np.random.default_rng(23)
    sizes, n, k = [37, 0, 64, 65, 1, 300], 264, 200
    a, a64, b, b64 = _case(rng, sizes, n, k, dtype, layout)
    out = poisoned((a.shape[0], n), dtype)
    _gmm(a, b, sizes, out, layout)
    check_close(out, _reference(a64, b64, sizes, layout), TOL, f"per_tile {layout}")


@pytest.mark.parametrize("layout", ["nn", "nt"])
def test_schedules_agree_bit_for_bit(layout):
    """Each element is one CTA's sum in a fixed K order, whichever CTA: the
    per-tile grid, one CTA per SM and 5 CTAs give the same bits."""
    import cupy

    rng = np.random.default_rng(24)
    sizes, n, k = [300, 0, 1000, 77, 129], 520, 328
    a, _, b, _ = _case(rng, sizes, n, k, ml_dtypes.bfloat16, layout)
    results = []
    for schedule, grid in (("per_tile", None), ("persistent", None), ("persistent", 5)):
        hopper.SCHEDULE, hopper.GRID_LIMIT = schedule, grid
        out = poisoned((a.shape[0], n), ml_dtypes.bfloat16)
        _gmm(a, b, sizes, out, layout)
        results.append(out.view(cupy.uint16))
    assert not bool(cupy.isnan(results[0].view(ml_dtypes.bfloat16).astype(cupy.float32)).any())
    for other in results[1:]:
        assert bool(cupy.all(results[0] == other))


@pytest.mark.parametrize("dtype", DTYPES)
def test_captured_on_a_small_grid_and_replayed_with_new_sizes(dtype):
    """A graph of a 5-CTA grid replayed with sizes of fewer and of many more
    tiles than 5 (the sizes are read on the device at each replay)."""
    import cupy

    hopper.GRID_LIMIT = 5
    rng = np.random.default_rng(25)
    experts, m, n, k = 16, 2048, 264, 200
    a, a64, b, b64 = _case(rng, [m // experts] * experts, n, k, dtype, "nn")
    sizes_dev = cupy.zeros(experts, dtype=cupy.int32)
    out = cupy.empty((m, n), dtype=dtype)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # a, b, the sizes and out were made on the null stream
    with stream:
        sizes_dev[...] = m // experts
        cg.gmm(a, b, sizes_dev, out=out, algorithm="sm90_grouped")  # compiles, outside
        stream.begin_capture()
        cg.gmm(a, b, sizes_dev, out=out, algorithm="sm90_grouped")
        graph = stream.end_capture()
    one_group = np.zeros(experts, np.int64)
    one_group[3] = m  # 16 row tiles of one group: 32 tiles
    tiny = np.zeros(experts, np.int64)
    tiny[[0, 15]] = [1, m - 1]  # 1 + 16 row tiles
    for sizes in (random_sizes(rng, experts, m), one_group, tiny, random_sizes(rng, experts, m)):
        with stream:
            sizes_dev.set(sizes.astype(np.int32), stream=stream)
            out.fill(np.nan)
            graph.launch(stream)
        stream.synchronize()
        check_close(out, ref.gmm_ref(a64, b64, sizes), TOL, f"replay {sizes.tolist()}")
