"""The 2-CTA cluster variant of the sm90 kernel (``SM90_CLUSTER_B`` 2, v13,
``kernels/sm90_cluster.cuh``) on the CPU: its pair schedule's model against
hand-worked cases and the plain tile schedule, rank 0's draw past holes, what
the compiler makes of it (ptxas, SASS), and its launch on the stubbed GPU
(tests/host_stubs.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from host_stubs import H100, fake_array, stub_gpu

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper
from cublas_grouped.gemm.backends.hopper_schedule import pair_schedule
from cublas_grouped.runtime import nvrtc

CLUSTER = {**hopper.DEFINES, "SM90_CLUSTER_B": 2}


def test_pair_schedule_hand_worked():
    # 128-row tiles, 2 column tiles. Group 1: 300 rows = tiles of 128, 128, 44
    # (slots 0, 1, 2 in column tile 0, then 3, 4, 5): pairs at m-tiles 0 and 2,
    # the second with no partner tile (odd count). Group 2: 100 rows, one tile
    # (slots 6, 7), rank 1 idle. Group 4: 256 rows, two tiles (slots 8 .. 11):
    # one full pair per column tile. Empty groups 0 and 3 have none.
    got = pair_schedule(np.array([0, 300, 100, 0, 256]), 128, 2)
    assert got.tolist() == [
        [0, 1, 0, 0, 128, 128],
        [2, 1, 0, 256, 44, 0],
        [3, 1, 1, 0, 128, 128],
        [5, 1, 1, 256, 44, 0],
        [6, 2, 0, 300, 100, 0],
        [7, 2, 1, 300, 100, 0],
        [8, 4, 0, 400, 128, 128],
        [10, 4, 1, 400, 128, 128],
    ]
    assert pair_schedule(np.zeros(5, np.int64), 128, 3).shape == (0, 6)
    # One group of one row; one of 129 rows (a full tile and a tile of 1 in one pair).
    assert pair_schedule(np.array([1]), 128, 1).tolist() == [[0, 0, 0, 0, 1, 0]]
    assert pair_schedule(np.array([129]), 128, 1).tolist() == [[0, 0, 0, 0, 128, 1]]
    # Masked, capacity 300: group 0 asks 1000 and holds 300 (3 tiles: 2 pairs),
    # group 1 holds 5 at row 300; negative counts as 0.
    got = pair_schedule(np.array([1000, 5, -2]), 128, 1, capacity=300)
    assert got.tolist() == [[0, 0, 0, 0, 128, 128], [2, 0, 0, 256, 44, 0], [3, 1, 0, 300, 5, 0]]


@pytest.mark.parametrize("seed", range(6))
def test_pairs_cover_every_tile_once(seed):
    """Every (row tile, column tile) of the plain schedule is computed by
    exactly one (pair, rank); each pair's two tiles are one group's m-tiles 2q
    and 2q + 1 (rank 1's rows start BLOCK_M further on); a pair's slot is its
    rank-0 tile's index in the plain schedule, whose m-tile index is even."""
    rng = np.random.default_rng(seed)
    experts = [1, 7, 64, 257, 1024, 3][seed]
    n_tiles = [1, 2, 6, 1, 3, 5][seed]
    sizes = rng.integers(0, 700, experts)
    sizes[rng.random(experts) < 0.3] = 0
    tiles = hopper.tile_schedule(sizes)
    pairs = pair_schedule(sizes, hopper.BLOCK_M, n_tiles)
    # The plain schedule's tile x: row tile and column tile, as find_tile maps it.
    per_group = np.bincount(tiles[:, 0], minlength=experts)
    offsets = np.concatenate(([0], np.cumsum(per_group)))
    covered = {}
    for slot, g, n, first, rows0, rows1 in pairs:
        local = slot - offsets[g] * n_tiles
        m_tile, n_tile = local % per_group[g], local // per_group[g]
        assert n_tile == n and m_tile % 2 == 0, "a pair slot is an even m-tile of its group"
        row_tile = offsets[g] + m_tile
        assert tiles[row_tile].tolist() == [g, first, rows0]
        covered[(row_tile, n)] = covered.get((row_tile, n), 0) + 1
        if m_tile + 1 < per_group[g]:
            assert tiles[row_tile + 1].tolist() == [g, first + hopper.BLOCK_M, rows1] and rows1 > 0
            covered[(row_tile + 1, n)] = covered.get((row_tile + 1, n), 0) + 1
        else:
            assert rows1 == 0
    assert set(covered.values()) <= {1}
    assert len(covered) == len(tiles) * n_tiles
    assert len(pairs) == sum(-(-int(m) // 2) for m in per_group) * n_tiles


@pytest.mark.parametrize("clusters", [1, 3, 66])
def test_rank0_draws_every_pair_once_and_the_counter_ends_at_the_tile_count(clusters):
    """Rank 0's draw, modelled: cluster c takes slot c first, then clusters +
    the counter's next value, drawing past holes (odd m-tiles) and past the
    end once; clusters free up in a random order. Every pair is taken by one
    cluster, in slot order per cluster, and the counter ends at the plain
    schedule's tile count (one draw per slot), which the GPU test checks."""
    rng = np.random.default_rng(clusters)
    sizes = rng.integers(0, 600, 37)
    sizes[::5] = 0
    n_tiles = 3
    total = len(hopper.tile_schedule(sizes)) * n_tiles
    pair_slots = set(pair_schedule(sizes, hopper.BLOCK_M, n_tiles)[:, 0].tolist())
    counter = 0
    slot = {c: c for c in range(clusters) if c < total}
    mine = {c: [] for c in slot}
    running = list(slot)
    while running:
        c = running[rng.integers(len(running))]
        while slot[c] < total and slot[c] not in pair_slots:  # a hole: draw again
            slot[c], counter = clusters + counter, counter + 1
        if slot[c] >= total:
            running.remove(c)
            continue
        mine[c].append(slot[c])
        slot[c], counter = clusters + counter, counter + 1  # the next, after this pair's loads
    taken = sorted(s for got in mine.values() for s in got)
    assert taken == sorted(pair_slots)
    assert all(got == sorted(got) for got in mine.values())
    assert counter == total


def test_launch_helpers():
    """The grid: two CTAs per cluster over half the SMs (and half a test
    limit), even; nt's B box is half a tile's rows; nn's boxes are unchanged."""
    assert hopper.CLUSTER_B == 1 and hopper.DEFINES["SM90_CLUSTER_B"] == 1  # off until measured
    assert hopper.grid_size(1000, 132, cluster=2) == 132
    assert hopper.grid_size(1000, 133, cluster=2) == 132  # an odd SM count: one SM unused
    assert hopper.grid_size(5, 132, cluster=2) == 10  # a cluster per slot, no more
    assert hopper.grid_size(1000, 132, "per_tile", cluster=2) == 2000
    assert hopper.grid_size(1000, 132, limit=3, cluster=2) == 2
    assert hopper.grid_size(0, 132, cluster=2) == 2
    assert hopper.b_map_shape(4, 392, 200, True, 2) == ((4 * 392, 200), (128, hopper.BLOCK_K))
    assert hopper.b_map_shape(4, 392, 200, False, 2) == hopper.b_map_shape(4, 392, 200, False)


def _compile(defines, logs=None):
    from cuda.core import Program, ProgramOptions

    macros = [(name, str(value)) for name, value in defines.items()]
    options = ProgramOptions(arch=hopper.ARCH, std="c++17", define_macro=macros, ptxas_options="-v")
    program = Program(nvrtc.load_source("grouped_gemm_sm90"), code_type="c++", options=options)
    return program.compile("cubin", logs=logs)


class _Log:
    text = ""

    def write(self, chunk):
        self.text += chunk


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    for path in (
        "/tmp/cutools/nvidia/cu13/bin/cuobjdump",
        "/tmp/cutools/nvidia/cuda_cuobjdump/bin/cuobjdump",
    ):
        if Path(path).exists():
            return path
    return None


@pytest.mark.parametrize("act", [None, "silu"])
def test_the_variant_keeps_the_wgmma_pipeline(act, tmp_path):
    """ptxas on the four GEMMs with SM90_CLUSTER_B 2: no spills, no C7520,
    at most 168 registers; in the SASS (where cuobjdump is found) 28 HGMMA per
    GEMM as in the plain kernel and multicast TMA loads of B."""
    from cublas_grouped.moe.kernels import ACTIVATIONS

    defines = dict(CLUSTER)
    if act is not None:
        defines.update(
            {f"ACT_{n.upper()}": c for n, c in ACTIVATIONS.items()}, SM90_EPILOGUE_ACT=ACTIVATIONS[act]
        )
    log = _Log()
    cubin = _compile(defines, log)
    report = log.text
    for kernel in ("nt_bf16", "nt_f16", "nn_bf16", "nn_f16"):
        assert f"Compiling entry function 'grouped_gemm_{kernel}'" in report
    assert "C7520" not in report and "warning" not in report.lower(), report
    assert not any(
        "spill" in line and not line.strip().endswith("0 bytes spill stores, 0 bytes spill loads")
        for line in report.splitlines()
    ), report
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", report)]
    assert len(registers) == 6 and max(registers) <= 168, report
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (pip download nvidia-cuda-cuobjdump) for the SASS counts")
    path = tmp_path / "cluster.cubin"
    path.write_bytes(bytes(cubin.code))
    sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    counts: dict[str, list[int]] = {}
    name = None
    for line in sass.splitlines():
        found = re.search(r"Function : (\w+)", line)
        if found:
            name = found.group(1)
            counts[name] = [0, 0]
        elif name is not None:
            counts[name][0] += "HGMMA" in line
            counts[name][1] += "UTMALDG" in line and "MULTICAST" in line
    for kernel in ("nt_bf16", "nt_f16", "nn_bf16", "nn_f16"):
        hgmma, multicast = counts[f"grouped_gemm_{kernel}"]
        assert hgmma == 28, counts
        assert multicast >= 1, counts


def test_bad_cluster_defines_are_refused():
    """2 with SM90_GATHER_A is refused, and any value but 1 or 2 (a missing
    define is test_kernels_compile's case)."""
    with pytest.raises(Exception, match="does not take SM90_GATHER_A"):
        _compile({**CLUSTER, "SM90_GATHER_A": 1})
    with pytest.raises(Exception, match="SM90_CLUSTER_B must be 1"):
        _compile({**hopper.DEFINES, "SM90_CLUSTER_B": 4})


def test_the_host_refuses_gather_with_clusters():
    from cublas_grouped.gemm.backends.hopper_variants import RowGather, variant_defines

    gather = RowGather(0x1000, 8, 10)
    assert variant_defines(hopper.DEFINES, None, gather)["SM90_GATHER_A"] == 1
    with pytest.raises(ValueError, match="SM90_GATHER_A.*need SM90_CLUSTER_B 1"):
        variant_defines(CLUSTER, None, gather)


E, M, N, K = 4, 300, 392, 256


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    with stub_gpu(monkeypatch, info=H100) as rec:
        rec.host_values = lambda arr: np.array([100, 0, 150, 50], arr.dtype)
        yield rec


@pytest.mark.parametrize("trans_b", [True, False])
def test_the_variant_launches_an_even_grid_with_half_boxes(gpu, monkeypatch, trans_b):
    """On the stubs: the same launches, the GEMM's grid two CTAs per cluster
    (66 clusters on 132 SMs), B's map with half a tile's rows per box for nt,
    and switching the define back prepares the plain launch again (the
    prepared launches are keyed by the defines)."""
    a = fake_array((M, K))
    b = fake_array((E, N, K) if trans_b else (E, K, N))
    sizes = fake_array((E,), "int32")

    def gemm_launch(out):
        launches = [d for d in gpu.decoded if isinstance(d[4][0], tuple)]  # tensor-map arguments
        assert len(launches) == 1
        return launches[0]

    gpu.clear()
    out = cg.gmm(a, b, sizes, trans_b=trans_b, algorithm="sm90_grouped")
    plain = gemm_launch(out)
    monkeypatch.setattr(hopper, "DEFINES", CLUSTER)
    for _ in range(2):  # prepared, then a hit
        gpu.clear()
        cg.gmm(a, b, sizes, trans_b=trans_b, algorithm="sm90_grouped", out=out)
        var = gemm_launch(out)
        tiles = hopper.max_tiles(M, E) * -(-N // hopper.BLOCK_N)
        assert var[1][0] == 2 * min(tiles, 66) and var[1][0] % 2 == 0
        assert var[4][2] == (b.data.ptr, *hopper.b_map_shape(E, N, K, trans_b, 2), "bfloat16")
        assert var[4][3:] == plain[4][3:], "the same schedule, sizes and output"
        assert var[4][:2] == plain[4][:2], "a's maps unchanged"
    monkeypatch.setattr(hopper, "DEFINES", {**CLUSTER, "SM90_CLUSTER_B": 1})
    gpu.clear()
    cg.gmm(a, b, sizes, trans_b=trans_b, algorithm="sm90_grouped", out=out)
    assert gemm_launch(out)[1] == plain[1] and gemm_launch(out)[4] == plain[4]
