"""AUTO measuring on first sight, on the GPU: it times the candidates, stores them,
never writes the caller's output, never measures inside a graph capture, and the
results stay right. Each test starts with no tables at all (empty user and
shipped folders), so every shape is new."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import TOLERANCE, check_close, device_random, poisoned, random_sizes, wait_for_current_stream
from tuning_util import isolate_tuning

import cublas_grouped as cg
from cublas_grouped import Algorithm, TuningTable
from cublas_grouped import testing as ref
from cublas_grouped.gemm import autotune as at

pytestmark = pytest.mark.gpu


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """No table anywhere, measuring on; returns the file AUTO stores measurements in."""
    isolate_tuning(tmp_path, monkeypatch)
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "1")
    return at.autotune_path(cg.device_info())


def stored(path, layout):
    if not path.exists():
        return []
    return [e for e in TuningTable.load(path).entries if e["layout"] == layout]


def test_gmm_measures_once_stores_and_stays_right(fresh):
    rng = np.random.default_rng(3)
    sizes = random_sizes(rng, 64, 64 * 96)
    total, k, n = int(sizes.sum()), 256, 192
    a, a64 = device_random(rng, (total, k), ml_dtypes.bfloat16)
    b, b64 = device_random(rng, (64, k, n), ml_dtypes.bfloat16)
    out = cg.gmm(a, b, sizes, out=poisoned((total, n), ml_dtypes.bfloat16))
    check_close(out, ref.gmm_ref(a64, b64, sizes), TOLERANCE["bfloat16"], "gmm after measuring")
    entries = stored(fresh, "gmm")
    assert len(entries) == 1
    times = entries[0]["times_ms"]
    # Our Hopper kernel is a candidate where it can run (SM 9.0, bf16, K and N multiples of 8).
    own = {"sm90_grouped"} if cg.device_info().sm == (9, 0) else set()
    assert set(times) == {"cublas_grouped", "sequential", "chunked_batched"} | own
    assert all(0 < t < 1000 for t in times.values())
    # The same shape class again: no new measurement, same result.
    out2 = cg.gmm(a, b, sizes)
    check_close(out2, ref.gmm_ref(a64, b64, sizes), TOLERANCE["bfloat16"], "gmm measured shape")
    assert len(stored(fresh, "gmm")) == 1
    assert "1 shape classes stored" in "\n".join(at.describe_auto(cg.device_info()))


def test_measuring_never_writes_the_callers_output(fresh):
    import cupy

    from cublas_grouped.gemm.executor import GroupedGemmExecutor
    from cublas_grouped.gemm.plan import Operands, plan_gmm
    from cublas_grouped.runtime.arrays import view
    from cublas_grouped.runtime.device import resolve_stream, resources

    rng = np.random.default_rng(5)
    sizes = np.array([40, 0, 300, 7, 129, 64], dtype=np.int64)
    total, k, n = int(sizes.sum()), 128, 96
    a, _ = device_random(rng, (total, k), np.float32)
    b, _ = device_random(rng, (6, k, n), np.float32)
    out = poisoned((total, n), np.float32)
    a_v, b_v, out_v = view(a, "a"), view(b, "b"), view(out, "out")
    plan = plan_gmm(a_v, b_v, sizes, trans_a=False, trans_b=False)
    executor = GroupedGemmExecutor()
    res = resources(a_v.device, resolve_stream(None))
    ops = Operands.for_plan(plan, a_v.ptr, b_v.ptr, out_v.ptr, a_v.itemsize)
    with res.cupy_stream:
        chosen = at.gmm_algorithm(executor, cg.device_info(), plan, ops, a_v.dtype, res)
    res.cupy_stream.synchronize()
    assert chosen in (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL, Algorithm.CHUNKED_BATCHED)
    assert len(stored(fresh, "gmm-fp32")) == 1  # it did measure
    assert bool(cupy.isnan(out).all())  # and wrote nothing into out


def test_layer_measures_both_gemms_and_stays_right(fresh):
    import cupy

    rng = np.random.default_rng(11)
    # GEMM 1 is N=1024, K=256 and GEMM 2 N=256, K=512: far enough apart (log2
    # distance 2^2 + 1^2 = 5 > MAX_TABLE_DISTANCE) to be two shape classes.
    tokens, experts, k, hidden, inter = 512, 16, 2, 256, 512
    ids_h = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w_h = rng.random((tokens, k)).astype(np.float32)
    x, x64 = device_random(rng, (tokens, hidden), np.float32)
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), np.float32, 1 / 16)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), np.float32, inter**-0.5)
    out = cg.moe_forward(x, cupy.asarray(ids_h), cupy.asarray(w_h), w1, w2)
    check_close(out, ref.moe_forward_ref(x64, ids_h, w_h, w1_64, w2_64), 1e-5, "layer after measuring")
    shapes = {(e["n"], e["k"]) for e in stored(fresh, "layer-fp32")}
    assert shapes == {(2 * inter, hidden), (hidden, inter)}
    for e in stored(fresh, "layer-fp32"):
        assert {"cublas_grouped", "sequential", "chunked_batched"} <= set(e["times_ms"])
    cg.moe_forward(x, cupy.asarray(ids_h), cupy.asarray(w_h), w1, w2)
    assert len(stored(fresh, "layer-fp32")) == 2  # measured once


def test_no_measuring_inside_graph_capture(fresh):
    import cupy

    rng = np.random.default_rng(8)
    # Few large groups: the rules pick SEQUENTIAL (plain cublasGemmEx calls, capturable).
    sizes = np.array([600, 0, 700, 520], dtype=np.int64)
    total, k, n = int(sizes.sum()), 64, 48
    a, a64 = device_random(rng, (total, k), np.float32)
    b, b64 = device_random(rng, (4, k, n), np.float32)
    out = cupy.zeros((total, n), dtype=np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # a, b and out's zeros were made on the null stream
    executor = cg.GroupedGemmExecutor()
    with stream:
        # The cuBLAS handle and workspace of this stream, made outside the capture.
        executor.execute(a, b, sizes, out=out, algorithm="sequential", stream=stream)
        stream.synchronize()
        stream.begin_capture()
        executor.execute(a, b, sizes, out=out, stream=stream)  # AUTO: rules, nothing timed
        graph = stream.end_capture()
    assert stored(fresh, "gmm-fp32") == []
    # Cleared on the graph's stream: a fill on the null stream could land after the replay's writes.
    with stream:
        out.fill(0)
    graph.launch(stream)
    stream.synchronize()
    check_close(out, ref.gmm_ref(a64, b64, sizes), TOLERANCE["float32"], "captured AUTO")
    executor.execute(a, b, sizes, out=out, stream=stream)  # outside the capture: measured
    stream.synchronize()
    assert len(stored(fresh, "gmm-fp32")) == 1


def test_switched_off_measures_nothing(fresh, monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    rng = np.random.default_rng(1)
    sizes = np.array([10, 20, 30], dtype=np.int64)
    a, a64 = device_random(rng, (60, 32), np.float32)
    b, b64 = device_random(rng, (3, 32, 16), np.float32)
    out = cg.gmm(a, b, sizes)
    check_close(out, ref.gmm_ref(a64, b64, sizes), TOLERANCE["float32"], "AUTO off")
    assert not fresh.exists()


def test_time_candidates_on_a_stream():
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:  # made on the stream whose products read it
        x = cupy.ones((2048, 2048), dtype=cupy.float32)
    work = {Algorithm.SEQUENTIAL: 1, Algorithm.CUBLAS_GROUPED: 8}

    def run(algorithm):
        with stream:
            for _ in range(work[algorithm]):
                x @ x

    times = at.time_candidates(tuple(work), run, stream)
    assert 0 < times[Algorithm.SEQUENTIAL] < times[Algorithm.CUBLAS_GROUPED]


def test_auto_runs_the_hopper_kernel_where_a_table_measured_it_fastest(tmp_path, monkeypatch):
    """A user table that times SM90_GROUPED fastest (past the margin) for this
    shape: gmm under AUTO runs our kernel (on SM 9.0; a cuBLAS algorithm
    elsewhere) and the result is right; with the kernel's time above the
    others' it runs cuBLAS."""
    from tuning_util import entry, write_table

    from cublas_grouped.gemm import select as _select
    from cublas_grouped.gemm.backends import hopper, hopper_device
    from cublas_grouped.gemm.tables import tuning_table_path

    user, _ = isolate_tuning(tmp_path, monkeypatch)
    info = cg.device_info()
    rng = np.random.default_rng(4)
    sizes = random_sizes(rng, 16, 16 * 200)
    total, k, n = int(sizes.sum()), 512, 384
    a, a64 = device_random(rng, (total, k), ml_dtypes.bfloat16)
    b, b64 = device_random(rng, (16, k, n), ml_dtypes.bfloat16, scale=k**-0.5)
    ran = []
    real = hopper.grouped_contiguous
    monkeypatch.setattr(hopper, "grouped_contiguous", lambda *x, **kw: (ran.append(1), real(*x, **kw)))
    # A repeated call with host sizes replays a prepared launch instead (the
    # sizes uploaded once per call-cache entry): spy on those too.
    for prepared in (hopper_device.PreparedHostSizes, hopper_device.PreparedDeviceSizes):
        monkeypatch.setattr(
            prepared, "__call__", lambda self, *x, real=prepared.__call__: (ran.append(1), real(self, *x))
        )
    active = int(np.count_nonzero(sizes))
    shape = dict(n=n, k=k, experts=16, active=active, mean_rows=total / active, max_rows=int(sizes.max()))
    for sm90_ms, want in ((0.5, info.sm == (9, 0)), (5.0, False)):
        times = {"cublas_grouped": 1.0, "sequential": 2.0, "chunked_batched": 1.5, "sm90_grouped": sm90_ms}
        write_table(
            user,
            tuning_table_path(info).name,
            info.name,
            info.cublas_version,
            [entry(times=times, **shape)],
            info.sm,
        )
        _select.reset_tuning_cache()  # the table changed: forget tables and remembered choices
        ran.clear()
        out = cg.gmm(a, b, sizes, out=poisoned((total, n), ml_dtypes.bfloat16))
        check_close(out, ref.gmm_ref(a64, b64, sizes), TOLERANCE["bfloat16"], f"AUTO, sm90 at {sm90_ms} ms")
        assert bool(ran) == want, (sm90_ms, ran)
