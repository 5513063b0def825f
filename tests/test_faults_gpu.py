"""Faults on the GPU: out of memory under a CuPy pool limit, failed cuBLAS calls and
launches, a failed CUDA-graph capture, interrupted work. After each fault the next
call is checked against the float64 reference on the same stream.

Global state is restored even when a test fails: the pool limit by the
``pool_limit`` fixture, a capture left open by the ``capture_stream`` fixture,
patched functions by ``monkeypatch``."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from gpu_util import TOLERANCE, check_close, device_random, poisoned

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm import executor as _executor
from cublas_grouped.gemm import pointers as _pointers
from cublas_grouped.moe import fixed_capacity as _fixed
from cublas_grouped.moe import layer as _layer
from cublas_grouped.runtime import cublas as _cublas
from cublas_grouped.runtime.device import resources
from cublas_grouped.runtime.oom import GpuOutOfMemoryError

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
TOL = TOLERANCE["bfloat16"]


@pytest.fixture
def pool_limit():
    """``set(headroom)`` makes a fresh CuPy pool the allocator, limited to
    ``headroom`` bytes; the allocator in force before is put back afterwards,
    whatever happens. A fresh pool, because the default one keeps free pieces
    of blocks earlier tests split, from which an allocation can be served
    without asking for memory, so no limit would bite."""
    import os

    import cupy

    if os.environ.get("CUBLAS_GROUPED_TEST_NO_POOL") == "1":
        pytest.skip("CuPy's pool is off (CUBLAS_GROUPED_TEST_NO_POOL=1): a pool limit cannot bite")
    before = cupy.cuda.get_allocator()

    def set_headroom(headroom: int) -> None:
        cupy.cuda.Device().synchronize()
        pool = cupy.cuda.MemoryPool()
        pool.set_limit(size=headroom)
        cupy.cuda.set_allocator(pool.malloc)

    try:
        yield set_headroom
    finally:
        cupy.cuda.set_allocator(before)
        cupy.get_default_memory_pool().free_all_blocks()


@pytest.fixture
def stream():
    """A fresh non-blocking stream: its per-stream resources start empty."""
    import cupy

    from cublas_grouped.runtime import device as _device

    s = cupy.cuda.Stream(non_blocking=True)
    # The driver hands out the handles of destroyed streams again: drop what the
    # library keeps for an earlier stream that had this handle.
    getattr(_device._local, "streams", {}).pop((cupy.cuda.Device().id, s.ptr), None)
    yield s
    s.synchronize()


@pytest.fixture
def capture_stream(stream):
    """``stream``, never left capturing: a capture a failed test leaves open is ended."""
    import cupy

    yield stream
    if cupy.cuda.runtime.streamIsCapturing(stream.ptr):
        try:
            stream.end_capture()
        except Exception:
            pass


def _gmm_case(rng, sizes, k=256, n=512, experts=None):
    sizes = np.asarray(sizes, dtype=np.int64)
    a, a64 = device_random(rng, (int(sizes.sum()), k), BF16)
    b, b64 = device_random(rng, (experts or len(sizes), k, n), BF16, k**-0.5)
    return a, b, sizes, ref.gmm_ref(a64, b64, sizes)


def _layer_weights(rng, experts=8, hidden=256, inter=512):
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), BF16, hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), BF16, inter**-0.5)
    return (w1, w2), (w1_64, w2_64)


def _routing(rng, tokens, experts, k):
    import cupy

    ids = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w = rng.random((tokens, k)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    return cupy.asarray(ids), cupy.asarray(w), ids, w.astype(np.float64)


# -- out of memory -------------------------------------------------------------------------------------------


def test_gmm_out_of_memory_for_its_result_then_a_smaller_call(pool_limit, stream):
    import cupy

    rng = np.random.default_rng(1)
    with stream:
        a_small, b, small, ref_small = _gmm_case(rng, [64, 0, 100, 36])
        cg.gmm(a_small, b, small, algorithm="cublas_grouped")  # workspace and buffers of this stream
        big_sizes = [8192, 8192, 8192, 8192]
        a_big, _ = device_random(rng, (32768, 256), BF16)  # result: 32768 x 512 bf16 = 32 MiB
        pool_limit(8 << 20)
        with pytest.raises(GpuOutOfMemoryError) as info:
            cg.gmm(a_big, b, big_sizes, algorithm="cublas_grouped")
        err = info.value
        assert str(err).startswith(
            "gmm with a [32768, 256] bfloat16, b [4, 256, 512] bfloat16: out of GPU memory allocating "
            "33,554,432 bytes (32.00 MiB) on device "
        ), str(err)
        assert err.requested_bytes == 32 << 20 and err.call == "gmm"
        assert isinstance(err.__cause__, cupy.cuda.memory.OutOfMemoryError)
        # The next, smaller call fits under the same limit and is right.
        check_close(cg.gmm(a_small, b, small, algorithm="cublas_grouped"), ref_small, TOL, "after OOM")


@pytest.mark.parametrize("algorithm", ["cublas_grouped", "chunked_batched"])
def test_gmm_out_of_memory_in_its_scratch_leaves_out_untouched(pool_limit, stream, algorithm):
    import cupy

    rng = np.random.default_rng(2)
    with stream:
        a_small, b_small, small, ref_small = _gmm_case(rng, [5, 0, 9], k=64, n=32)
        cg.gmm(a_small, b_small, small, algorithm=algorithm)  # small scratch buffers exist now
        many = np.ones(4096, dtype=np.int64) * 3  # 4096 groups: the size and pointer uploads must grow
        many[::7] = 0
        a_many, b_many, _, ref_many = _gmm_case(rng, many, k=64, n=32)
        out = cupy.empty((int(many.sum()), 32), dtype=BF16)
        out.fill(3.0)
        before = cupy.asnumpy(out)
        stream.synchronize()
        pool_limit(4 << 10)
        with pytest.raises(
            GpuOutOfMemoryError, match=r"^gmm with a \[\d+, 64\] bfloat16, b \[4096, 64, 32\]"
        ):
            cg.gmm(a_many, b_many, many, out=out, algorithm=algorithm)
        stream.synchronize()
        assert (cupy.asnumpy(out).view(np.uint16) == before.view(np.uint16)).all()  # not one bit written
        out_small = poisoned((int(small.sum()), 32), BF16)
        cg.gmm(a_small, b_small, small, out=out_small, algorithm=algorithm)
        check_close(out_small, ref_small, TOL, "smaller call under the limit")
    pool_limit(1 << 40)  # room again: the stream's resources were left usable for the large call too
    with stream:
        check_close(cg.gmm(a_many, b_many, many, out=out, algorithm=algorithm), ref_many, TOL, "large call")


def test_moe_forward_out_of_memory_then_a_smaller_call(pool_limit, stream):
    rng = np.random.default_rng(3)
    experts, k, hidden = 8, 2, 256
    with stream:
        # The weights made on the stream that reads them (not the null stream).
        (w1, w2), (w1_64, w2_64) = _layer_weights(rng, experts, hidden)
        x, x64 = device_random(rng, (64, hidden), BF16)
        ids, w, ids_h, w_h = _routing(rng, 64, experts, k)
        cg.moe_forward(x, ids, w, w1, w2, algorithm="cublas_grouped")
        x_big, _ = device_random(rng, (16384, hidden), BF16)  # 32768 rows of 1024: 64 MiB for GEMM 1 alone
        ids_big, w_big, _, _ = _routing(rng, 16384, experts, k)
        pool_limit(8 << 20)
        with pytest.raises(
            GpuOutOfMemoryError, match=r"^moe_forward with x \[16384, 256\] bfloat16, topk_ids "
        ):
            cg.moe_forward(x_big, ids_big, w_big, w1, w2, algorithm="cublas_grouped")
        x2, x2_64 = device_random(rng, (48, hidden), BF16)
        ids2, w2_, ids2_h, w2_h = _routing(rng, 48, experts, k)
        y = cg.moe_forward(x2, ids2, w2_, w1, w2, algorithm="cublas_grouped")
        check_close(y, ref.moe_forward_ref(x2_64, ids2_h, w2_h, w1_64, w2_64), 2e-2, "moe_forward after OOM")


def test_fixed_capacity_construction_out_of_memory_then_a_smaller_layer(pool_limit, stream):
    rng = np.random.default_rng(4)
    experts, k, hidden = 8, 2, 256
    with stream:
        # The weights made on the stream that reads them (not the null stream).
        (w1, w2), (w1_64, w2_64) = _layer_weights(rng, experts, hidden)
        warm = cg.FixedCapacityMoE(w1, w2, k, max_tokens=8)
        x, _ = device_random(rng, (8, hidden), BF16)
        ids, w, _, _ = _routing(rng, 8, experts, k)
        warm.forward(x, ids, w)  # the stream's workspace and the kernels exist now
        stream.synchronize()
        del warm
        pool_limit(8 << 20)
        with pytest.raises(
            GpuOutOfMemoryError,
            match=r"^FixedCapacityMoE with w1 \[8, 256, 1024\] bfloat16, w2 \[8, 512, 256\] bfloat16: "
            r"out of GPU memory allocating [\d,]+ bytes",
        ):
            cg.FixedCapacityMoE(w1, w2, k, max_tokens=16384)
        layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=16)
        x2, x2_64 = device_random(rng, (12, hidden), BF16)
        ids2, w2_, ids2_h, w2_h = _routing(rng, 12, experts, k)
        y = layer.forward(x2, ids2, w2_)
        check_close(
            y, ref.moe_forward_ref(x2_64, ids2_h, w2_h, w1_64, w2_64), 2e-2, "fixed capacity after OOM"
        )
        assert layer.dropped_pairs() == 0


def test_benchmark_out_of_memory_is_reported_per_method_and_the_run_finishes(pool_limit, tmp_path, capsys):
    from cublas_grouped.tools.bench import cli

    argv = ["--experts", "8", "--topk", "2", "--hidden", "256", "--inter", "512", "--tokens", "64"]
    argv += ["--no-torch", "--warmup", "1", "--repeat", "3", "--passes", "1"]
    pool_limit(64 << 10)
    assert cli.main([*argv, "--json", str(tmp_path / "oom.json")]) == 0
    results = json.loads((tmp_path / "oom.json").read_text())["results"]
    errors = [r["error"] for r in results if r["error"]]
    assert errors and any("out of GPU memory allocating" in e for e in errors), errors
    # Every out-of-memory report says how much and where, never CuPy's bare words alone.
    assert not [e for e in errors if "Out of memory allocating" in e and "out of GPU memory" not in e], errors
    pool_limit(1 << 40)
    assert cli.main([*argv, "--json", str(tmp_path / "ok.json")]) == 0
    results = json.loads((tmp_path / "ok.json").read_text())["results"]
    assert [r for r in results if r["ms"] is not None and not r["error"]]
    capsys.readouterr()


# -- failed library calls ------------------------------------------------------------------------------------


def test_invalid_arguments_that_reach_cublas_then_a_correct_call(stream):
    import cupy

    rng = np.random.default_rng(5)
    with stream:
        a, b, sizes, expected = _gmm_case(rng, [40, 0, 24, 64])
        res = resources(cupy.cuda.Device().id, stream.ptr)
        handle = res.bind(32 << 20)
        scratch = cupy.zeros((64, 64), dtype=cupy.float32)
        ptr = scratch.data.ptr
        with pytest.raises(
            _cublas.CublasError, match=r"^cublasGemmEx failed: CUBLAS_STATUS_INVALID_VALUE \(7\)$"
        ):  # lda = 1 < m = 64
            _cublas.gemm_ex(
                handle,
                0,
                0,
                64,
                64,
                64,
                1.0,
                ptr,
                0,
                1,
                ptr,
                0,
                64,
                0.0,
                ptr,
                0,
                64,
                _cublas.ComputeType.C32F,
            )
        out = poisoned((128, 512), BF16)
        cg.gmm(a, b, sizes, out=out, algorithm="cublas_grouped")
        check_close(out, expected, TOL, "after a cuBLAS status error")


@pytest.mark.parametrize(
    "algorithm, symbol", [("sequential", "cublasGemmEx"), ("cublas_grouped", _cublas.GROUPED_SYMBOL)]
)
def test_an_injected_cublas_failure_then_a_correct_call(stream, monkeypatch, algorithm, symbol):
    rng = np.random.default_rng(6)
    real = _cublas._functions[symbol]
    with stream:
        a, b, sizes, expected = _gmm_case(rng, [33, 0, 70, 25])
        monkeypatch.setitem(_cublas._functions, symbol, lambda *args: 13)
        with pytest.raises(
            _cublas.CublasError, match=rf"^{symbol} failed: CUBLAS_STATUS_EXECUTION_FAILED \(13\)$"
        ):
            cg.gmm(a, b, sizes, algorithm=algorithm)
        monkeypatch.setitem(_cublas._functions, symbol, real)
        out = poisoned((128, 512), BF16)
        cg.gmm(a, b, sizes, out=out, algorithm=algorithm)
        check_close(out, expected, TOL, f"{algorithm} after an injected failure")


def test_a_failed_launch_names_the_kernel_then_a_correct_call(stream, monkeypatch):
    import cupy

    rng = np.random.default_rng(7)
    with stream:
        a, b, sizes, expected = _gmm_case(rng, [10, 20, 0, 30])
        monkeypatch.setattr(_pointers, "POINTER_THREADS", 2048)  # past the 1024 threads a block may have
        with pytest.raises(
            cg.KernelLaunchError,
            match=r"^launch of build_pointers \(kernels/pointers\.cu, sm_\d+\) with grid 1, block 2048",
        ):
            # Sizes on the device: the pointers are built by the kernel (host sizes upload them).
            cg.gmm(a, b, cupy.asarray(sizes), algorithm="cublas_grouped")
        monkeypatch.undo()
        out = poisoned((60, 512), BF16)
        cg.gmm(a, b, sizes, out=out, algorithm="cublas_grouped")
        check_close(out, expected, TOL, "after a failed launch")


# -- failed CUDA-graph capture -------------------------------------------------------------------------------


def test_a_capture_broken_by_a_host_copy_leaves_the_stream_usable(capture_stream):
    import cupy

    stream = capture_stream
    rng = np.random.default_rng(8)
    with stream:
        a, b, sizes, expected = _gmm_case(rng, [16, 48, 0, 64])
        sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)
        cg.gmm(a, b, sizes_dev, algorithm="cublas_grouped")  # eager first
        out = poisoned((128, 512), BF16)
        stream.synchronize()
        stream.begin_capture()
        with pytest.raises(Exception) as info:  # cuBLAS needs the sizes on the host: a copy that waits
            cg.gmm(a, b, sizes_dev, out=out, algorithm="cublas_grouped")
        text = f"{type(info.value).__name__}: {info.value}"
        assert "apture" in text or "capturing" in text, text
        try:
            stream.end_capture()  # invalidated by the failed copy (CUDA), or empty (if CuPy refused first)
        except Exception:
            pass
        assert not cupy.cuda.runtime.streamIsCapturing(stream.ptr)
        cg.gmm(a, b, sizes_dev, out=out, algorithm="cublas_grouped")
        check_close(out, expected, TOL, "after a failed capture")


def test_a_cublas_failure_inside_a_capture_then_capture_and_replay_work(capture_stream, monkeypatch):
    import cupy

    stream = capture_stream
    rng = np.random.default_rng(9)
    real = _cublas._functions["cublasGemmEx"]
    calls = {"n": 0}

    def second_fails(*args):
        calls["n"] += 1
        return 13 if calls["n"] == 2 else real(*args)

    with stream:
        a, b, sizes, expected = _gmm_case(rng, [20, 0, 40, 4])
        out = poisoned((64, 512), BF16)
        cg.gmm(a, b, sizes, out=out, algorithm="sequential")  # eager first: workspace, handle
        stream.synchronize()
        monkeypatch.setitem(_cublas._functions, "cublasGemmEx", second_fails)
        stream.begin_capture()
        with pytest.raises(_cublas.CublasError, match="cublasGemmEx failed: CUBLAS_STATUS_EXECUTION_FAILED"):
            cg.gmm(a, b, sizes, out=out, algorithm="sequential")
        try:
            stream.end_capture()  # the partial graph is thrown away
        except Exception:
            pass
        monkeypatch.setitem(_cublas._functions, "cublasGemmEx", real)
        assert not cupy.cuda.runtime.streamIsCapturing(stream.ptr)
        out.fill(np.nan)
        stream.begin_capture()
        cg.gmm(a, b, sizes, out=out, algorithm="sequential")
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        check_close(out, expected, TOL, "graph captured after a failed capture")


# -- interrupted work ----------------------------------------------------------------------------------------


def test_gmm_interrupted_between_plan_and_gemms_then_correct(stream, monkeypatch):
    rng = np.random.default_rng(10)
    with stream:
        a, b, sizes, expected = _gmm_case(rng, [30, 2, 0, 50])

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(_executor._cublas_backend, "run", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cg.gmm(a, b, sizes, algorithm="chunked_batched")
        monkeypatch.undo()
        out = poisoned((82, 512), BF16)
        cg.gmm(a, b, sizes, out=out, algorithm="chunked_batched")
        check_close(out, expected, TOL, "after an interrupted gmm")


@pytest.mark.parametrize("algorithm", ["auto", "chunked_batched"])
def test_moe_forward_interrupted_between_the_gemms_then_correct(stream, monkeypatch, algorithm):
    import cupy

    rng = np.random.default_rng(11)
    experts, k, hidden = 16, 4, 256
    from cublas_grouped.gemm.backends import hopper as _hopper

    calls = {}

    def interrupt_second(real):
        """``real``, raising on its second call: GEMM 2, after the plan, GEMM 1
        and the activation. The layer's GEMMs go through run_expert_gemm, or
        on SM 9.0 under AUTO through the kernel step's grouped_rows."""

        def wrapped(*args, **kwargs):
            calls[real] = calls.get(real, 0) + 1
            if calls[real] == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        return wrapped

    from cublas_grouped.runtime import launch as _launch

    def interrupt_second_gemm(real_launch):
        # On SM 9.0 the kernel step replays prepared launches (FixedLaunch),
        # plain or overlapped (small steps): the second GEMM's launch raises,
        # after GEMM 1 and the activation.
        def launch(self, *args):
            if self.label.startswith("grouped_gemm_"):
                calls["gemm"] = calls.get("gemm", 0) + 1
                if calls["gemm"] == 2:
                    raise KeyboardInterrupt
            return real_launch(self, *args)

        return launch

    with stream:
        # The weights made on the stream that reads them (not the null stream).
        (w1, w2), (w1_64, w2_64) = _layer_weights(rng, experts, hidden)
        x, x64 = device_random(rng, (100, hidden), BF16)
        ids, w, ids_h, w_h = _routing(rng, 100, experts, k)
        monkeypatch.setattr(_layer, "run_expert_gemm", interrupt_second(_layer.run_expert_gemm))
        monkeypatch.setattr(_hopper, "grouped_rows", interrupt_second(_hopper.grouped_rows))
        for name in ("__call__", "launch_overlapped"):
            real_launch = getattr(_launch.FixedLaunch, name)
            monkeypatch.setattr(_launch.FixedLaunch, name, interrupt_second_gemm(real_launch))
        with pytest.raises(KeyboardInterrupt):
            cg.moe_forward(x, ids, w, w1, w2, algorithm=algorithm)
        monkeypatch.undo()
        y = cg.moe_forward(x, ids, w, w1, w2, algorithm=algorithm)
        check_close(y, ref.moe_forward_ref(x64, ids_h, w_h, w1_64, w2_64), 2e-2, "after an interrupted layer")
        again = cg.moe_forward(x, ids, w, w1, w2, algorithm=algorithm)
        assert (cupy.asnumpy(again).view(np.uint16) == cupy.asnumpy(y).view(np.uint16)).all()


def test_fixed_capacity_step_interrupted_then_correct(stream, monkeypatch):
    rng = np.random.default_rng(12)
    experts, k, hidden = 8, 2, 256
    real = _fixed.batched
    calls = {"n": 0}

    def second_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _cublas.CublasError(13, "cublasGemmBatchedEx")
        return real(*args, **kwargs)

    # The chunked cuBLAS step (forced: AUTO takes the kernel step on SM 9.0 here).
    chunked = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="cublas_grouped"))
    with stream:
        # The weights made on the stream that reads them (not the null stream).
        (w1, w2), (w1_64, w2_64) = _layer_weights(rng, experts, hidden)
        layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=32, executor=chunked)
        x, x64 = device_random(rng, (20, hidden), BF16)
        ids, w, ids_h, w_h = _routing(rng, 20, experts, k)
        monkeypatch.setattr(_fixed, "batched", second_fails)
        with pytest.raises(_cublas.CublasError, match="cublasGemmBatchedEx failed"):
            layer.forward(x, ids, w)
        monkeypatch.undo()
        y = layer.forward(x, ids, w)
        check_close(y, ref.moe_forward_ref(x64, ids_h, w_h, w1_64, w2_64), 2e-2, "after a failed step")
        assert layer.dropped_pairs() == 0
