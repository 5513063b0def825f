"""Every bad argument to gmm is refused before any GPU work (CPU, fake arrays)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cublas_grouped import DeviceInfo, GroupedGemmConfig, GroupedGemmExecutor, gmm

H100 = DeviceInfo(sm=(9, 0), cublas_version=130100, name="fake H100")


@pytest.fixture
def executor():
    return GroupedGemmExecutor(device=0, device_info=H100)


def test_host_array_refused(fake, executor):
    with pytest.raises(TypeError, match="a is a NumPy array in host memory"):
        executor.execute(np.zeros((4, 8), np.float32), fake((2, 8, 16)), [2, 2])
    with pytest.raises(TypeError, match="b is a NumPy array in host memory"):
        executor.execute(fake((4, 8)), np.zeros((2, 8, 16), np.float32), [2, 2])


def test_not_an_array(executor, fake):
    with pytest.raises(TypeError, match="a must be a GPU array exposing __cuda_array_interface__"):
        executor.execute([[1.0]], fake((2, 8, 16)), [1, 0])


@pytest.mark.parametrize(
    "a_shape, b_shape, sizes, kwargs, error, match",
    [
        ((4, 8, 1), (2, 8, 16), [2, 2], {}, ValueError, r"a must be 2-D; got shape \(4, 8, 1\)"),
        ((4, 8), (8, 16), [2, 2], {}, ValueError, r"b must be 3-D; got shape \(8, 16\)"),
        ((4, 8), (2, 9, 16), [2, 2], {}, ValueError, r"K mismatch: a is \(4, 8\) \(K=8\) but b \[E, K, N\]"),
        ((4, 8), (2, 16, 9), [2, 2], {"trans_b": True}, ValueError, r"K mismatch: .* b \[E, N, K\]"),
        ((4, 8), (2, 8, 16), [2, 1], {}, ValueError, r"sum\(group_sizes\) = 3 but a has 4 rows"),
        ((4, 8), (2, 8, 16), [5, -1], {}, ValueError, r"non-negative; group_sizes\[1\] = -1"),
        ((4, 8), (2, 8, 16), [4], {}, ValueError, "group_sizes has 1 entries but b has 2 groups"),
        ((4, 8), (2, 8, 16), [[2, 2]], {}, ValueError, "group_sizes must be 1-D"),
        ((4, 8), (2, 8, 16), [2.0, 2.0], {}, TypeError, "group_sizes must hold integers"),
        ((4, 8), (4, 16), [2, 2], {"trans_a": True, "trans_b": True}, ValueError, "cannot both be set"),
        ((4, 8), (5, 16), [2, 2], {"trans_a": True}, ValueError, "same rows"),
    ],
)
def test_shape_errors(fake, executor, a_shape, b_shape, sizes, kwargs, error, match):
    with pytest.raises(error, match=match):
        executor.execute(fake(a_shape), fake(b_shape), sizes, **kwargs)


def test_dtype_mismatch_and_unsupported(fake, executor):
    with pytest.raises(TypeError, match="a and b must have the same dtype; got float32 and float16"):
        executor.execute(fake((4, 8)), fake((2, 8, 16), np.float16), [2, 2])
    with pytest.raises(TypeError, match="a has dtype float64; supported: float32, float16, bfloat16"):
        executor.execute(fake((4, 8), np.float64), fake((2, 8, 16), np.float64), [2, 2])


def test_non_contiguous_and_misaligned(fake, executor):
    strided = fake((4, 8), strides=(64, 8))  # every other column
    with pytest.raises(ValueError, match="a must be C-contiguous"):
        executor.execute(strided, fake((2, 8, 16)), [2, 2])
    with pytest.raises(ValueError, match="b is misaligned: address 0x7f0000000002"):
        executor.execute(fake((4, 8)), fake((2, 8, 16), ptr=0x7F0000000002), [2, 2])


def test_device_mismatch(fake, executor):
    with pytest.raises(ValueError, match="a is on device 0 but b is on device 1"):
        executor.execute(fake((4, 8)), fake((2, 8, 16), device=1), [2, 2])


def test_out_checks(fake, executor):
    a, b = fake((4, 8)), fake((2, 8, 16))
    with pytest.raises(ValueError, match=r"out must have shape \(4, 16\); got \(4, 15\)"):
        executor.execute(a, b, [2, 2], out=fake((4, 15)))
    with pytest.raises(TypeError, match="out must have dtype float32; got float16"):
        executor.execute(a, b, [2, 2], out=fake((4, 16), np.float16))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        executor.execute(a, b, [2, 2], out=fake((4, 16), strides=(4, 64)))
    with pytest.raises(ValueError, match="out is on device 1 but a is on device 0"):
        executor.execute(a, b, [2, 2], out=fake((4, 16), device=1))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 8, 16\)"):
        executor.execute(a, fake((4, 16)), [2, 2], trans_a=True, out=fake((4, 16)))


def test_bfloat16_needs_sm80(fake):
    turing = GroupedGemmExecutor(device=0, device_info=DeviceInfo(sm=(7, 5), cublas_version=120900))
    bf16 = ml_dtypes.bfloat16
    with pytest.raises(ValueError, match=r"bfloat16 needs SM 8.0 or newer; device 0 is SM 7.5"):
        turing.execute(fake((4, 8), bf16), fake((2, 8, 16), bf16), [2, 2])


def test_padded_algorithms_refused_on_packed_rows(fake, executor):
    with pytest.raises(ValueError, match="PADDED_STRIDED needs the padded row layout"):
        executor.execute(fake((4, 8)), fake((2, 8, 16)), [2, 2], algorithm="padded_strided")
    with pytest.raises(ValueError, match="CHUNKED_BATCHED cannot run with trans_a"):
        executor.execute(fake((4, 8)), fake((4, 16)), [2, 2], trans_a=True, algorithm="chunked_batched")


def test_functional_gmm_checks_before_gpu(fake):
    with pytest.raises(ValueError, match="K mismatch"):
        gmm(fake((4, 8)), fake((2, 9, 16)), [2, 2])
    with pytest.raises(ValueError, match="compute must be one of FP32, TF32, FP16, BF16; got .fp64."):
        gmm(fake((4, 8)), fake((2, 8, 16)), [2, 2], compute="fp64")


def test_config_errors():
    with pytest.raises(ValueError, match="algorithm must be one of AUTO, CUBLAS_GROUPED"):
        GroupedGemmConfig(algorithm="fastest")
    with pytest.raises(ValueError, match="workspace_mb must be a non-negative int"):
        GroupedGemmConfig(workspace_mb=-1)
    with pytest.raises(ValueError, match="compute_precision=TF32 needs use_tensor_cores=True"):
        GroupedGemmConfig(compute_precision="tf32", use_tensor_cores=False)
    with pytest.raises(ValueError, match=r"config has unknown keys \['speed'\]"):
        GroupedGemmConfig.coerce({"speed": 1})
    assert GroupedGemmConfig.coerce({"algorithm": "sequential"}).algorithm.name == "SEQUENTIAL"
    with pytest.raises(TypeError, match="device must be an int ordinal"):
        GroupedGemmExecutor(device="cuda:0")
