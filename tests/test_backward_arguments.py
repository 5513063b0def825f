"""The backward's arguments are refused before any GPU work, and its choices
made on the host (CPU, fake arrays and a faked device)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import cublas_grouped as cg
from cublas_grouped.moe.backward import MoEContext
from cublas_grouped.moe.checks import LayerShape
from cublas_grouped.moe.mlp_backward import MLPContext, mlp_backward
from cublas_grouped.runtime.device import DeviceInfo

T, H, E, K, INTER = 6, 16, 4, 2, 8
H100 = DeviceInfo(sm=(9, 0), cublas_version=130100, name="fake H100")


@pytest.fixture
def layer(fake):
    return (
        fake((T, H)),
        fake((T, K), np.int32),
        fake((T, K), np.float32),
        fake((E, H, 2 * INTER)),
        fake((E, INTER, H)),
    )


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"return_context": 1}, TypeError, "return_context must be a bool; got int"),
        ({"return_context": True, "recompute": "yes"}, TypeError, "recompute must be a bool; got str"),
        ({"recompute": True}, ValueError, "recompute applies only with return_context=True"),
        (
            {"return_context": True, "fixed_capacity": True},
            ValueError,
            "return_context needs fixed_capacity=False",
        ),
    ],
)
def test_context_options_are_checked(layer, options, error, match):
    with pytest.raises(error, match=match):
        cg.moe_forward(*layer, **options)


def test_layer_checks_come_first_with_return_context(layer, fake):
    x, ids, w, w1, _ = layer
    with pytest.raises(ValueError, match="w2 has 5 experts; expected 4"):
        cg.moe_forward(x, ids, w, w1, fake((E + 1, INTER, H)), return_context=True)


def _context(dtype=np.float32, device=0):
    shape = LayerShape(E, H, INTER, 2 * INTER, K, True, "silu", False, np.dtype(dtype))
    plan = SimpleNamespace(num_tokens=T)
    return MoEContext(shape, plan, None, (None,) * 4, None, None, device)


@pytest.mark.parametrize(
    "dy, error, match",
    [
        (((T, H + 1), np.float32), ValueError, r"dy must have the output's shape \(6, 16\); got \(6, 17\)"),
        (((T + 1, H), np.float32), ValueError, r"dy must have the output's shape \(6, 16\); got \(7, 16\)"),
        (((T, H), np.float16), TypeError, "dy must have dtype float32 like the forward's x; got float16"),
    ],
)
def test_moe_backward_refuses_bad_dy(fake, dy, error, match):
    with pytest.raises(error, match=match):
        cg.moe_backward(_context(), fake(*dy))


def test_moe_backward_refuses_strided_dy_other_device_and_other_contexts(fake):
    strided = fake((T, H), np.float32, strides=(4 * 2 * H, 4))
    with pytest.raises(ValueError, match="dy must be C-contiguous"):
        cg.moe_backward(_context(), strided)
    with pytest.raises(ValueError, match="dy is on device 1 but the forward ran on device 0"):
        cg.moe_backward(_context(), fake((T, H), np.float32, device=1))
    with pytest.raises(TypeError, match="ctx must be the MoEContext of moe_forward"):
        cg.moe_backward(object(), fake((T, H)))
    with pytest.raises(TypeError, match="dy is a NumPy array in host memory"):
        cg.moe_backward(_context(), np.zeros((T, H), np.float32))
    with pytest.raises(TypeError, match=r"ctx must be the context of MoEMLP\(..., return_context=True\)"):
        mlp_backward(None, _context(), fake((T, H)))


def test_context_saved_bytes_counts_h_and_the_indices(fake):
    ints = SimpleNamespace(nbytes=40)
    plan = SimpleNamespace(
        num_tokens=T, pair_to_row=ints, row_to_pair=ints, tokens_per_expert=ints, expert_offsets=ints
    )
    ctx = MoEContext(_context().shape, plan, None, (None,) * 4, SimpleNamespace(nbytes=1000), None, 0)
    assert ctx.saved_bytes == 1160 and not ctx.recompute
    ctx.h = None
    assert ctx.saved_bytes == 160 and ctx.recompute


def test_public_names():
    for name in ("moe_backward", "MoEContext", "MoEGradients", "MLPGradients"):
        assert name in cg.__all__ and hasattr(cg, name)
    assert MLPContext.__doc__


def test_train_example_without_gpu_exits_with_a_message():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import HAS_GPU

    if HAS_GPU:
        pytest.skip("a GPU is present")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "train_moe.py"), "--steps", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=120,
    )
    assert result.returncode != 0
    assert "This example needs an NVIDIA GPU" in result.stderr and "Traceback" not in result.stderr


def test_mlp_recompute_needs_return_context(fake):
    mlp = cg.MoEMLP(fake((H, E)), fake((E, H, 2 * INTER)), fake((E, INTER, H)), K)
    with pytest.raises(ValueError, match="recompute applies only with return_context=True"):
        mlp(fake((T, H)), recompute=True)
