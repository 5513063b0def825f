"""gmm_masked on the CPU: every bad argument is refused before any GPU work
(fake arrays), and which back end each product gets."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cublas_grouped import Algorithm, gmm_masked
from cublas_grouped.gemm.masked import masked_backend

BF16 = ml_dtypes.bfloat16


@pytest.mark.parametrize(
    "a_shape, b_shape, counts, kwargs, match",
    [
        ((4, 8), (2, 8, 16), [1, 1], {}, r"a must be a C-contiguous \[E, C, K\] array; got shape \(4, 8\)"),
        ((2, 4, 8), (3, 8, 16), [1, 1], {}, r"b must be a C-contiguous \[E, K, N\] array .* with E=2"),
        ((2, 4, 8), (2, 9, 16), [1, 1], {}, r"b's K \(9\) must equal a's K \(8\)"),
        ((2, 4, 8), (2, 16, 9), [1, 1], {"trans_b": True}, r"b's K \(9\) must equal a's K \(8\)"),
        ((2, 4, 8), (2, 8, 16), [1, 1, 1], {}, r"counts must be 2 integers; got int64 \(3,\)"),
        ((2, 4, 8), (2, 8, 16), [1.0, 2.0], {}, r"counts must be 2 integers; got float64"),
        ((2, 4, 8), (2, 8, 16), [1, 1], {"algorithm": "fastest"}, r"algorithm"),
    ],
)
def test_bad_arguments(fake, a_shape, b_shape, counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gmm_masked(fake(a_shape, BF16), fake(b_shape, BF16), counts, **kwargs)


def test_bad_out_dtype_device_and_counts_array(fake):
    a, b = fake((2, 4, 8), BF16), fake((2, 8, 16), BF16)
    with pytest.raises(ValueError, match=r"out must be a C-contiguous bfloat16 \[2, 4, 16\] array"):
        gmm_masked(a, b, [1, 1], out=fake((2, 4, 8), BF16))
    with pytest.raises(ValueError, match=r"out must be a C-contiguous bfloat16"):
        gmm_masked(a, b, [1, 1], out=fake((2, 4, 16), np.float16))
    with pytest.raises(ValueError, match="out is on device 1 but a on 0"):
        gmm_masked(a, b, [1, 1], out=fake((2, 4, 16), BF16, device=1))
    with pytest.raises(ValueError, match="b must have a's dtype bfloat16; got float16"):
        gmm_masked(a, fake((2, 8, 16), np.float16), [1, 1])
    with pytest.raises(ValueError, match=r"counts must be a 1-D integer array of 2; got float32"):
        gmm_masked(a, b, fake((2,), np.float32))
    with pytest.raises(ValueError, match="counts is on device 1 but a on 0"):
        gmm_masked(a, b, fake((2,), np.int32, device=1))
    with pytest.raises(ValueError, match=r"E \* C = 2147483648 rows"):
        gmm_masked(fake((2, 2**30, 8), BF16), b, [1, 1])
    with pytest.raises(TypeError, match="a has dtype int8; supported"):
        gmm_masked(fake((2, 4, 8), np.int8), b, [1, 1])


def test_backend_choice():
    ok = (256, 512, 1024)
    assert masked_backend((9, 0), BF16, 64, 128, ok, Algorithm.AUTO) == "sm90_grouped"
    assert masked_backend((9, 0), np.float16, 64, 128, ok, Algorithm.SM90_GROUPED) == "sm90_grouped"
    assert masked_backend((8, 0), BF16, 64, 128, ok, Algorithm.AUTO) == "grouped_all_rows"
    assert masked_backend((9, 0), np.float32, 64, 128, ok, Algorithm.AUTO) == "grouped_all_rows"
    assert masked_backend((9, 0), BF16, 60, 128, ok, Algorithm.AUTO) == "grouped_all_rows"  # N % 8
    assert masked_backend((9, 0), BF16, 64, 128, (256, 514, 1024), Algorithm.AUTO) == "grouped_all_rows"
    assert masked_backend((9, 0), BF16, 64, 128, ok, Algorithm.CUBLAS_GROUPED) == "grouped_all_rows"
