"""The blocked gate|up layout of w1 on the CPU: which layers may take it (fake
arrays, errors before any GPU work), and the column order it stands for."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import cublas_grouped as cg
from cublas_grouped.moe.checks import layer_shape
from cublas_grouped.moe.gate_up import GATE_UP_BLOCK

BF16 = ml_dtypes.bfloat16


def test_layer_shape_takes_the_blocked_layout(fake):
    shape = layer_shape(fake((4, 64, 256), BF16), fake((4, 128, 64), BF16), 2, w1_layout="gate_up_blocked")
    assert shape.gate_up_block == GATE_UP_BLOCK == 128
    assert layer_shape(fake((4, 64, 256), BF16), fake((4, 128, 64), BF16), 2).gate_up_block == 0


@pytest.mark.parametrize(
    "w1, w2, kwargs, match",
    [
        (
            (4, 64, 192),
            (4, 96, 64),
            {},
            r"needs a gated layer with 16-bit w1 and I a multiple of 128; got gated=True, I=96",
        ),
        ((4, 64, 128), (4, 128, 64), {"gated": False}, r"got gated=False, I=128"),
        (
            (4, 64, 256),
            (4, 128, 64),
            {"w1_layout": "blocked"},
            r"w1_layout must be one of \('gate_up', 'gate_up_blocked'\)",
        ),
    ],
)
def test_refused_before_any_gpu_work(fake, w1, w2, kwargs, match):
    kwargs = {"w1_layout": "gate_up_blocked", **kwargs}
    x, ids = fake((2, 64), BF16), fake((2, 1), np.int32)
    with pytest.raises(ValueError, match=match):
        cg.moe_forward(x, ids, None, fake(w1, BF16), fake(w2, BF16), **kwargs)


def test_backward_refuses_the_blocked_layout(fake):
    x, ids = fake((2, 64), BF16), fake((2, 1), np.int32)
    with pytest.raises(ValueError, match="return_context=True does not take w1_layout='gate_up_blocked'"):
        cg.moe_forward(
            x, ids, None, fake((4, 64, 256), BF16), fake((4, 128, 64), BF16),
            w1_layout="gate_up_blocked", return_context=True,
        )  # fmt: skip


def test_blocked_column_order():
    """The order pack_gate_up makes, as NumPy index arithmetic: block j of 256
    packed columns holds gate columns 128j.. then up columns 128j.. (I = 384)."""
    inter, b = 384, GATE_UP_BLOCK
    plain = np.arange(2 * inter)  # 0..I-1 gate, I..2I-1 up
    packed = plain.reshape(2, inter // b, b).transpose(1, 0, 2).reshape(-1)  # pack_gate_up's reshape
    for j in range(inter // b):
        assert (packed[2 * b * j : 2 * b * j + b] == np.arange(b * j, b * j + b)).all()
        assert (packed[2 * b * j + b : 2 * b * (j + 1)] == inter + np.arange(b * j, b * j + b)).all()


def test_fp8_w1_cannot_take_the_blocked_layout(fake):
    """FP8 weights are refused with the blocked layout, and the message says so;
    a 16-bit w1 refused for its width does not mention FP8."""
    w1 = cg.FP8ExpertWeights(fake((4, 256, 64), np.uint8), fake((4, 2, 1), np.float32), "block128", True)
    x, ids = fake((2, 64), BF16), fake((2, 1), np.int32)
    with pytest.raises(ValueError, match=r"got gated=True, I=128, FP8 w1$"):
        cg.moe_forward(x, ids, None, w1, fake((4, 64, 128), BF16), trans_b=True, w1_layout="gate_up_blocked")
    with pytest.raises(ValueError, match=r"got gated=True, I=96$"):
        cg.moe_forward(
            x, ids, None, fake((4, 64, 192), BF16), fake((4, 96, 64), BF16), w1_layout="gate_up_blocked"
        )


def test_pack_refuses_before_any_gpu_work(fake):
    from cublas_grouped.moe.gate_up import pack_gate_up, unpack_gate_up

    with pytest.raises(ValueError, match=r"w1's gate\|up width 2I=192 must be a multiple of 256"):
        pack_gate_up(fake((2, 16, 192), BF16))
    with pytest.raises(ValueError, match=r"2I=192 must be a multiple of 256"):
        pack_gate_up(fake((2, 192, 16), BF16), trans_b=True)
    with pytest.raises(ValueError, match=r"w1 must be a C-contiguous 3-D array; got shape \(16, 256\)"):
        unpack_gate_up(fake((16, 256), BF16))
