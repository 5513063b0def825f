"""Row layouts and operand addresses against NumPy's own address arithmetic (CPU).

The expected address of an operand's row or expert block comes from a NumPy
array of the same shape and dtype (its strides), not from the formulas under
test.
"""

from __future__ import annotations

import numpy as np
import pytest

from cublas_grouped import Algorithm
from cublas_grouped.gemm.plan import GemmPlan, Operands, RowLayout, layout_for
from cublas_grouped.moe.checks import layer_shape

E, M, K, N = 5, 11, 7, 13  # every size distinct, so no two strides coincide


def numpy_offset(shape, dtype, index) -> int:
    """Byte offset of ``array[index]`` in a C-contiguous array, by NumPy's strides."""
    strides = np.empty(shape, dtype=dtype).strides
    return sum(i * s for i, s in zip(index, strides))


def plan(trans_a: bool) -> GemmPlan:
    empty = np.zeros(0, np.int64)
    return GemmPlan(E, M, N, K, trans_a, False, empty, np.zeros(1, np.int64), empty)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_operand_addresses_of_the_normal_product(dtype):
    # rows a [M, K], weights b [E, K, N], out c [M, N]
    item = np.dtype(dtype).itemsize
    ops = Operands.for_plan(plan(False), 1 << 30, 2 << 30, 3 << 30, item)
    for row, expert in ((0, 0), (3, 1), (M - 1, E - 1), (5, 2)):
        a, b, c = ops.at(row, expert)
        assert a == (1 << 30) + numpy_offset((M, K), dtype, (row, 0))
        assert b == (2 << 30) + numpy_offset((E, K, N), dtype, (expert, 0, 0))
        assert c == (3 << 30) + numpy_offset((M, N), dtype, (row, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_operand_addresses_of_the_k_grouped_product(dtype):
    # trans_a: rows a [M, K] and b [M, N] grouped along M, out c [E, K, N]
    item = np.dtype(dtype).itemsize
    ops = Operands.for_plan(plan(True), 1 << 30, 2 << 30, 3 << 30, item)
    for row, expert in ((0, 0), (3, 1), (M - 1, E - 1), (5, 2)):
        a, b, c = ops.at(row, expert)
        assert a == (1 << 30) + numpy_offset((M, K), dtype, (row, 0))
        assert b == (2 << 30) + numpy_offset((M, N), dtype, (row, 0))
        assert c == (3 << 30) + numpy_offset((E, K, N), dtype, (expert, 0, 0))


def test_operand_at_adds_every_stride():
    ops = Operands(1000, 16, 3, 5000, 5, 256, 9000, 32, 7)
    assert ops.at(3, 2) == (1000 + 48 + 6, 5000 + 15 + 512, 9000 + 96 + 14)
    rows, experts = np.array([0, 4]), np.array([1, 3])
    a, b, c = ops.at(rows, experts)
    assert a.tolist() == [1003, 1073] and b.tolist() == [5256, 5788] and c.tolist() == [9007, 9149]


def test_chunk_aligned_layouts_of_two_rows_and_more():
    sizes = np.array([3, 0, 4, 1])
    two = RowLayout.chunk_aligned(2)
    assert two.offsets(sizes).tolist() == [0, 4, 4, 8, 10]
    assert Algorithm.CHUNKED_BATCHED in two.algorithms()
    assert Algorithm.CHUNKED_BATCHED not in RowLayout.contiguous().algorithms()
    assert RowLayout.contiguous().offsets(sizes).tolist() == [0, 3, 3, 7, 8]


def test_layout_for_names_a_bad_algorithm():
    with pytest.raises(ValueError, match="algorithm must be one of AUTO"):
        layout_for("fastest", np.array([1, 2]))


def test_layer_shape_keeps_trans_b_and_refuses_a_flat_w1(fake):
    shape = layer_shape(fake((E, 2 * 8, 16)), fake((E, 16, 8)), 2, trans_b=True)
    assert shape.trans_b is True and (shape.hidden, shape.inter) == (16, 8)
    assert layer_shape(fake((E, 16, 2 * 8)), fake((E, 8, 16)), 2).trans_b is False
    for trans_b in (False, True):
        with pytest.raises(ValueError, match=r"w1 must be 3-D \[E, K, N\]"):
            layer_shape(fake((16, 16)), fake((E, 8, 16)), 2, trans_b=trans_b)
