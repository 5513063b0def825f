"""gmm with K = 0 or N = 0 plans an all-zero or empty result, not a cuBLAS call (CPU, fake arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from cublas_grouped import DeviceInfo, GroupedGemmExecutor
from cublas_grouped.gemm import executor as _executor
from cublas_grouped.gemm.plan import plan_gmm
from cublas_grouped.runtime.arrays import view


def _plan(fake, a_shape, b_shape, sizes, **kwargs):
    kwargs.setdefault("trans_a", False)
    kwargs.setdefault("trans_b", False)
    return plan_gmm(view(fake(a_shape), "a"), view(fake(b_shape), "b"), np.array(sizes), **kwargs)


@pytest.mark.parametrize("trans_b", [False, True])
def test_k_zero_is_a_zero_product(fake, trans_b):
    plan = _plan(fake, (5, 0), (3, 16, 0) if trans_b else (3, 0, 16), [2, 0, 3], trans_b=trans_b)
    assert plan.zero_product and plan.out_shape == (5, 16)


def test_k_zero_with_trans_a_is_an_empty_output(fake):
    plan = _plan(fake, (5, 0), (5, 16), [2, 0, 3], trans_a=True, num_experts=3)
    assert not plan.zero_product and plan.out_shape == (3, 0, 16)


def test_n_zero_is_an_empty_output(fake):
    plan = _plan(fake, (5, 8), (3, 8, 0), [2, 0, 3])
    assert not plan.zero_product and plan.out_shape == (5, 0)
    plan = _plan(fake, (5, 8), (5, 0), [2, 0, 3], trans_a=True, num_experts=3)
    assert plan.out_shape == (3, 8, 0)


def test_empty_slice_is_accepted_despite_its_strides(fake):
    # a[:, :0] of a [5, 8] float32 array keeps the parent's row stride; it has
    # no elements to lay out. A non-empty array with such strides is refused.
    sliced = plan_gmm(
        view(fake((5, 0), strides=(32, 4)), "a"),
        view(fake((3, 0, 16), strides=(64, 64, 4)), "b"),
        np.array([2, 0, 3]),
        trans_a=False,
        trans_b=False,
    )
    assert sliced.zero_product and sliced.out_shape == (5, 16)
    with pytest.raises(ValueError, match="a must be C-contiguous"):
        plan_gmm(
            view(fake((5, 4), strides=(32, 4)), "a"),
            view(fake((3, 4, 16)), "b"),
            np.array([2, 0, 3]),
            trans_a=False,
            trans_b=False,
        )


def test_k_zero_passes_every_check(fake, monkeypatch):
    class Stop(Exception):
        pass

    def resources(device_id, stream):
        raise Stop

    monkeypatch.setattr(_executor, "resources", resources)
    executor = GroupedGemmExecutor(device=0, device_info=DeviceInfo(sm=(9, 0), cublas_version=130100))
    with pytest.raises(Stop):
        executor.execute(fake((5, 0)), fake((3, 0, 16)), [2, 0, 3], out=fake((5, 16)), stream=7)
    with pytest.raises(ValueError, match=r"out must have shape \(5, 16\); got \(5, 0\)"):
        executor.execute(fake((5, 0)), fake((3, 0, 16)), [2, 0, 3], out=fake((5, 0)), stream=7)
