"""The backward's weight-gradient rule and call plans on the host (CPU):
which path runs for which layout and sizes, the buckets, and the exact
cuBLAS arguments of the STRIDED and BUCKETED paths (cuBLAS calls recorded)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cublas_grouped.gemm.backends.cublas import CublasCall
from cublas_grouped.gemm.executor import GroupedGemmExecutor
from cublas_grouped.gemm.plan import GemmPlan, Operands, RowLayout
from cublas_grouped.moe import weight_grad as W
from cublas_grouped.runtime.cublas import Op
from cublas_grouped.runtime.device import DeviceInfo

P = W.WeightGradPath
BF16 = np.dtype("float16")  # the rule reads only the itemsize: 2 bytes, as bfloat16
QWEN3 = 2048, 1536  # dW1 [E, H, 2I] of Qwen3-30B-A3B: K = hidden, N = 2 * inter


def _plan(counts, layout):
    return SimpleNamespace(counts_host=np.asarray(counts, dtype=np.int64), layout=layout)


def _path(counts, layout, cublas=130100, kn=QWEN3, dtype=BF16):
    executor = GroupedGemmExecutor(device_info=DeviceInfo(sm=(9, 0), cublas_version=cublas))
    k, n = kn
    return W.weight_grad_path(executor, _plan(counts, layout), n, k, dtype, 0)


def _uniform(experts, rows, spread, seed=0):
    rng = np.random.default_rng(seed)
    return rows + rng.integers(-spread, spread + 1, experts)


@pytest.mark.parametrize(
    "counts, layout, cublas, want",
    [
        # Qwen3 at 4096 tokens, uniform: the forward's padded capacity -> one strided call.
        (_uniform(128, 256, 20), RowLayout.padded(280), 130100, P.STRIDED),
        # One expert takes every row: capacity 128x the mean, per-expert calls win.
        ([4096] + [1] * 127, RowLayout.padded(4096), 130100, P.SEQUENTIAL),
        # Qwen3 skewed on chunk-aligned rows: one batched call per block length.
        (_uniform(128, 256, 100), RowLayout.chunk_aligned(128), 130100, P.BUCKETED),
        ([1024] * 8, RowLayout.chunk_aligned(256), 130100, P.BUCKETED),  # equal blocks: one call
        # Tiny experts, wide chunks: the padding costs more than the grouped call's rate.
        ([1] * 128, RowLayout.chunk_aligned(256), 130100, P.GROUPED),
        ([1] * 128, RowLayout.chunk_aligned(256), 120400, P.BUCKETED),  # no grouped GEMM before 12.5
        # Grouped-contiguous rows keep cuBLAS's rule of AUTO.
        ([1024] * 8, RowLayout.contiguous(), 130100, P.SEQUENTIAL),
        ([64] * 128, RowLayout.contiguous(), 130100, P.GROUPED),
        ([64] * 128, RowLayout.contiguous(), 120400, P.SEQUENTIAL),
    ],
)
def test_rule(counts, layout, cublas, want):
    assert _path(counts, layout, cublas) is want


def test_rule_by_layout(monkeypatch):
    # Pins which layouts take the cost model: chunks of 2 rows already pad
    # (the model's BUCKETED), grouped-contiguous rows (align 1) keep cuBLAS's
    # rule of AUTO, from the rows alone and no tuning table. 17 experts of
    # 4096 rows: the rule says GROUPED (more than 16 experts), the model
    # SEQUENTIAL (287 TFLOP/s per call beats 270 grouped).
    assert _path([1024] * 8, RowLayout.chunk_aligned(2)) is P.BUCKETED
    counts = [4096] * 17
    times = W.expected_times(RowLayout.contiguous(), np.array(counts), *QWEN3, 2, True)
    assert min(times, key=times.get) is P.SEQUENTIAL
    from cublas_grouped.gemm import select

    monkeypatch.setattr(select, "load_tuning_table", lambda device: pytest.fail("no table for this rule"))
    assert _path(counts, RowLayout.contiguous()) is P.GROUPED


class _SpyExecutor(GroupedGemmExecutor):
    """Records the device ordinal of every capability question."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.asked = []

    def info_for(self, device_id=None):
        self.asked.append(("info", device_id))
        return super().info_for(device_id)

    def fallback(self, algorithm, device_id=None):
        self.asked.append(("fallback", device_id))
        return super().fallback(algorithm, device_id)


def test_rule_asks_the_calls_device():
    # Pins the device ordinal passed on: capabilities and fallback are those
    # of the gradient's device, not the current one.
    spy = _SpyExecutor(device_info=DeviceInfo(sm=(9, 0), cublas_version=130100))
    W.weight_grad_path(spy, _plan([64] * 8, RowLayout.contiguous()), *QWEN3[::-1], BF16, 3)
    assert ("info", 3) in spy.asked and ("fallback", 3) in spy.asked
    W.weight_grad_path(spy, _plan([64] * 8, RowLayout.chunk_aligned(128)), *QWEN3[::-1], BF16, 3)
    assert all(device == 3 for _, device in spy.asked), spy.asked


def test_rule_follows_expected_times():
    counts = _uniform(128, 256, 100, seed=4)
    times = W.expected_times(RowLayout.chunk_aligned(128), counts, *QWEN3, 2, True)
    assert set(times) == {P.BUCKETED, P.GROUPED, P.SEQUENTIAL}
    # 128 per-expert calls cost at least 128 call floors; one batched call per bucket far less.
    assert times[P.SEQUENTIAL] >= 128 * W.CALL_US > 2 * times[P.BUCKETED]
    padded = W.expected_times(RowLayout.padded(384), counts, *QWEN3, 2, True)
    assert set(padded) == {P.STRIDED, P.SEQUENTIAL}  # no pointer arrays on padded capacity
    assert set(W.expected_times(RowLayout.contiguous(), counts, *QWEN3, 2, False)) == {P.SEQUENTIAL}


def test_expected_times_by_hand():
    # Pins the cost model's arithmetic where the output write bounds the time:
    # [E, 1024, 1024] of 2-byte values (2 MiB per expert), few rows per expert.
    # Expert 0 has no rows: the per-expert calls and the grouped call skip it,
    # the strided call over padded capacity writes it all the same.
    out_e = 1024 * 1024 * 2
    write_us = lambda experts: experts * out_e / (W.WRITE_GBPS * 1e3)  # noqa: E731
    sizes = np.array([0] + [8] * 31)
    padded = W.expected_times(RowLayout.padded(8), sizes, 1024, 1024, 2, True)
    assert padded == pytest.approx({P.STRIDED: write_us(32), P.SEQUENTIAL: 31 * W.CALL_US})
    assert write_us(32) > 20 * (2 * 1024 * 1024 * 32 * 8) / (W.BATCHED_TFLOPS * 1e6), "write-bound"
    # Chunks of 2 rows (the smallest alignment that pads): 3 rows take blocks of 4, one bucket.
    sizes = np.array([0] + [3] * 31)
    aligned = W.expected_times(RowLayout.chunk_aligned(2), sizes, 1024, 1024, 2, True)
    assert aligned == pytest.approx(
        {P.BUCKETED: write_us(31), P.GROUPED: write_us(31), P.SEQUENTIAL: 31 * W.CALL_US}
    )


def test_buckets():
    blocks = np.array([0, 128, 256, 128, 0, 384, 256])
    got = [(rows, ex.tolist()) for rows, ex in W.bucket_experts(blocks)]
    assert got == [(128, [1, 3]), (256, [2, 6]), (384, [5])]
    assert W.bucket_experts(np.zeros(4, dtype=np.int64)) == []


def _k_grouped(counts, layout, k=48, n=40):
    sizes = np.asarray(counts, dtype=np.int64)
    rows = layout.rows(sizes)
    plan = GemmPlan(len(sizes), rows, n, k, True, False, sizes, layout.offsets(sizes), np.flatnonzero(sizes))
    return plan, Operands.for_plan(plan, 10_000, 2_000_000, 9_000_000, 2)


def test_bucketed_calls(monkeypatch):
    """Experts 1 and 3 (blocks of 32 rows) share a call, expert 2 (64 rows)
    and expert 5 (96 rows) have their own; empty experts 0 and 4 take no part;
    one upload of every pointer, each at its expert's block; each call reads
    its own slice of the three arrays (a third bucket pins the running start)."""
    layout = RowLayout.chunk_aligned(32)
    counts = [0, 5, 40, 32, 0, 70]
    plan, ops = _k_grouped(counts, layout)
    uploads, calls = [], []

    class FakeRes:  # res.upload(name, host table) -> a device array at address 1000
        def upload(self, name, table):
            uploads.append((name, table.tolist()))
            return SimpleNamespace(data=SimpleNamespace(ptr=1000))

    call = CublasCall(1, 0, 0)
    monkeypatch.setattr(W, "batched", lambda c, d, arrays, count: calls.append((c, d, arrays, count)))
    W._bucketed(call, FakeRes(), plan, ops, layout)
    offsets = layout.offsets(np.asarray(counts))
    assert offsets.tolist() == [0, 0, 32, 96, 128, 128, 224]
    ((name, table),) = uploads
    # Its own buffer: the forward's pointer arrays may still be in use.
    assert name not in ("grouped-pointers", "chunk-pointers", "small-pointers")
    # Experts in bucket order 1, 3, 2, 5 at rows 0, 96, 32, 128 (itemsize 2, K = 48, N = 40):
    # a row r at 10_000 + 96 r, b row r at 2_000_000 + 80 r, out[e] at 9_000_000 + 3840 e.
    assert table == [
        [10_000, 19_216, 13_072, 22_288],
        [2_000_000, 2_007_680, 2_002_560, 2_010_240],
        [9_003_840, 9_011_520, 9_007_680, 9_019_200],
    ]
    (c32, d32, arrays32, n32), (c64, d64, arrays64, n64), (c96, d96, arrays96, n96) = calls
    assert c32 is call and c64 is call and c96 is call
    assert (n32, n64, n96) == (2, 1, 1)
    # Reduction over the whole block (padding rows are zeros); out_e^T [N, K] = b_e^T @ a_e.
    assert (d32.transa, d32.transb, d32.m, d32.n, d32.k) == (Op.N, Op.T, 40, 48, 32)
    assert (d32.lda, d32.ldb, d32.ldc) == (40, 48, 40) and d64.k == 64 and d96.k == 96
    assert arrays32 == (1000, 1032, 1064)
    assert arrays64 == (1016, 1048, 1080)
    assert arrays96 == (1024, 1056, 1088)


def test_blocks_on_padded_capacity():
    # Pins _blocks for a padded layout: every expert with rows spans the whole
    # capacity, an expert without rows spans nothing (one row is not none).
    got = W._blocks(RowLayout.padded(24), np.array([3, 0, 24, 1]))
    assert got.tolist() == [24, 0, 24, 24]
    assert W._blocks(RowLayout.chunk_aligned(32), np.array([3, 0, 33])).tolist() == [32, 0, 64]


def test_strided_call(monkeypatch):
    layout = RowLayout.padded(24)
    plan, _ = _k_grouped([3, 0, 24], layout, k=16, n=8)
    seen = []
    monkeypatch.setattr(W._cublas, "gemm_strided_batched_ex", lambda *args: seen.append(args))
    arr = SimpleNamespace

    a, b, out = (arr(data=arr(ptr=p)) for p in (100, 200, 300))
    W._strided(CublasCall(7, 14, 68), plan, a, b, out, 24)
    (args,) = seen
    handle, transa, transb, m, n, k, alpha = args[:7]
    assert (handle, transa, transb, m, n, k, alpha) == (7, Op.N, Op.T, 8, 16, 24, 1.0)
    # cuBLAS A = b (rows x N, ld N), B = a (rows x K, ld K), C = out [E, K, N]; strides in elements.
    assert args[7:11] == (200, 14, 8, 24 * 8)
    assert args[11:15] == (100, 14, 16, 24 * 16)
    assert args[15:20] == (0.0, 300, 14, 8, 16 * 8)
    assert args[20:] == (3, 68)
