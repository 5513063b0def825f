"""Host-side planning and algorithm selection, with faked device capabilities (CPU)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from tuning_util import isolate_tuning, write_table

from cublas_grouped import (
    Algorithm,
    DeviceInfo,
    GroupedGemmExecutor,
    ProblemStats,
    TuningTable,
    choose_chunk_rows,
    select_algorithm,
)
from cublas_grouped.gemm.plan import Operands, RowLayout, layout_for, plan_gmm
from cublas_grouped.runtime.arrays import view
from cublas_grouped.runtime.cublas import Op


@pytest.fixture(autouse=True)
def tuning_dirs(tmp_path, monkeypatch):
    """Every test here plans against tables it writes itself (or none): no user
    or shipped table, no measuring."""
    return isolate_tuning(tmp_path, monkeypatch)


def test_offsets_and_active(fake):
    plan = plan_gmm(
        view(fake((10, 8)), "a"),
        view(fake((4, 8, 16)), "b"),
        np.array([3, 0, 7, 0]),
        trans_a=False,
        trans_b=False,
    )
    assert plan.offsets.tolist() == [0, 3, 3, 10, 10]
    assert plan.active.tolist() == [0, 2]
    assert plan.out_shape == (10, 16)


def test_column_major_mapping(fake):
    a, b = view(fake((10, 8)), "a"), view(fake((4, 8, 16)), "b")
    normal = plan_gmm(a, b, np.array([3, 0, 7, 0]), trans_a=False, trans_b=False).dims(3)
    # Y^T [16, 3] = W^T [16, 8] @ X^T [8, 3]; W row-major [8, 16] is col-major [16, 8], ld 16.
    assert (normal.transa, normal.transb, normal.m, normal.n, normal.k) == (Op.N, Op.N, 16, 3, 8)
    assert (normal.lda, normal.ldb, normal.ldc) == (16, 8, 16)
    tb = plan_gmm(a, view(fake((4, 16, 8)), "b"), np.array([3, 0, 7, 0]), trans_a=False, trans_b=True).dims(3)
    assert (tb.transa, tb.lda, tb.m, tb.n, tb.k) == (Op.T, 8, 16, 3, 8)
    ta = plan_gmm(
        a, view(fake((10, 16)), "b"), np.array([3, 0, 7, 0]), trans_a=True, trans_b=False, num_experts=4
    )
    assert ta.out_shape == (4, 8, 16)
    d = ta.dims(7)  # out_e^T [16, 8] = b_e^T [16, 7] @ a_e [7, 8]
    assert (d.transa, d.transb, d.m, d.n, d.k, d.lda, d.ldb, d.ldc) == (Op.N, Op.T, 16, 8, 7, 16, 8, 16)
    arrays = ta.dims_arrays(np.array([3, 7]))
    assert arrays["k"].tolist() == [3, 7] and arrays["n"].tolist() == [8, 8]
    assert arrays["k"].dtype == np.int32


def test_operand_addresses():
    ops = Operands(
        a=1000,
        a_row_bytes=16,
        a_expert_bytes=0,
        b=5000,
        b_row_bytes=0,
        b_expert_bytes=256,
        c=9000,
        c_row_bytes=32,
        c_expert_bytes=0,
    )
    assert ops.at(3, 2) == (1000 + 48, 5000 + 512, 9000 + 96)


def test_row_layouts():
    sizes = np.array([5, 0, 130, 1])
    assert RowLayout().offsets(sizes).tolist() == [0, 5, 5, 135, 136]
    assert RowLayout(align=64).offsets(sizes).tolist() == [0, 64, 64, 256, 320]
    assert RowLayout(stride=136).offsets(sizes).tolist() == [0, 136, 272, 408, 544]


def test_row_layout_names():
    sizes = np.array([5, 0, 130, 1])
    # The named constructors are the (align, stride) forms above.
    assert RowLayout.contiguous() == RowLayout()
    assert RowLayout.chunk_aligned(64) == RowLayout(align=64)
    assert RowLayout.padded(136) == RowLayout(stride=136)
    assert [RowLayout.contiguous().kind, RowLayout.chunk_aligned(2).kind, RowLayout.padded(1).kind] == [
        "grouped-contiguous",
        "chunk-aligned",
        "padded-capacity",
    ]
    assert RowLayout.chunk_aligned(1).kind == "grouped-contiguous"  # 1-row chunks align nothing
    # Rows the buffers need: the last offset.
    assert RowLayout.contiguous().rows(sizes) == 136
    assert RowLayout.chunk_aligned(64).rows(sizes) == 320
    assert RowLayout.padded(136).rows(sizes) == 544
    assert RowLayout.chunk_aligned(64).rows(np.zeros(0, dtype=np.int64)) == 0
    with pytest.raises(ValueError, match="^RowLayout needs align >= 1 and stride >= 0; got 0, 0$"):
        RowLayout.chunk_aligned(0)
    with pytest.raises(ValueError, match="^RowLayout needs align >= 1 and stride >= 0; got 1, -8$"):
        RowLayout(stride=-8)
    with pytest.raises(ValueError, match="^capacity must be at least 1; got 0$"):
        RowLayout.padded(0)
    RowLayout.chunk_aligned(1)  # the limits themselves are fine
    RowLayout.padded(1)


def test_layout_for_each_algorithm():
    sizes = np.array([300, 290, 0, 310])  # choose_chunk_rows: 128; capacity: 312
    grouped, seq = Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL
    assert layout_for(grouped, sizes) == RowLayout.contiguous()
    assert layout_for(seq, sizes) == RowLayout.contiguous()
    assert layout_for(Algorithm.CHUNKED_BATCHED, sizes) == RowLayout.chunk_aligned(128)
    assert layout_for(Algorithm.CHUNKED_BATCHED, sizes, chunk_rows=16) == RowLayout.chunk_aligned(16)
    assert layout_for("chunked_batched", sizes, 32) == RowLayout.chunk_aligned(32)
    assert layout_for(Algorithm.PADDED_STRIDED, sizes) == RowLayout.padded(312)
    assert layout_for(Algorithm.PADDED_STRIDED, sizes, chunk_rows=16) == RowLayout.padded(312)
    with pytest.raises(ValueError, match="^algorithm AUTO has no row layout: choose the algorithm first$"):
        layout_for(Algorithm.AUTO, sizes)
    # Which algorithms each layout serves, in the order they are listed.
    assert RowLayout.contiguous().algorithms() == (grouped, seq, Algorithm.SM90_GROUPED)
    assert layout_for(Algorithm.SM90_GROUPED, sizes) == RowLayout.contiguous()
    assert RowLayout.chunk_aligned(128).algorithms() == (grouped, seq, Algorithm.CHUNKED_BATCHED)
    assert RowLayout.padded(312).algorithms() == (Algorithm.PADDED_STRIDED, seq)
    # The selection's layout families are these, whatever the sizes.
    from cublas_grouped.gemm.select import algorithms_on_layout_of

    assert (
        algorithms_on_layout_of(grouped)
        == algorithms_on_layout_of(seq)
        == (grouped, seq, Algorithm.SM90_GROUPED)
    )
    assert algorithms_on_layout_of(Algorithm.CHUNKED_BATCHED) == (grouped, seq, Algorithm.CHUNKED_BATCHED)
    assert algorithms_on_layout_of(Algorithm.PADDED_STRIDED) == (Algorithm.PADDED_STRIDED, seq)


def test_chunk_rows_choice():
    assert choose_chunk_rows(np.array([1024, 2048, 512])) == 256  # no padding at all
    # 300 rows: 256-chunks pad to 512 (1.71x rows at 640 TFLOP/s), 128-chunks to
    # 384 (1.28x at 560): 128 wins; 64 (320, 1.07x at 370) and 32 lose on rate.
    assert choose_chunk_rows(np.array([300, 290, 310])) == 128
    assert choose_chunk_rows(np.array([1, 2, 3])) == 32
    assert choose_chunk_rows(np.zeros(4, dtype=np.int64)) == 32


def test_packed_chunks_stay_inside_their_group():
    from cublas_grouped.gemm.plan import packed_chunks

    sizes = np.array([5, 0, 40, 16, 33, 15])
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    starts, groups = packed_chunks(sizes, offsets, 16)
    # 40 rows at 5: chunks at 5, 21 and 29 (the last ends at row 44, overlapping);
    # 16 rows: one chunk; 33 rows at 61: 61, 77, 78. Groups under 16 rows get none.
    assert starts.tolist() == [5, 21, 29, 45, 61, 77, 78]
    assert groups.tolist() == [2, 2, 2, 3, 4, 4, 4]
    rng = np.random.default_rng(1)
    for _ in range(50):
        sizes = rng.integers(0, 300, 40)
        offsets = np.concatenate(([0], np.cumsum(sizes)))
        for chunk in (16, 64, 256):
            starts, groups = packed_chunks(sizes, offsets, chunk)
            assert (starts >= offsets[groups]).all()
            assert (starts + chunk <= offsets[groups + 1]).all()  # never past its own group
            covered = np.zeros(int(sizes.sum()), dtype=bool)
            for st in starts:
                covered[st : st + chunk] = True
            big = np.flatnonzero(sizes >= chunk)
            want = np.zeros_like(covered)
            for e in big:
                want[offsets[e] : offsets[e + 1]] = True
            assert (covered == want).all()  # every row of every big group, nothing else


DEVICES = {
    "sm75-cublas12.4": DeviceInfo(sm=(7, 5), cublas_version=120400),
    "sm80-cublas12.9": DeviceInfo(sm=(8, 0), cublas_version=120900),
    "sm90-cublas13.1": DeviceInfo(sm=(9, 0), cublas_version=130100),
    "sm100-cublas13.1": DeviceInfo(sm=(10, 0), cublas_version=130100),
}
MIXTRAL = ProblemStats(8, 8, 8192, 1200, 14336, 4096)
QWEN = ProblemStats(128, 128, 32768, 400, 1536, 2048)
DECODE = ProblemStats(128, 60, 128, 4, 1536, 2048)


@pytest.mark.parametrize("name", DEVICES)
def test_selection_rules(name):
    dev = DEVICES[name]
    grouped_ok = dev.cublas_version >= 120500
    assert select_algorithm(MIXTRAL, dev, table=None) is Algorithm.SEQUENTIAL
    assert select_algorithm(QWEN, dev, table=None, padded_layouts=True) is Algorithm.CHUNKED_BATCHED
    packed = select_algorithm(QWEN, dev, table=None, padded_layouts=False)
    assert packed is (Algorithm.CUBLAS_GROUPED if grouped_ok else Algorithm.SEQUENTIAL)
    chunks = select_algorithm(QWEN, dev, table=None, padded_layouts=False, packed_chunks=True)
    assert chunks is Algorithm.CHUNKED_BATCHED
    decode = select_algorithm(DECODE, dev, table=None, padded_layouts=True)
    assert decode is (Algorithm.CUBLAS_GROUPED if grouped_ok else Algorithm.SEQUENTIAL)


def test_table_overrides_rules_for_near_shapes_only():
    entry = {
        "dtype": "bfloat16",
        "num_experts": 128,
        "active_experts": 128,
        "mean_rows": 256,
        "n": 1536,
        "k": 2048,
        "times_ms": {
            "cublas_grouped": 0.5,
            "sequential": 2.0,
            "chunked_batched": 0.9,
            "padded_strided": None,
        },
    }
    table = TuningTable("fake", 130100, [entry])
    dev = DEVICES["sm90-cublas13.1"]
    assert select_algorithm(QWEN, dev, table=table, padded_layouts=True) is Algorithm.CUBLAS_GROUPED
    # Only algorithms allowed here count: without padded layouts still grouped.
    assert select_algorithm(QWEN, dev, table=table) is Algorithm.CUBLAS_GROUPED
    # Far from every entry (Mixtral): the rules decide.
    assert select_algorithm(MIXTRAL, dev, table=table) is Algorithm.SEQUENTIAL
    # Another dtype: no entry applies.
    fp32 = ProblemStats(128, 128, 32768, 400, 1536, 2048, "float32")
    assert select_algorithm(fp32, dev, table=table, padded_layouts=True) is Algorithm.CHUNKED_BATCHED
    # cuBLAS without the grouped entry point: the table's winner is not allowed.
    old = DEVICES["sm75-cublas12.4"]
    assert select_algorithm(QWEN, old, table=table, padded_layouts=True) is Algorithm.CHUNKED_BATCHED


def test_table_round_trip(tmp_path):
    entry = {
        "dtype": "float16",
        "num_experts": 8,
        "active_experts": 8,
        "mean_rows": 1024,
        "n": 4096,
        "k": 4096,
        "times_ms": {"sequential": 1.0},
    }
    TuningTable("gpu", 120900, [entry]).save(tmp_path / "t.json")
    loaded = TuningTable.load(tmp_path / "t.json")
    assert loaded.entries == [entry] and loaded.cublas_version == 120900


def test_executor_selection_and_fallback_warning(monkeypatch):
    from cublas_grouped.gemm import executor as _executor

    monkeypatch.setattr(_executor, "_warned", set())  # the warning is once per process
    old = GroupedGemmExecutor(
        device=0, device_info=DEVICES["sm75-cublas12.4"], config={"algorithm": "cublas_grouped"}
    )
    assert not old.supports_grouped_gemm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert old.select_algorithm(4096, 8) is Algorithm.SEQUENTIAL
    assert any("needs cuBLAS >= 12.5" in str(w.message) for w in caught)
    new = GroupedGemmExecutor(device=0, device_info=DEVICES["sm90-cublas13.1"])
    assert new.supports_grouped_gemm()
    assert new.select_algorithm(8192, 8, num_experts=8, n=14336, k=4096) is Algorithm.SEQUENTIAL
    assert new.select_algorithm(64, 40, num_experts=128, n=1536, k=2048) is Algorithm.CUBLAS_GROUPED


def test_table_padded_strided_not_taken_for_skewed_loads():
    entry = {
        "dtype": "bfloat16",
        "num_experts": 128,
        "active_experts": 128,
        "mean_rows": 256,
        "n": 1536,
        "k": 2048,
        "times_ms": {"cublas_grouped": 0.9, "sequential": 2.0, "chunked_batched": 0.7, "padded_strided": 0.5},
    }
    table = TuningTable("fake", 130100, [entry])
    dev = DEVICES["sm90-cublas13.1"]
    even = ProblemStats(128, 128, 32768, 300, 1536, 2048)  # padding 1.17x
    skewed = ProblemStats(128, 128, 32768, 1800, 1536, 2048)  # padding 7x
    assert select_algorithm(even, dev, table=table, padded_layouts=True) is Algorithm.PADDED_STRIDED
    assert select_algorithm(skewed, dev, table=table, padded_layouts=True) is Algorithm.CHUNKED_BATCHED


def test_layer_chooses_the_layout_for_both_gemms(tuning_dirs):
    from cublas_grouped.gemm.select import algorithms_on_layout_of, choose_layer_algorithms
    from cublas_grouped.moe.dispatch import choose_algorithms

    def entry(n, k, times):
        return {
            "dtype": "bfloat16",
            "num_experts": 128,
            "active_experts": 128,
            "mean_rows": 256,
            "max_rows": 280,
            "n": n,
            "k": k,
            "times_ms": times,
        }

    gemm1 = entry(
        1536, 2048, {"cublas_grouped": 1.0, "sequential": 3.0, "chunked_batched": 0.9, "padded_strided": 0.8}
    )
    gemm2 = entry(
        2048, 768, {"cublas_grouped": 0.3, "sequential": 2.0, "chunked_batched": 0.6, "padded_strided": 0.9}
    )
    dev = DeviceInfo(sm=(9, 0), cublas_version=130100, name="fake-joint")
    write_table(tuning_dirs[0], "joint.json", dev.name, dev.cublas_version, [gemm1, gemm2])
    counts = np.full(128, 256)
    counts[:8] = 270
    # Alone, GEMM 1 would take padded strided (0.8); as a pair, chunked (0.9 + 0.3
    # with grouped on the chunked layout) beats padded (0.8 + 0.9) and grouped (1.0 + 0.3).
    assert (
        select_algorithm(ProblemStats.from_sizes(counts, 1536, 2048, "bfloat16"), dev, padded_layouts=True)
        is Algorithm.PADDED_STRIDED
    )
    pair = (Algorithm.CHUNKED_BATCHED, Algorithm.CUBLAS_GROUPED)
    assert choose_layer_algorithms(counts, (1536, 2048), (2048, 768), "bfloat16", dev) == pair
    assert choose_layer_algorithms(counts, (1536, 2048), (2048, 768), "bfloat16", dev) == pair  # memoized
    executor = GroupedGemmExecutor(device=0, device_info=dev)
    assert choose_algorithms(executor, "auto", counts, 1536, 2048, "bfloat16", (2048, 768)) == pair
    # A fixed algorithm serves both GEMMs.
    fixed = Algorithm.SEQUENTIAL
    assert choose_algorithms(executor, "sequential", counts, 1536, 2048, "bfloat16", (2048, 768)) == (
        fixed,
        fixed,
    )
    # The layout families agree with the layouts the executor makes.
    for algorithm in (
        Algorithm.CUBLAS_GROUPED,
        Algorithm.SEQUENTIAL,
        Algorithm.CHUNKED_BATCHED,
        Algorithm.PADDED_STRIDED,
    ):
        layout = executor.layout_for(algorithm, counts)
        assert set(layout.algorithms()) == set(algorithms_on_layout_of(algorithm))


def test_layer_choice_without_table_follows_the_rules():
    from cublas_grouped.gemm.select import choose_layer_algorithms

    dev = DeviceInfo(sm=(9, 0), cublas_version=130100, name="no-table-gpu")
    counts = np.full(8, 1024)
    assert choose_layer_algorithms(counts, (28672, 4096), (4096, 14336), "bfloat16", dev) == (
        Algorithm.SEQUENTIAL,
        Algorithm.SEQUENTIAL,
    )
