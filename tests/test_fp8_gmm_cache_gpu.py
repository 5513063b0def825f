"""The eager FP8 ``gmm``'s cached calls on the GPU (SM 9.0): a hit replays the
quantizer, the offsets kernel and the FP8 GEMM prepared, with x quantized
into the stream's reused buffer (``gemm/fp8_gmm.py``). Its outputs must be,
bit for bit, those of the unprepared path (``quantize_rows_fp8`` into fresh
arrays, then ``grouped_fp8``), and within bf16 rounding of float64 on the
quantized operands:

- repeated calls on one stream, no sync between them, with new x at every
  call, the sizes and M changing (decode sizes of a Qwen3-like layer: 16-64
  tokens x 8 over 128 experts, and a few-expert one), host sizes and device
  sizes of int32, int64 and int16 (a cast first), ``out`` given (NaN-poisoned)
  and omitted, then each call again (a hit of its entry);
- two streams in turn, calls queued on both before either is synchronized,
  each stream's rows in its own buffer: every output as the unprepared path's.

    python3 -m pytest -q -m gpu tests/test_fp8_gmm_cache_gpu.py
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import poisoned, random_sizes, wait_for_current_stream
from test_fp8_sm90_gpu import _check

import cublas_grouped as cg
from cublas_grouped.gemm import call_cache
from cublas_grouped.gemm.backends import hopper_fp8
from cublas_grouped.testing_fp8 import grouped_fp8_ref

pytestmark = pytest.mark.gpu
BF16 = ml_dtypes.bfloat16
# (name, experts, N, K): Qwen3-30B-A3B's two expert GEMMs made small, and a few-expert one.
SHAPES = [
    ("qwen3-like gemm1", 128, 256, 384),
    ("qwen3-like gemm2", 128, 384, 128),
    ("few experts", 8, 512, 1024),
]


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the FP8 kernel runs on SM 9.0 GPUs only")


def _weights(rng, e, n, k):
    import cupy

    w = cupy.asarray((rng.standard_normal((e, n, k)) * k**-0.5).astype(BF16))
    return cg.quantize_fp8(w, trans_b=True)


def _direct(x, wq, sizes, stream):
    """The unprepared path: x quantized into fresh arrays, then the kernel."""
    a_q, a_s = cg.quantize_rows_fp8(x, stream=stream)
    return hopper_fp8.grouped_fp8(a_q, a_s, wq, np.asarray(sizes), stream=stream), (a_q, a_s)


def _sizes_arg(sizes, kind):
    import cupy

    return sizes if kind == "host" else cupy.asarray(sizes, dtype=kind)


@pytest.mark.parametrize("kind", ["host", "int32", "int64", "int16"])
@pytest.mark.parametrize("name, e, n, k", SHAPES)
def test_cached_calls_equal_the_unprepared_path_bitwise(name, e, n, k, kind):
    import cupy

    rng = np.random.default_rng(e + n + k)
    wq = _weights(rng, e, n, k)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # wq was made on the null stream
    call_cache.clear()
    cases = []
    for round_ in range(2):  # the second round: every call again, a hit of its entry
        for i, tokens in enumerate((16, 64, 16, 40, 64, 16)):
            m = tokens * (8 if e >= 64 else 2)
            sizes = random_sizes(np.random.default_rng(1000 * i + m), e, m) if i != 2 else np.full(e, m // e)
            given = i % 2 == 0
            with stream:  # x copied in on the stream that reads it (and frees it)
                x = cupy.asarray(rng.standard_normal((m, k)).astype(BF16))
                out = poisoned((m, n), BF16) if given else None
                got = cg.gmm(x, wq, _sizes_arg(sizes, kind), trans_b=True, out=out, stream=stream)
                want, quantized = _direct(x, wq, sizes, stream)
            cases.append((f"{name} {kind} round {round_} call {i} M={m}", got, want, quantized, sizes))
    stream.synchronize()
    for what, got, want, *_ in cases:
        assert bool((got.view(cupy.uint16) == want.view(cupy.uint16)).all()), f"{what}: not bitwise"
    what, got, _, (a_q, a_s), sizes = cases[-1]
    _check(got, grouped_fp8_ref(a_q.get(), a_s.get(), wq.values.get(), wq.scales.get(), sizes), what)


def test_two_streams_each_with_its_own_row_buffer():
    """Calls queued on two streams in turn (different M, so each stream's
    buffer grows on its own), nothing synchronized until the end: each output
    is the unprepared path's, run afterwards on a third stream."""
    import cupy

    rng = np.random.default_rng(3)
    e, n, k = 128, 256, 384
    wq = _weights(rng, e, n, k)
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(2)]
    wait_for_current_stream(*streams)  # wq was made on the null stream
    calls = []
    for step in range(8):
        stream = streams[step % 2]
        m = (16 if step % 2 else 64) * 8 + step
        sizes = random_sizes(np.random.default_rng(step), e, m)
        with stream:  # x and the sizes copied in on the stream that reads them
            x = cupy.asarray(rng.standard_normal((m, k)).astype(BF16))
            device_sizes = cupy.asarray(sizes, dtype=cupy.int32)
            out = poisoned((m, n), BF16)
            calls.append((x, sizes, cg.gmm(x, wq, device_sizes, trans_b=True, out=out, stream=stream)))
    for stream in streams:
        stream.synchronize()
    check = cupy.cuda.Stream(non_blocking=True)
    for step, (x, sizes, got) in enumerate(calls):
        with check:
            want, _ = _direct(x, wq, sizes, check)
        check.synchronize()
        assert bool((got.view(cupy.uint16) == want.view(cupy.uint16)).all()), f"step {step}: not bitwise"
