"""The eager FP8 ``gmm``'s call cache and prepared launches on the CPU (GPU
side stubbed: tests/host_stubs.py).

A hit replays the row quantizer, the offsets kernel and the FP8 GEMM
prepared (``gemm/fp8_gmm.py``); it must pass every kernel the values the
unprepared path passes (``gmm_fp8``: the quantizer's launcher,
``schedule_offsets``, ``grouped_fp8``), for new x, out and weights too, and
prepare anew where a key part changes (sizes, M, the stream's grown row
buffer, a probe's thin-tile switch); bad calls still raise after hits, a
capturing stream still takes the checked path (which refuses it), and the
hit stays within a call budget.
"""

from __future__ import annotations

import numpy as np
import pytest
from host_stubs import H100, count_calls, fake_array, stub_gpu

import cublas_grouped as cg
from cublas_grouped.gemm import call_cache, fp8_gmm
from cublas_grouped.gemm.backends import hopper_fp8
from cublas_grouped.runtime.arrays import BFLOAT16

E, N, K = 16, 256, 512


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    with stub_gpu(monkeypatch, info=H100) as rec:
        yield rec


def _w(ptr=None):
    values = fake_array((E, N, K), "uint8", ptr=ptr)
    return cg.FP8ExpertWeights(values, fake_array((E, 2, 4), "float32"), "block128", True)


def _sizes(m: int, kind: str):
    host = np.zeros(E, np.int64)
    host[: m % E] += 1
    host += m // E
    if kind == "host":
        return host
    return fake_array((E,), kind)


def _queued(rec, out, host_sizes: bool):
    """The launches of the last call: the output's address as "out"; with
    host sizes the offsets kernel's sizes address as "sizes" (the unprepared
    path uploads them per call into the stream's buffer, a cached entry once
    into its own copy)."""
    launches = []
    for i, (h, gb, shm, st, vals) in enumerate(rec.decoded):
        vals = tuple("out" if v == out.data.ptr else v for v in vals)
        if host_sizes and i == 1:
            vals = ("sizes", *vals[1:])
        launches.append((h, gb, shm, st, vals))
    return launches


def _unprepared(monkeypatch, a, w, sizes, out):
    """``gmm`` through the unprepared path (no key: nothing cached or hit)."""
    with monkeypatch.context() as mp:
        mp.setattr(fp8_gmm, "_key", lambda *args: (None, None))
        return cg.gmm(a, w, sizes, trans_b=True, out=out)


@pytest.mark.parametrize("kind", ["host", "int32", "int64"])  # int16: a CuPy cast (GPU test)
@pytest.mark.parametrize("given_out", [True, False])
def test_a_hit_queues_what_the_unprepared_call_does(gpu, monkeypatch, kind, given_out):
    w = _w()
    for m in (128, 512, 128, 40):  # new entries, a grown row buffer, an entry prepared anew
        sizes = _sizes(m, kind)
        calls = [(fake_array((m, K)), fake_array((m, N)) if given_out else None) for _ in range(3)]
        for a, out in calls:  # new x and out at every call: each goes in a slot
            gpu.clear()
            got = _unprepared(monkeypatch, a, w, sizes, out)
            want = _queued(gpu, got, kind == "host")
            copies = len(gpu.copies)
            for _ in range(2):  # the first (checked) cached call or a hit, then a hit
                gpu.clear()
                result = cg.gmm(a, w, sizes, trans_b=True, out=out)
                assert result is out or out is None
                assert _queued(gpu, result, kind == "host") == want
        assert len(want) == 3
        assert copies == (kind == "host")  # the unprepared path uploads host sizes per call
        gpu.clear()
        cg.gmm(a, w, sizes, trans_b=True, out=out)
        assert gpu.copies == []  # a hit uploads nothing


def test_new_weights_and_a_probes_thin_switch_prepare_anew(gpu, monkeypatch):
    a, out, sizes = fake_array((64, K)), fake_array((64, N)), _sizes(64, "int32")
    for w in (_w(), _w(), _w()):  # same key (shapes, alignment), new addresses
        for thin in (True, False, True):
            monkeypatch.setattr(hopper_fp8, "THIN", thin)
            gpu.clear()
            _unprepared(monkeypatch, a, w, sizes, out)
            want = _queued(gpu, out, False)
            gpu.clear()
            cg.gmm(a, w, sizes, trans_b=True, out=out)
            assert _queued(gpu, out, False) == want


def test_entries_are_keyed_by_what_the_checks_read(gpu):
    """Host sizes by value, M, the scales' layout and the executor: each a
    new entry; an unchanged call a hit."""
    w = _w()
    a, out = fake_array((64, K)), fake_array((64, N))
    cg.gmm(a, w, _sizes(64, "host"), trans_b=True, out=out)
    count = call_cache.cached_count()
    cg.gmm(a, w, _sizes(64, "host"), trans_b=True, out=out)
    assert call_cache.cached_count() == count  # a hit
    other = _sizes(64, "host")
    other[0], other[1] = other[0] + 1, other[1] - 1
    cg.gmm(a, w, other, trans_b=True, out=out)
    cg.gmm(fake_array((32, K)), w, _sizes(32, "host"), trans_b=True)
    cg.gmm(a, w, _sizes(64, "host"), trans_b=True, out=out, algorithm="sm90_grouped")
    assert call_cache.cached_count() == count + 3


def test_bad_calls_still_raise_after_hits(gpu):
    w = _w()
    a, out, sizes = fake_array((64, K)), fake_array((64, N)), _sizes(64, "host")
    for _ in range(2):
        cg.gmm(a, w, sizes, trans_b=True, out=out)
    with pytest.raises(ValueError, match="out must have shape"):
        cg.gmm(a, w, sizes, trans_b=True, out=fake_array((64, N + 8)))
    with pytest.raises(ValueError, match="pass trans_b=True"):
        cg.gmm(a, w, sizes, out=out)
    bad = sizes.copy()
    bad[0] += 1
    with pytest.raises(ValueError, match="sum\\(group_sizes\\)"):
        cg.gmm(a, w, bad, trans_b=True, out=out)
    with pytest.raises(ValueError, match="trans_a"):
        cg.gmm(a, w, sizes, trans_b=True, trans_a=True, out=out)


def test_a_capturing_stream_takes_the_checked_path_after_hits(gpu, monkeypatch):
    """The prepared call reads the stream's row buffer, which a replay would
    find refilled: under capture a hit is not taken, and the checked path
    goes to the fallback, which refuses capture, before any GPU work."""
    import cupy

    w = _w()
    a, out, sizes = fake_array((64, K)), fake_array((64, N)), _sizes(64, "int32")
    for _ in range(2):
        cg.gmm(a, w, sizes, trans_b=True, out=out)
    monkeypatch.setattr(cupy.cuda.runtime, "streamIsCapturing", lambda stream: 1)
    gpu.clear()
    with pytest.raises(ValueError, match="CUDA graph capture"):
        cg.gmm(a, w, sizes, trans_b=True, out=out)
    assert gpu.decoded == [] and gpu.launches == []


def test_an_explicit_cublas_algorithm_keeps_the_fallback(gpu, monkeypatch):
    w = _w()
    a, out, sizes = fake_array((64, K)), fake_array((64, N)), _sizes(64, "host")
    dequantized = []
    monkeypatch.setattr(
        cg.FP8ExpertWeights, "dequantize", lambda self, *a, **k: dequantized.append(1) or 1 / 0
    )
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            cg.gmm(a, w, sizes, trans_b=True, out=out, algorithm="cublas_grouped")
    assert len(dequantized) == 2


def test_the_kernel_takes_fp8_weights_only_under_auto_or_its_own_algorithm(gpu):
    """kernel_takes (gmm's and the MoE layer's test for the FP8 kernel) says
    no to any algorithm but AUTO and SM90_GROUPED, on a GPU where it says yes
    to those two."""
    w = _w()
    for algorithm in ("auto", "sm90_grouped"):
        assert fp8_gmm.kernel_takes(w, BFLOAT16, 0, algorithm)
    for algorithm in ("cublas_grouped", "sequential", "chunked_batched"):
        assert not fp8_gmm.kernel_takes(w, BFLOAT16, 0, algorithm), algorithm


def test_the_stream_row_buffer_layout():
    """Codes, then the scales at the next 16 bytes (the GEMM's TMA and the
    quantizer's vector path read both aligned)."""
    assert fp8_gmm.stream_rows_layout(3, 40) == (128, 128 + 3 * 4)
    assert fp8_gmm.stream_rows_layout(128, 2048) == (128 * 2048, 128 * 2048 + 128 * 16 * 4)
    assert fp8_gmm.stream_rows_layout(0, 768) == (0, 0)


# Python and C calls of a repeated gmm with FP8 weights (Qwen3-30B-A3B's first
# expert GEMM: E = 128, K = 2048, N = 1536, 16 tokens x 8), on stubs
# (2026-11-27): 33 per hit, host or device sizes; 528-552 before the cache
# (docs/kernel-notes.md, "The eager FP8 gmm's host path").
CALL_BUDGET = 35


@pytest.mark.parametrize("kind", ["host", "int32"])
def test_a_hit_stays_short(gpu, kind):
    e, k, n, m = 128, 2048, 1536, 128
    values = fake_array((e, n, k), "uint8")
    w = cg.FP8ExpertWeights(values, fake_array((e, n // 128, k // 128), "float32"), "block128", True)
    a, out = fake_array((m, k)), fake_array((m, n))
    sizes = np.ones(e, np.int64) if kind == "host" else fake_array((e,), "int32")

    def call():
        return cg.gmm(a, w, sizes, trans_b=True, out=out)

    call()
    call()
    assert count_calls(call, repeat=10) <= CALL_BUDGET
