"""Two GPUs in one process: work on device 1 after device 0 was used plans with
device 1's capabilities and gives correct results (float64 references)."""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest
from gpu_util import TOLERANCE, check_close, device_random, poisoned, random_sizes

import cublas_grouped as cg
from cublas_grouped.testing import gmm_ref, moe_forward_ref, route_ref


def _device_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_device_count() < 2, reason="needs two GPUs")]

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _gmm_case(rng, dtype, num_groups=16, k=96, n=80):
    sizes = random_sizes(rng, num_groups, 700)
    a, a64 = device_random(rng, (int(sizes.sum()), k), dtype)
    b, b64 = device_random(rng, (num_groups, k, n), dtype)
    return sizes, a, b, gmm_ref(a64, b64, sizes)


def _layer_case(rng, dtype, tokens=200, experts=16, k=2, hidden=128, inter=64):
    import cupy

    ids = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w = rng.random((tokens, k)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    x, x64 = device_random(rng, (tokens, hidden), dtype)
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), dtype, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), dtype, scale=inter**-0.5)
    expected = moe_forward_ref(x64, ids, w.astype(np.float64), w1_64, w2_64)
    return (x, cupy.asarray(ids), cupy.asarray(w), w1, w2), expected


def test_device_info_follows_the_current_device():
    import cupy

    for device_id in (0, 1, 0):
        with cupy.cuda.Device(device_id):
            info = cg.device_info()
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        assert info.device_id == device_id
        assert info.sm == (props["major"], props["minor"])
    from cublas_grouped.gemm.gmm import shared_executor

    shared = shared_executor(cg.ComputePrecision.FP32, cg.Algorithm.AUTO)
    assert [shared.info_for(d).device_id for d in (0, 1)] == [0, 1]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("algorithm", ["auto", "cublas_grouped", "sequential", "chunked_batched"])
def test_gmm_on_device_1_after_device_0(dtype_name, algorithm):
    import cupy

    rng = np.random.default_rng(zlib.crc32(f"gmm {dtype_name} {algorithm}".encode()))
    dtype, tol = DTYPES[dtype_name], TOLERANCE[dtype_name]
    for device_id in (0, 1):
        with cupy.cuda.Device(device_id):
            sizes, a, b, ref = _gmm_case(rng, dtype)
            out = poisoned(ref.shape, dtype)
            assert cg.gmm(a, b, sizes, out=out, algorithm=algorithm) is out
            check_close(out, ref, tol, f"gmm on device {device_id}")
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:  # the output and the sizes are ready on the stream that reads them
                out = poisoned(ref.shape, dtype)
                sizes_dev = cupy.asarray(sizes)
            cg.gmm(a, b, sizes_dev, out=out, algorithm=algorithm, stream=stream)
            stream.synchronize()
            check_close(out, ref, tol, f"gmm on device {device_id}, own stream, device sizes")
    # Arrays on device 1 while device 0 is current, with a stream of its own:
    # the work goes to device 1 and its current stream.
    with cupy.cuda.Device(1):
        sizes, a, b, ref = _gmm_case(rng, dtype)
    with cupy.cuda.Device(0), cupy.cuda.Stream(non_blocking=True):
        result = cg.gmm(a, b, sizes, algorithm=algorithm)
        assert result.device.id == 1
    with cupy.cuda.Device(1):
        cupy.cuda.get_current_stream().synchronize()
        check_close(result, ref, tol, "gmm on device 1 from device 0")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(
    "algorithm", ["auto", "cublas_grouped", "chunked_batched", "padded_strided", "fixed_capacity"]
)
def test_moe_forward_on_device_1_after_device_0(dtype_name, algorithm):
    import cupy

    rng = np.random.default_rng(zlib.crc32(f"moe {dtype_name} {algorithm}".encode()))
    dtype = DTYPES[dtype_name]
    tol = 1e-5 if dtype_name == "float32" else 2e-2
    kwargs = {"fixed_capacity": True} if algorithm == "fixed_capacity" else {"algorithm": algorithm}
    for device_id in (0, 1):
        with cupy.cuda.Device(device_id):
            (x, ids, w, w1, w2), expected = _layer_case(rng, dtype)
            out = cg.moe_forward(x, ids, w, w1, w2, **kwargs)
            assert out.device.id == device_id
            check_close(out, expected, tol, f"moe_forward {algorithm} on device {device_id}")


def test_step_by_step_and_mlp_on_device_1_after_device_0():
    import cupy

    rng = np.random.default_rng(8)
    for device_id in (0, 1):
        with cupy.cuda.Device(device_id):
            (x, ids, w, w1, w2), _ = _layer_case(rng, np.float32)
            inp = cg.prepare_input(x, (w, ids), 16, algorithm="auto")
            h = cg.expert_gemm(inp, w1)
            rows64 = cupy.asnumpy(inp.rows).astype(np.float64)
            r2p = cupy.asnumpy(inp.row_to_pair)
            real = r2p >= 0
            experts = cupy.asnumpy(ids).reshape(-1)[r2p[real]]
            expected = np.einsum("rk,rkn->rn", rows64[real], cupy.asnumpy(w1).astype(np.float64)[experts])
            check_close(cupy.asnumpy(h)[real], expected, 1e-5, f"expert_gemm on device {device_id}")
            router, router64 = device_random(rng, (x.shape[1], 16), np.float32)
            mlp = cg.MoEMLP(router, w1, w2, 2)
            out = mlp(x)
            w_ref, ids_ref = route_ref(cupy.asnumpy(x).astype(np.float64) @ router64, 2)
            ref = moe_forward_ref(cupy.asnumpy(x), ids_ref, w_ref, cupy.asnumpy(w1), cupy.asnumpy(w2))
            check_close(out, ref, 1e-5, f"MoEMLP on device {device_id}")
