"""Every documented limit tested from both sides: the limit itself is accepted,
one step past it is refused (CPU, fake arrays).

A limit tested only from the refused side lets ``>=`` become ``>`` (or 1024
become 1023) unnoticed. Expected values here are worked out from the
documented rule (cuBLAS's own conventions for the column-major mapping, the
stated thresholds), never read back from the code under test. Where the
accepted side would go on to GPU work, ``cupy`` is replaced by a module that
raises :class:`GpuWorkStarted` on first use: reaching it proves the argument
checks passed, and no fake pointer ever reaches a kernel.

The T*k < 2**31 pairs limit and the fixed-capacity limits have their own
tests (test_moe_limits.py, test_capacity.py).
"""

from __future__ import annotations

import math
import sys
import types

import ml_dtypes
import numpy as np
import pytest

import cublas_grouped as cg
from cublas_grouped.gemm import plan as _layouts
from cublas_grouped.gemm import select as _select
from cublas_grouped.gemm import tables as _tables
from cublas_grouped.gemm.config import Algorithm, ComputePrecision, GroupedGemmConfig, compute_type_for
from cublas_grouped.gemm.plan import ProblemStats, plan_gmm
from cublas_grouped.gemm.select import select_algorithm
from cublas_grouped.gemm.tables import TuningTable
from cublas_grouped.moe.checks import check_layer_args, check_routing
from cublas_grouped.runtime.arrays import view
from cublas_grouped.runtime.device import DeviceInfo

# cuBLAS enum values (cublas_api.h), written out here rather than imported.
OP_N, OP_T = 0, 1
COMPUTE_32F, COMPUTE_32F_PEDANTIC = 68, 69
COMPUTE_32F_FAST_16F, COMPUTE_32F_FAST_16BF, COMPUTE_32F_FAST_TF32 = 74, 75, 77

H100 = DeviceInfo(sm=(9, 0), cublas_version=130100, name="limits-test-gpu")
T, H, INTER, K = 6, 16, 8, 2


class GpuWorkStarted(Exception):
    """Raised by the stand-in ``cupy`` module: the argument checks all passed."""


class _NoGpuCupy(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise GpuWorkStarted(name)


@pytest.fixture
def no_gpu(monkeypatch):
    """``import cupy`` gives a module whose first use raises GpuWorkStarted."""
    monkeypatch.setitem(sys.modules, "cupy", _NoGpuCupy("cupy"))


# --------------------------------------------------------------------------- sizes near 2**31

LIMIT = 2**31


def _plan(fake, a_shape, b_shape, sizes, **kwargs):
    kwargs.setdefault("trans_a", False)
    kwargs.setdefault("trans_b", False)
    return plan_gmm(view(fake(a_shape), "a"), view(fake(b_shape), "b"), np.array(sizes), **kwargs)


@pytest.mark.parametrize(
    "a_shape, b_shape, sizes, kwargs",
    [
        # M (rows of a), as one group
        (("M", 8), (1, 8, 16), ["M"], {}),
        # N, in both weight layouts
        ((4, 8), (1, 8, "N"), [4], {}),
        ((4, 8), (1, "N", 8), [4], {"trans_b": True}),
        # K
        ((4, "K"), (1, "K", 16), [4], {}),
        ((4, "K"), (1, 16, "K"), [4], {"trans_b": True}),
        # the K-grouped product: M, K and N
        (("M", 8), ("M", 16), ["M"], {"trans_a": True, "num_experts": 1}),
        ((4, "K"), (4, 16), [4], {"trans_a": True, "num_experts": 1}),
        ((4, 8), (4, "N"), [4], {"trans_a": True, "num_experts": 1}),
    ],
)
def test_dimensions_below_2_31_accepted_at_the_limit_refused_past_it(fake, a_shape, b_shape, sizes, kwargs):
    def at(value):
        sub = lambda seq: tuple(value if isinstance(v, str) else v for v in seq)  # noqa: E731
        return sub(a_shape), sub(b_shape), list(sub(sizes))

    a, b, s = at(LIMIT - 1)
    plan = _plan(fake, a, b, s, **kwargs)
    assert LIMIT - 1 in (plan.total_rows, plan.n, plan.k)
    a, b, s = at(LIMIT)
    with pytest.raises(ValueError, match=r"^every dimension must be below 2\*\*31 \(cuBLAS int sizes\)$"):
        _plan(fake, a, b, s, **kwargs)


# --------------------------------------------------------------------------- route: E and top_k


def test_route_top_k_equal_to_e_accepted_e_plus_one_refused(fake, no_gpu):
    for experts in (1, 4, 64, 1024):
        logits = fake((T, experts))
        with pytest.raises(GpuWorkStarted):
            cg.route(logits, experts)
        with pytest.raises(GpuWorkStarted):
            cg.route(logits, 1)
        with pytest.raises(ValueError, match=rf"top_k must be an int in \[1, {experts}\]; got {experts + 1}"):
            cg.route(logits, experts + 1)
        with pytest.raises(ValueError, match=rf"top_k must be an int in \[1, {experts}\]; got 0"):
            cg.route(logits, 0)
    with pytest.raises(GpuWorkStarted):
        cg.route(fake((T, 8)), np.int64(8))  # NumPy integers count as ints


def test_route_1024_experts_accepted_1025_refused(fake, no_gpu):
    with pytest.raises(GpuWorkStarted):
        cg.route(fake((T, 1024)), 8)
    with pytest.raises(ValueError, match="router_logits must have 1 to 1024 experts; got 1025"):
        cg.route(fake((T, 1025)), 8)
    with pytest.raises(GpuWorkStarted):
        cg.route(fake((T, 1)), 1)
    with pytest.raises(ValueError, match="router_logits must have 1 to 1024 experts; got 0"):
        cg.route(fake((T, 0)), 1)


def test_route_checks_pass_with_zero_tokens(fake, no_gpu):
    with pytest.raises(GpuWorkStarted):
        cg.route(fake((0, 8)), 2)


# --------------------------------------------------------------------------- the layer: E <= 1024


def _layer(fake, experts, **changes):
    args = {
        "x_v": view(fake((T, H)), "x"),
        "topk_ids": fake((T, K), np.int32),
        "topk_weights": fake((T, K), np.float32),
        "w1": fake((experts, H, 2 * INTER)),
        "w2": fake((experts, INTER, H)),
        "b1": None,
        "b2": None,
        "activation": "silu",
        "gated": True,
        "trans_b": False,
    }
    args.update(changes)
    return args


def layer_sizes(**args) -> tuple[int, int, int, int]:
    """(E, H, I, width) of the LayerShape that check_layer_args returns."""
    shape = check_layer_args(**args)
    return shape.num_experts, shape.hidden, shape.inter, shape.width


def test_check_layer_args_1024_experts_accepted_1025_refused(fake):
    assert layer_sizes(**_layer(fake, 1024)) == (1024, H, INTER, 2 * INTER)
    with pytest.raises(ValueError, match="at most 1024 experts are supported; w1 has 1025"):
        check_layer_args(**_layer(fake, 1025))
    # The same through the public entry point: past the checks means GPU work.
    args = _layer(fake, 1025)
    with pytest.raises(ValueError, match="at most 1024 experts"):
        cg.moe_forward(fake((T, H)), args["topk_ids"], args["topk_weights"], args["w1"], args["w2"])


def test_moe_forward_1024_experts_gets_past_the_checks(fake, no_gpu):
    args = _layer(fake, 1024)
    with pytest.raises(GpuWorkStarted):
        cg.moe_forward(fake((T, H)), args["topk_ids"], args["topk_weights"], args["w1"], args["w2"])


def test_check_layer_args_results(fake):
    # Returned sizes, worked out from the shapes: gated [E, H, 2I], plain [E, H, I],
    # and the nn.Linear layouts with trans_b.
    assert layer_sizes(**_layer(fake, 4, w1=fake((4, H, 10)), w2=fake((4, 10, H)), gated=False)) == (
        4,
        H,
        10,
        10,
    )
    linear = _layer(fake, 4, w1=fake((4, 2 * INTER, H)), w2=fake((4, H, INTER)), trans_b=True)
    assert layer_sizes(**linear) == (4, H, INTER, 2 * INTER)
    # Without x (the fixed-capacity path), hidden comes from w1: [E, H, .] or [E, ., H].
    assert layer_sizes(**_layer(fake, 4, x_v=None)) == (4, H, INTER, 2 * INTER)
    assert layer_sizes(**{**linear, "x_v": None}) == (4, H, INTER, 2 * INTER)
    # With x absent the dtype is w1's: a w2 of another dtype is refused.
    with pytest.raises(TypeError, match="w2 must have dtype float32 like x; got float16"):
        check_layer_args(**_layer(fake, 4, x_v=None, w2=fake((4, INTER, H), np.float16)))


@pytest.mark.parametrize("experts, ok", [(1, True), (1024, True), (0, False), (1025, False)])
def test_prepare_input_num_experts_limits(fake, no_gpu, experts, ok):
    x, ids, w = fake((T, H)), fake((T, K), np.int32), fake((T, K), np.float32)
    if ok:
        with pytest.raises(GpuWorkStarted):
            cg.prepare_input(x, (w, ids), experts)
    else:
        with pytest.raises(ValueError, match=rf"num_experts must be an int in \[1, 1024\]; got {experts}"):
            cg.prepare_input(x, (w, ids), experts)


# --------------------------------------------------------------------------- strides and contiguity


def test_byte_strides_become_element_strides(fake):
    for dtype, itemsize in ((np.float32, 4), (np.float16, 2), (np.int32, 4)):
        v = view(fake((4, 8), dtype, strides=(8 * itemsize, itemsize)), "a")
        assert v.strides == (8, 1)
        assert all(type(s) is int for s in v.strides)
        assert v.is_c_contiguous()
        # A row stride of 16 elements (padded rows) is 16, not 16 * itemsize.
        padded = view(fake((4, 8), dtype, strides=(16 * itemsize, itemsize)), "a")
        assert padded.strides == (16, 1) and not padded.is_c_contiguous()
    # Strides absent (C order): computed in elements.
    assert view(fake((3, 5, 7)), "a").strides == (35, 7, 1)
    with pytest.raises(ValueError, match=r"a has strides \(32, 6\) that are not whole elements"):
        view(fake((4, 8), strides=(32, 6)), "a")


@pytest.mark.parametrize(
    "shape, strides, contiguous",
    [
        ((4, 8), (32, 4), True),
        ((4, 8), (4, 16), False),  # column-major
        ((4, 8), (64, 4), False),  # every other row
        ((2, 8), (64, 4), False),  # a size-2 dimension with a wrong stride counts
        ((4, 2), (8, 8), False),
        ((1, 8), (12345 * 4, 4), True),  # size-1 dimensions: any stride
        ((4, 1), (4, 999 * 4), True),
        ((4, 1, 8), (32, 7 * 4, 4), True),
        ((1, 1), (0, 0), True),
        ((8,), (4,), True),
        ((8,), (8,), False),
    ],
)
def test_contiguity(fake, shape, strides, contiguous):
    assert view(fake(shape, strides=strides), "a").is_c_contiguous() is contiguous


def test_topk_contiguity_checked_both_ways(fake):
    ids, w = fake((T, K), np.int32), fake((T, K), np.float32)
    ids_v, w_v = check_routing(ids, w, T)
    assert ids_v.shape == (T, K) and w_v.shape == (T, K)
    # Column-major ids / weights (stride K*T... in bytes: 4 and 4*T).
    with pytest.raises(ValueError, match="^topk_ids must be C-contiguous$"):
        check_routing(fake((T, K), np.int32, strides=(4, 4 * T)), w, T)
    with pytest.raises(ValueError, match="^topk_weights must be C-contiguous$"):
        check_routing(ids, fake((T, K), np.float32, strides=(4, 4 * T)), T)
    # k = 1: a column of any stride is contiguous.
    check_routing(fake((T, 1), np.int32, strides=(4, 400)), fake((T, 1), np.float32, strides=(4, 8)), T)
    # Through moe_forward, before any GPU work.
    layer = _layer(fake, 4)
    with pytest.raises(ValueError, match="^topk_ids must be C-contiguous$"):
        cg.moe_forward(
            fake((T, H)), fake((T, K), np.int32, strides=(4, 4 * T)), None, layer["w1"], layer["w2"]
        )
    with pytest.raises(ValueError, match="^x must be C-contiguous$"):
        cg.moe_forward(fake((T, H), strides=(4, 4 * T)), ids, None, layer["w1"], layer["w2"])


# --------------------------------------------------------------------------- compute precision


def test_compute_type_table():
    f32, f16, bf16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)
    expected = {
        ComputePrecision.FP32: COMPUTE_32F,
        ComputePrecision.TF32: COMPUTE_32F_FAST_TF32,
        ComputePrecision.FP16: COMPUTE_32F_FAST_16F,
        ComputePrecision.BF16: COMPUTE_32F_FAST_16BF,
    }
    for precision, compute in expected.items():
        assert compute_type_for(f32, precision) == compute
        assert compute_type_for(np.float32, ComputePrecision(precision.value)) == compute
        # Half-precision inputs always accumulate in float32 on tensor cores.
        assert compute_type_for(f16, precision) == COMPUTE_32F
        assert compute_type_for(bf16, precision) == COMPUTE_32F
        assert compute_type_for(f16, precision, use_tensor_cores=False) == COMPUTE_32F
    assert compute_type_for(f32, ComputePrecision.FP32, use_tensor_cores=False) == COMPUTE_32F_PEDANTIC
    assert compute_type_for("float32", ComputePrecision.FP32) == COMPUTE_32F


def test_gmm_default_compute_is_full_fp32(fake, monkeypatch):
    seen = []

    def spy(self, *args, **kwargs):
        seen.append((self.config, self.compute_type(np.float32), self.compute_type(np.float16)))
        raise GpuWorkStarted

    monkeypatch.setattr(cg.GroupedGemmExecutor, "execute", spy)
    with pytest.raises(GpuWorkStarted):
        cg.gmm(fake((4, 8)), fake((2, 8, 16)), [2, 2])
    with pytest.raises(GpuWorkStarted):
        cg.gmm(fake((4, 8)), fake((2, 8, 16)), [2, 2], compute="tf32")
    (config, f32, f16), (config_tf32, tf32, _) = seen
    assert config.compute_precision is ComputePrecision.FP32 and config.use_tensor_cores
    assert (f32, f16) == (COMPUTE_32F, COMPUTE_32F)
    assert tf32 == COMPUTE_32F_FAST_TF32
    # The executor a bare config builds, and the one the MoE layer shares.
    assert GroupedGemmConfig().compute_precision is ComputePrecision.FP32
    assert cg.GroupedGemmExecutor(device_info=H100).compute_type(np.float32) == COMPUTE_32F
    from cublas_grouped.moe.checks import executor_or_shared

    assert executor_or_shared(None).compute_type(np.float32) == COMPUTE_32F


# --------------------------------------------------------------------------- the column-major mapping


def colmajor(buf: np.ndarray, rows: int, cols: int, ld: int) -> np.ndarray:
    """The rows x cols column-major matrix at ``buf`` with leading dimension ``ld``,
    read the way cuBLAS reads it: element (i, j) at ``buf[i + j * ld]``."""
    assert ld >= max(1, rows), f"ld {ld} < {rows} rows: cuBLAS refuses it"
    assert (cols - 1) * ld + rows <= buf.size, "reads past the operand"
    return np.array([[buf[i + j * ld] for j in range(cols)] for i in range(rows)])


def emulate_gemm(d, a_buf, b_buf, c_size):
    """C = op(A) op(B) as cuBLAS computes it; A is the weights side, B the rows side."""
    op_a = colmajor(a_buf, d.m, d.k, d.lda) if d.transa == OP_N else colmajor(a_buf, d.k, d.m, d.lda).T
    op_b = colmajor(b_buf, d.k, d.n, d.ldb) if d.transb == OP_N else colmajor(b_buf, d.n, d.k, d.ldb).T
    assert d.ldc >= d.m and (d.n - 1) * d.ldc + d.m <= c_size
    c = np.full(c_size, np.nan)
    product = op_a @ op_b
    for i in range(d.m):
        for j in range(d.n):
            c[i + j * d.ldc] = product[i, j]
    return c


@pytest.mark.parametrize("rows", [1, 4, 9])
def test_column_major_mapping_computes_the_row_major_product(fake, rows):
    rng = np.random.default_rng(rows)
    k, n = 3, 5  # K != N != rows: a swapped dimension or leading dimension shows
    x = rng.normal(size=(rows, k))
    w = rng.normal(size=(k, n))
    a, b_kn, b_nk = view(fake((rows, k)), "a"), view(fake((1, k, n)), "b"), view(fake((1, n, k)), "b")
    normal = plan_gmm(a, b_kn, np.array([rows]), trans_a=False, trans_b=False).dims(rows)
    out = emulate_gemm(normal, w.ravel(), x.ravel(), rows * n).reshape(rows, n)
    np.testing.assert_allclose(out, x @ w, rtol=1e-12)
    trans_b = plan_gmm(a, b_nk, np.array([rows]), trans_a=False, trans_b=True).dims(rows)
    out = emulate_gemm(trans_b, w.T.copy().ravel(), x.ravel(), rows * n).reshape(rows, n)
    np.testing.assert_allclose(out, x @ w, rtol=1e-12)
    # K-grouped: out[K, N] = a_e^T @ b_e, a_e [rows, K], b_e [rows, N].
    y = rng.normal(size=(rows, n))
    ta = plan_gmm(a, view(fake((rows, n)), "b"), np.array([rows]), trans_a=True, trans_b=False, num_experts=1)
    out = emulate_gemm(ta.dims(rows), y.ravel(), x.ravel(), k * n).reshape(k, n)
    np.testing.assert_allclose(out, x.T @ y, rtol=1e-12)


def test_column_major_mapping_all_eight_fields(fake):
    # Row-major Y[m, N] = X[m, K] @ W[K, N] is column-major Y^T = W^T X^T:
    # A = W (N x K, ld N; ld K and op T when W is stored [N, K]), B = X^T (K x m,
    # ld K), C = Y^T (N x m, ld N). K-grouped: out^T [N, K] = b_e^T [N, m] @ a_e [m, K].
    m, k, n = 7, 3, 5
    a = view(fake((m, k)), "a")
    normal = plan_gmm(a, view(fake((1, k, n)), "b"), np.array([m]), trans_a=False, trans_b=False)
    trans_b = plan_gmm(a, view(fake((1, n, k)), "b"), np.array([m]), trans_a=False, trans_b=True)
    trans_a = plan_gmm(a, view(fake((m, n)), "b"), np.array([m]), trans_a=True, trans_b=False, num_experts=1)
    fields = ("transa", "transb", "m", "n", "k", "lda", "ldb", "ldc")
    expected = {
        "normal": (normal, (OP_N, OP_N, n, m, k, n, k, n)),
        "trans_b": (trans_b, (OP_T, OP_N, n, m, k, k, k, n)),
        "trans_a": (trans_a, (OP_N, OP_T, n, k, m, n, k, n)),
    }
    for mode, (plan, want) in expected.items():
        got = plan.dims(m)
        assert tuple(getattr(got, f) for f in fields) == want, mode
        # The vectorized form, for two groups of 2 and 6 rows: int32, the rows in
        # n (or k with trans_a), everything else as for one group.
        arrays = plan.dims_arrays(np.array([2, 6]))
        assert set(arrays) == set(fields), mode
        for f, value in zip(fields, want):
            assert arrays[f].dtype == np.int32, (mode, f)
            rows_field = "k" if mode == "trans_a" else "n"
            assert arrays[f].tolist() == ([2, 6] if f == rows_field else [value, value]), (mode, f)


# --------------------------------------------------------------------------- algorithm selection


def _stats(active, total, experts=128, n=1536, k=2048, max_rows=None, dtype="bfloat16"):
    max_rows = max_rows if max_rows is not None else math.ceil(total / max(active, 1))
    return ProblemStats(experts, active, total, max_rows, n, k, dtype)


@pytest.mark.parametrize(
    "active, total, padded, want",
    [
        # active <= 16 and mean >= 512: SEQUENTIAL, on both sides of each bound
        (16, 16 * 512, True, Algorithm.SEQUENTIAL),
        (16, 16 * 512, False, Algorithm.SEQUENTIAL),
        (17, 17 * 512, True, Algorithm.CHUNKED_BATCHED),
        (17, 17 * 512, False, Algorithm.CUBLAS_GROUPED),
        (16, 16 * 512 - 1, True, Algorithm.CHUNKED_BATCHED),  # mean 511.94
        (16, 16 * 512 - 1, False, Algorithm.CUBLAS_GROUPED),
        (1, 512, False, Algorithm.SEQUENTIAL),
        (1, 511, False, Algorithm.CUBLAS_GROUPED),
        # mean >= 64: CHUNKED_BATCHED where it can run
        (100, 100 * 64, True, Algorithm.CHUNKED_BATCHED),
        (100, 100 * 64 - 1, True, Algorithm.CUBLAS_GROUPED),  # mean 63.99
        (100, 100 * 64, False, Algorithm.CUBLAS_GROUPED),
        (3, 3 * 64, True, Algorithm.CHUNKED_BATCHED),
        (3, 3 * 64 - 1, True, Algorithm.CUBLAS_GROUPED),
    ],
)
def test_rule_thresholds_both_sides(active, total, padded, want):
    stats = _stats(active, total)
    assert select_algorithm(stats, H100, padded_layouts=padded, table=None) is want
    # Where the grouped entry point is missing (cuBLAS < 12.5), SEQUENTIAL replaces it.
    old = DeviceInfo(sm=(8, 0), cublas_version=120400, name="old")
    fallback = Algorithm.SEQUENTIAL if want is Algorithm.CUBLAS_GROUPED else want
    assert select_algorithm(stats, old, padded_layouts=padded, table=None) is fallback


def test_allowed_algorithms():
    old = DeviceInfo(sm=(8, 0), cublas_version=120400, name="old")
    grouped, seq = Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL
    chunked, strided = Algorithm.CHUNKED_BATCHED, Algorithm.PADDED_STRIDED
    assert _select.allowed_algorithms(H100, padded_layouts=False) == [grouped, seq]
    assert _select.allowed_algorithms(H100, padded_layouts=False, packed_chunks=True) == [
        grouped,
        seq,
        chunked,
    ]
    assert _select.allowed_algorithms(H100, padded_layouts=True) == [grouped, seq, chunked, strided]
    assert _select.allowed_algorithms(old, padded_layouts=False) == [seq]
    assert _select.allowed_algorithms(old, padded_layouts=True) == [seq, chunked, strided]
    # 12.5 is the first cuBLAS with the grouped entry point.
    assert grouped in _select.allowed_algorithms(DeviceInfo((9, 0), 120500), padded_layouts=False)
    assert grouped not in _select.allowed_algorithms(DeviceInfo((9, 0), 120499), padded_layouts=False)


def chunk_time(sizes, chunk, rates):
    padded = sum(math.ceil(int(m) / chunk) * chunk for m in sizes)
    return padded / rates[chunk]


def expected_chunk(sizes):
    """The documented cost model: padded rows over the measured rate, the
    largest chunk on a tie (candidates are tried from the largest)."""
    if sum(int(m) for m in sizes) == 0:
        return 32
    rates = _layouts.CHUNK_TFLOPS
    return min((256, 128, 64, 32), key=lambda c: (chunk_time(sizes, c, rates), -c))


def test_chunk_candidates_and_rates_as_documented():
    assert _layouts.CHUNK_CANDIDATES == (256, 128, 64, 32)
    assert set(_layouts.CHUNK_TFLOPS) == {256, 128, 64, 32}


def test_choose_chunk_rows_every_single_expert_size():
    for m in range(0, 1100):
        sizes = np.array([m])
        assert _layouts.choose_chunk_rows(sizes) == expected_chunk([m]), m


def test_choose_chunk_rows_at_candidate_boundaries():
    rng = np.random.default_rng(0)
    for chunk in (32, 64, 128, 256):
        for delta in (-1, 0, 1):
            for experts in (1, 8, 128):
                sizes = np.full(experts, chunk + delta)
                sizes[rng.integers(0, experts)] = 0
                assert _layouts.choose_chunk_rows(sizes) == expected_chunk(sizes), (chunk, delta, experts)
    for _ in range(300):
        sizes = rng.integers(0, 700, rng.integers(1, 64))
        assert _layouts.choose_chunk_rows(sizes) == expected_chunk(sizes), sizes


def _entry(**changes):
    entry = {
        "dtype": "bfloat16",
        "num_experts": 128,
        "active_experts": 128,
        "mean_rows": 255,  # features: log2(mean + 1) = 8 exactly
        "n": 1024,
        "k": 2048,
        "times_ms": {
            "cublas_grouped": 1.0,
            "sequential": 3.0,
            "chunked_batched": 0.5,
            "padded_strided": 0.25,
        },
    }
    entry.update(changes)
    return entry


def test_table_distance_limit_both_sides():
    assert _tables.MAX_TABLE_DISTANCE == 2.0
    table = TuningTable("t", 130100, [_entry()])
    # N and K each twice the entry's: squared log2 distance 1 + 1 = 2.0, the limit.
    at_limit = ProblemStats(128, 128, 128 * 255, 255, 2048, 4096)
    assert table.nearest(at_limit) is not None
    assert table.nearest(at_limit)[Algorithm.CHUNKED_BATCHED] == 0.5
    # One more row per expert: log2(257/256)^2 = 3e-5 past the limit.
    past = ProblemStats(128, 128, 128 * 256, 256, 2048, 4096)
    assert table.nearest(past) is None
    # Each feature alone: experts, active experts, rows, N, K, skew.
    assert table.nearest(ProblemStats(128, 128, 128 * 255, 255, 1024, 2048)) is not None
    for stats in (
        ProblemStats(128 * 3, 128, 128 * 255, 255, 1024, 2048),  # log2(3)^2 = 2.51
        ProblemStats(128, 43, 43 * 255, 255, 1024, 2048),  # active 128/43: 2.48
        ProblemStats(128, 128, 128 * 767, 767, 1024, 2048),  # rows 3x: 2.51
        ProblemStats(128, 128, 128 * 255, 255, 3072, 2048),  # N 3x
        ProblemStats(128, 128, 128 * 255, 255, 1024, 6144),  # K 3x
        ProblemStats(128, 128, 128 * 255, 3 * 255, 1024, 2048),  # skew 3
    ):
        assert table.nearest(stats) is None, stats
    # Another dtype never matches.
    assert table.nearest(ProblemStats(128, 128, 128 * 255, 255, 1024, 2048, "float16")) is None


def test_strided_padding_limit_both_sides():
    assert _select.MAX_STRIDED_PADDING == 1.5
    table = TuningTable("t", 130100, [_entry()])
    allowed = _select.allowed_algorithms(H100, padded_layouts=True)
    # 128 experts, 32768 rows: padding ratio = 128 * max_rows / 32768.
    at_limit = ProblemStats(128, 128, 32768, 384, 1024, 2048)  # 1.5 exactly
    past = ProblemStats(128, 128, 32768, 385, 1024, 2048)  # 1.504
    assert at_limit.padding_ratio == 1.5
    times = _select.measured_times(at_limit, H100, allowed, table)
    assert times[Algorithm.PADDED_STRIDED] == 0.25
    assert select_algorithm(at_limit, H100, padded_layouts=True, table=table) is Algorithm.PADDED_STRIDED
    times = _select.measured_times(past, H100, allowed, table)
    assert Algorithm.PADDED_STRIDED not in times and times[Algorithm.CHUNKED_BATCHED] == 0.5
    assert select_algorithm(past, H100, padded_layouts=True, table=table) is Algorithm.CHUNKED_BATCHED


def test_layer_choice_memo_tells_the_padding_limit_apart(monkeypatch):
    # Two loads in the same memo buckets (experts, rows, skew in quarter steps),
    # one exactly at the padding limit and one just past it, must not share a
    # cached choice: PADDED_STRIDED is allowed for the first only.
    monkeypatch.setattr(_select, "_layer_choices", {})
    table = TuningTable("t", 130100, [_entry(), _entry(n=2048, k=1024)])

    def times(stats, candidates):
        return _select.usable_times(table.nearest(stats), stats, candidates)

    at_limit = np.full(128, 253)
    at_limit[0] = 381  # 128 * 381 / 32512 = 1.5 exactly
    past = at_limit.copy()
    past[0] = 382  # 128 * 382 / 32513 = 1.504
    shapes = ((1024, 2048), (2048, 1024), "bfloat16", H100)
    first = _select.choose_layer_algorithms(at_limit, *shapes, times=times)
    assert first == (Algorithm.PADDED_STRIDED, Algorithm.PADDED_STRIDED)
    second = _select.choose_layer_algorithms(past, *shapes, times=times)
    assert second == (Algorithm.CHUNKED_BATCHED, Algorithm.CHUNKED_BATCHED)


def test_layer_choice_memo_separates_different_loads(monkeypatch):
    # Loads far apart (decode-like and prefill-like) get their own decisions.
    monkeypatch.setattr(_select, "_layer_choices", {})

    def times(stats, candidates):
        if stats.mean_rows < 100:
            return {Algorithm.CUBLAS_GROUPED: 1.0, Algorithm.CHUNKED_BATCHED: 2.0}
        return {Algorithm.CUBLAS_GROUPED: 2.0, Algorithm.CHUNKED_BATCHED: 1.0}

    shapes = ((1024, 2048), (2048, 1024), "bfloat16", H100)
    small = _select.choose_layer_algorithms(np.full(64, 8), *shapes, times=times)
    large = _select.choose_layer_algorithms(np.full(64, 800), *shapes, times=times)
    assert small == (Algorithm.CUBLAS_GROUPED, Algorithm.CUBLAS_GROUPED)
    assert large == (Algorithm.CHUNKED_BATCHED, Algorithm.CHUNKED_BATCHED)
    # Asked again: the memo returns the same decisions.
    assert _select.choose_layer_algorithms(np.full(64, 8), *shapes, times=times) == small
    assert _select.choose_layer_algorithms(np.full(64, 800), *shapes, times=times) == large


def test_capacity_for_boundaries():
    assert _layouts.capacity_for(np.array([0, 0])) == 8
    assert _layouts.capacity_for(np.zeros(0, dtype=np.int64)) == 8
    assert _layouts.capacity_for(np.array([3, 8])) == 8
    assert _layouts.capacity_for(np.array([9, 1])) == 16
    assert _layouts.capacity_for(np.array([16])) == 16
    assert _layouts.capacity_for(np.array([17]), multiple=16) == 32
    assert _layouts.capacity_for(np.array([1]), multiple=16) == 16


def test_packed_chunk_boundaries():
    # A group of exactly `chunk` rows is one chunk; one row fewer gets none (it
    # runs apart); one row more gets two, the last ending at the group's end.
    for chunk in (16, 32, 64):
        sizes = np.array([chunk - 1, chunk, chunk + 1, 2 * chunk])
        offsets = np.concatenate(([0], np.cumsum(sizes)))
        starts, groups = _layouts.packed_chunks(sizes, offsets, chunk)
        o = offsets
        assert groups.tolist() == [1, 2, 2, 3, 3]
        assert starts.tolist() == [o[1], o[2], o[2] + 1, o[3], o[3] + chunk]


def test_own_kernel_is_a_candidate_where_it_can_run():
    """SM90_GROUPED joins the candidates on SM 9.0 for 16-bit products with K and
    N multiples of 8, and nowhere else."""
    base = [Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL]
    ampere = DeviceInfo(sm=(8, 0), cublas_version=130100, name="a100")
    fits = ProblemStats(8, 8, 4096, 600, 1536, 2048, "bfloat16")
    assert _select.with_own_kernel(base, H100, fits) == [*base, Algorithm.SM90_GROUPED]
    assert _select.with_own_kernel(base, H100, ProblemStats(8, 8, 4096, 600, 1536, 2048, "float16"))[-1] is (
        Algorithm.SM90_GROUPED
    )
    assert _select.with_own_kernel(base, ampere, fits) == base
    assert _select.with_own_kernel(base, H100, ProblemStats(8, 8, 4096, 600, 1536, 2048, "float32")) == base
    assert _select.with_own_kernel(base, H100, ProblemStats(8, 8, 4096, 600, 1540, 2048, "bfloat16")) == base
    assert _select.with_own_kernel(base, H100, ProblemStats(8, 8, 4096, 600, 1536, 2044, "bfloat16")) == base


def _table_with(times: dict, device: DeviceInfo = H100) -> TuningTable:
    entry = {"dtype": "bfloat16", "num_experts": 8, "active_experts": 8, "mean_rows": 512.0, "max_rows": 600}
    entry.update({"n": 1536, "k": 2048, "times_ms": times})
    return TuningTable(device.name, device.cublas_version, [entry], list(device.sm))


def test_auto_takes_own_kernel_only_from_measured_times():
    """Measured fastest, the kernel is chosen on SM 9.0 (gmm's grouped rows and the
    layer's layouts); never for the K-grouped product, never on another GPU, and
    never by the built-in rules (no table: a cuBLAS algorithm)."""
    stats = ProblemStats(8, 8, 4096, 600, 1536, 2048, "bfloat16")
    times = {"cublas_grouped": 2.0, "sequential": 1.5, "chunked_batched": 1.8, "sm90_grouped": 1.0}
    table = _table_with(times)
    assert select_algorithm(stats, H100, table=table) is Algorithm.SM90_GROUPED
    assert select_algorithm(stats, H100, padded_layouts=True, table=table) is Algorithm.SM90_GROUPED
    assert select_algorithm(stats, H100, table=table, own_kernel=False) is Algorithm.SEQUENTIAL
    ampere = DeviceInfo(sm=(8, 0), cublas_version=130100, name=H100.name)
    assert select_algorithm(stats, ampere, table=_table_with(times, ampere)) is Algorithm.SEQUENTIAL
    assert select_algorithm(stats, H100, table=None) is not Algorithm.SM90_GROUPED
    slower = _table_with({**times, "sm90_grouped": 1.6})
    assert select_algorithm(stats, H100, table=slower) is Algorithm.SEQUENTIAL
    # A win smaller than the margin is a tie, and a tie goes to cuBLAS.
    assert _select.OWN_KERNEL_MARGIN == 1.03
    tie = _table_with({**times, "sm90_grouped": 1.5 / 1.02})
    assert select_algorithm(stats, H100, table=tie) is Algorithm.SEQUENTIAL
    clear = _table_with({**times, "sm90_grouped": 1.5 / 1.04})
    assert select_algorithm(stats, H100, table=clear) is Algorithm.SM90_GROUPED


def test_layer_pair_with_own_kernel_first():
    """The layer's pair: our kernel for the first GEMM runs on grouped-contiguous
    rows, so the second GEMM is the fastest algorithm of that layout (here our
    kernel again; CHUNKED_BATCHED, fastest alone, needs another layout), unless
    the pair on another layout is faster in all."""
    sizes = np.full(8, 512, dtype=np.int64)

    def times(first_ms, second_ms):
        def source(stats, candidates):
            table = first_ms if (stats.n, stats.k) == (1536, 2048) else second_ms
            return {Algorithm(a): t for a, t in table.items() if Algorithm(a) in candidates}

        return source

    first = {"cublas_grouped": 2.0, "sequential": 2.2, "chunked_batched": 1.9, "sm90_grouped": 1.0}
    second = {"cublas_grouped": 1.2, "sequential": 1.3, "chunked_batched": 0.5, "sm90_grouped": 1.1}
    pair = _select.choose_layer_algorithms(
        sizes, (1536, 2048), (2048, 768), "bfloat16", H100, times=times(first, second), times_key="t1"
    )
    assert pair == (Algorithm.SM90_GROUPED, Algorithm.SM90_GROUPED)  # 1.0 + 1.1 < 1.9 + 0.5
    first["sm90_grouped"] = 1.5  # 1.5 + 1.1 > 1.9 + 0.5: the chunked pair wins in all
    pair = _select.choose_layer_algorithms(
        sizes, (1536, 2048), (2048, 768), "bfloat16", H100, times=times(first, second), times_key="t2"
    )
    assert pair == (Algorithm.CHUNKED_BATCHED, Algorithm.CHUNKED_BATCHED)


def test_layer_pair_on_padded_rows_must_win_by_the_margin():
    """A pair on padded rows (here CHUNKED_BATCHED's) that beats the best pair on
    back-to-back rows by less than PADDED_LAYOUT_MARGIN is a tie, and goes to
    back-to-back rows (SEQUENTIAL here); by more, it is taken."""
    sizes = np.full(8, 512, dtype=np.int64)
    assert _select.PADDED_LAYOUT_MARGIN == 1.03

    def pair(chunked_ms, key):
        first = {"cublas_grouped": 3.0, "sequential": 2.0, "chunked_batched": chunked_ms}
        second = {"cublas_grouped": 1.5, "sequential": 1.0, "chunked_batched": 1.0}

        def source(stats, candidates):
            table = first if (stats.n, stats.k) == (1536, 2048) else second
            return {Algorithm(a): t for a, t in table.items() if Algorithm(a) in candidates}

        return _select.choose_layer_algorithms(
            sizes, (1536, 2048), (2048, 768), "float32", H100, times=source, times_key=key
        )

    # Back-to-back rows: 2.0 + 1.0 = 3.0. Chunked: x + 1.0.
    assert pair(1.95, "tie") == (Algorithm.SEQUENTIAL, Algorithm.SEQUENTIAL)  # 2.95 * 1.03 > 3.0
    assert pair(1.80, "win") == (Algorithm.CHUNKED_BATCHED, Algorithm.CHUNKED_BATCHED)  # 2.8 * 1.03 < 3.0
