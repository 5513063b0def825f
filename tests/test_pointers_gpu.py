"""The pointer-building kernel against a NumPy model of its contract."""

from __future__ import annotations

import numpy as np
import pytest

from cublas_grouped.gemm.plan import Operands, RowLayout
from cublas_grouped.gemm.pointers import build_pointers
from cublas_grouped.runtime.device import current_device, resolve_stream, resources

pytestmark = pytest.mark.gpu

OPS = Operands(
    a=1 << 40,
    a_row_bytes=64,
    a_expert_bytes=0,
    b=2 << 40,
    b_row_bytes=0,
    b_expert_bytes=4096,
    c=3 << 40,
    c_row_bytes=32,
    c_expert_bytes=0,
)
SCRATCH = 4 << 40


def expected(counts, chunk, num_fixed):
    """Compact chunk problems in expert order, then idle problems up to num_fixed that
    re-read the last real problem's weights and write to scratch."""
    offsets = np.concatenate(([0], np.cumsum(-(-counts // chunk) * chunk)))
    problems = [
        OPS.at(int(offsets[e]) + c * chunk, e)
        for e in range(len(counts))
        for c in range(-(-int(counts[e]) // chunk))
    ]
    idle_b = problems[-1][1] if problems else OPS.b
    problems += [(OPS.a, idle_b, SCRATCH)] * max(0, num_fixed - len(problems))
    return problems, offsets


@pytest.mark.parametrize(
    "counts, chunk, num_fixed",
    [
        ([3, 0, 17, 16, 0, 1], 16, 0),
        ([3, 0, 17, 16, 0, 1], 16, 13),  # 5 real chunks, 8 idle ones
        ([0] * 40 + [64] + [0] * 23, 16, 100),
        (list(np.random.default_rng(0).integers(0, 40, 700)), 16, 3000),
        ([1, 1, 1, 1], 1, 4),  # exactly full: no idle problem
        ([0, 0, 0], 16, 5),  # no real problem: idle ones read b itself
    ],
)
def test_build_pointers_chunks_and_spread(counts, chunk, num_fixed):
    import cupy

    counts = np.asarray(counts, dtype=np.int64)
    res = resources(current_device(), resolve_stream(None))
    counts_dev = cupy.asarray(counts, dtype=cupy.int32)
    entries = max(num_fixed, int((-(-counts // chunk)).sum()))
    arrays = tuple(cupy.zeros(entries, dtype=cupy.uint64) for _ in range(3))
    offsets = cupy.zeros(len(counts) + 1, dtype=cupy.int32)
    with res.cupy_stream:
        build_pointers(
            res,
            counts_dev,
            OPS,
            RowLayout.chunk_aligned(chunk),
            chunk_rows=chunk,
            num_problems=0,
            num_fixed=num_fixed,
            scratch_c=SCRATCH,
            row_offsets=offsets,
            pointer_arrays=arrays,
        )
    res.cupy_stream.synchronize()
    want, want_offsets = expected(counts, chunk, num_fixed)
    got = list(zip(*(cupy.asnumpy(a).tolist() for a in arrays)))
    assert got == [tuple(int(v) for v in w) for w in want]
    assert cupy.asnumpy(offsets).tolist() == want_offsets.tolist()


def test_build_pointers_never_writes_past_its_arrays():
    """Counts that need more problems than the arrays hold: the first entries are
    the real problems, and nothing past the arrays' length is touched."""
    import cupy

    counts = np.array([40, 3, 0, 33, 17], dtype=np.int64)  # 3 + 1 + 3 + 2 = 9 chunks of 16
    res = resources(current_device(), resolve_stream(None))
    held, guard = 5, 4
    full = tuple(cupy.full(held + guard, 7, dtype=cupy.uint64) for _ in range(3))
    with res.cupy_stream:
        build_pointers(
            res,
            cupy.asarray(counts, dtype=cupy.int32),
            OPS,
            RowLayout.chunk_aligned(16),
            chunk_rows=16,
            num_problems=0,
            num_fixed=held,
            scratch_c=SCRATCH,
            pointer_arrays=tuple(a[:held] for a in full),
        )
        with pytest.raises(ValueError, match="pointer arrays hold 5 entries but 6 problems need them"):
            build_pointers(
                res,
                cupy.asarray(counts, dtype=cupy.int32),
                OPS,
                RowLayout.chunk_aligned(16),
                chunk_rows=16,
                num_problems=6,
                pointer_arrays=tuple(a[:held] for a in full),
            )
    res.cupy_stream.synchronize()
    want, _ = expected(counts, 16, 0)
    got = list(zip(*(cupy.asnumpy(a).tolist() for a in full)))
    assert got[:held] == [tuple(int(v) for v in w) for w in want[:held]]
    assert got[held:] == [(7, 7, 7)] * guard
