"""The 16-bit gather walked by token (dispatch.cu ``gather_rows_by_token``, the
default: ``kernels.GATHER_BY_TOKEN``) on a GPU: bit for bit the row-order
``gather_rows`` and the float64 reference, on row maps with dropped pairs,
repeats (a pair aliasing its token's earlier row), padding rows between the
placed ones, one token and many, tokens whose row spans one work item, two,
or a partial second, the scalar path (rows not a multiple of 16 bytes, x one
element off), every element type, and more work items than the grid's
65,535 blocks. Outputs start as NaN with a poisoned guard row either side,
which must stay untouched."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cublas_grouped import testing as ref
from cublas_grouped.moe import kernels as K

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
GUARD = 0xA5  # the guard rows' and the poisoned output's byte


def _row_map(rng, tokens, k, rows):
    """(pair_to_row [T*k], row_to_pair [rows]) as assign_rows writes them:
    about 10% of the pairs dropped (-1), about 10% repeats of an earlier
    choice of their token (-2 - j), the rest each on a distinct row, placed
    at random among ``rows`` (the others padding: -1)."""
    pairs = tokens * k
    p2r = np.full(pairs, -1, np.int32)
    kind = rng.random(pairs)
    for p in range(pairs):
        j = p % k
        if j > 0 and kind[p] < 0.1:
            p2r[p] = -2 - int(rng.integers(0, j))
    placed = np.flatnonzero((p2r == -1) & (kind >= 0.2))
    assert rows >= placed.size
    p2r[placed] = rng.permutation(rows)[: placed.size]
    r2p = np.full(rows, -1, np.int32)
    r2p[p2r[placed]] = placed
    return p2r, r2p


def _x(rng, tokens, hidden, dtype, misaligned):
    import cupy

    host = (rng.standard_normal((tokens, hidden)) * 3).astype(np.float32).astype(dtype)
    if tokens * hidden > 4:
        host.reshape(-1)[:4] = np.array([np.nan, np.inf, -0.0, 1e-30], np.float32).astype(dtype)
    if not misaligned:
        return cupy.asarray(host), host
    dev = cupy.zeros(host.size + 1, dtype=host.dtype)[1:].reshape(host.shape)
    dev[...] = cupy.asarray(host)
    return dev, host


def _gather(x, p2r, r2p, k, rows, by_token, monkeypatch):
    """gather_rows into rows between two guard rows, all poisoned: (the rows
    written, the whole buffer's bytes)."""
    import cupy

    hidden = x.shape[1]
    buf = cupy.empty((rows + 2, hidden), dtype=x.dtype)
    buf.view(cupy.uint8).fill(GUARD)
    monkeypatch.setattr(K, "GATHER_BY_TOKEN", by_token)
    stream = cupy.cuda.get_current_stream().ptr
    arch = "sm_" + cupy.cuda.Device().compute_capability
    K.gather_rows(stream, arch, x, cupy.asarray(p2r), cupy.asarray(r2p), k, buf[1 : rows + 1])
    cupy.cuda.get_current_stream().synchronize()
    return cupy.asnumpy(buf)


CASES = [
    # tokens, k, rows, hidden, dtype, x misaligned
    (1, 1, 1, 2048, BF16, False),
    (1, 8, 12, 7168, BF16, False),
    (129, 8, 1200, 2048, BF16, False),  # 256 chunks: one work item per token (GATHER_UNITS 2)
    (513, 8, 4500, 7168, BF16, False),  # 896 chunks: three whole items and a partial one
    (64, 6, 500, 4096, np.float16, False),  # 512 chunks: exactly two items
    (200, 4, 900, 136, BF16, False),  # 17 chunks
    (150, 8, 1300, 100, BF16, False),  # 200 bytes a row: the scalar path
    (150, 8, 1300, 2048, BF16, True),  # x one element off: the scalar path
    (90, 3, 300, 33, np.float32, False),
    (70_000, 1, 70_100, 8, BF16, False),  # 70,000 items over 65,535 blocks
]


@pytest.mark.parametrize("tokens, k, rows, hidden, dtype, misaligned", CASES)
def test_by_token_is_the_row_order_gather_bit_for_bit(
    monkeypatch, tokens, k, rows, hidden, dtype, misaligned
):
    rng = np.random.default_rng(tokens * 31 + k * 7 + hidden)
    p2r, r2p = _row_map(rng, tokens, k, rows)
    assert (ref.pair_to_row_of(r2p, p2r.size) == np.where(p2r >= 0, p2r, -1)).all()
    x, host = _x(rng, tokens, hidden, dtype, misaligned)
    by_token = _gather(x, p2r, r2p, k, rows, True, monkeypatch)
    by_row = _gather(x, p2r, r2p, k, rows, False, monkeypatch)
    bits = by_token.view(np.uint8).reshape(rows + 2, -1)
    assert (bits[0] == GUARD).all() and (bits[-1] == GUARD).all(), "a guard row was written"
    assert (by_token.view(np.uint8) == by_row.view(np.uint8)).all(), "not the row-order gather's bits"
    got = by_token[1:-1]
    want = np.zeros((rows, hidden), dtype=dtype)
    placed = r2p >= 0
    want[placed] = host[r2p[placed] // k]
    assert (got.view(np.uint8) == want.view(np.uint8)).all(), "not x's rows (zeros on padding)"
    assert np.allclose(got.astype(np.float64), ref.gather_ref(host, r2p, k), equal_nan=True)


def _gather_fp8(x, p2r, r2p, k, rows, by_token, monkeypatch):
    """The FP8 gather (codes and scales) between guard rows, all poisoned:
    (codes' bytes, scales' bytes), guard rows included."""
    import cupy

    hidden = x.shape[1]
    tiles = -(-hidden // 128)
    codes = cupy.empty((rows + 2, hidden), dtype=cupy.uint8)
    scales = cupy.empty((rows + 2, tiles), dtype=cupy.float32)
    codes.fill(GUARD)
    scales.view(cupy.uint8).fill(GUARD)
    monkeypatch.setattr(K, "GATHER_BY_TOKEN", by_token)
    stream = cupy.cuda.get_current_stream().ptr
    arch = "sm_" + cupy.cuda.Device().compute_capability
    quantized = (codes[1 : rows + 1], scales[1 : rows + 1])
    K.gather_rows(stream, arch, x, cupy.asarray(p2r), cupy.asarray(r2p), k, None, quantized)
    cupy.cuda.get_current_stream().synchronize()
    return cupy.asnumpy(codes), cupy.asnumpy(scales).view(np.uint8)


@pytest.mark.parametrize(
    "tokens, k, rows, hidden, dtype, misaligned",
    [c for c in CASES if c[3] % 8 == 0] + [(120, 8, 1000, 100, BF16, False)],
)
def test_fp8_by_token_is_the_row_order_fp8_gather_bit_for_bit(
    monkeypatch, tokens, k, rows, hidden, dtype, misaligned
):
    """gather_rows_fp8_by_token writes gather_rows_fp8's codes and scales,
    byte for byte (vector path, the scalar one on x one element off or rows
    not a multiple of 8), codes 0 and scales 1 on unplaced rows, guard rows
    untouched."""
    rng = np.random.default_rng(tokens * 17 + hidden)
    p2r, r2p = _row_map(rng, tokens, k, rows)
    x, _ = _x(rng, tokens, hidden, dtype, misaligned)
    codes, scales = _gather_fp8(x, p2r, r2p, k, rows, True, monkeypatch)
    want_codes, want_scales = _gather_fp8(x, p2r, r2p, k, rows, False, monkeypatch)
    for got in (codes, scales):
        assert (got[0] == GUARD).all() and (got[-1] == GUARD).all(), "a guard row was written"
    assert (codes == want_codes).all() and (scales == want_scales).all()
    unplaced = np.flatnonzero(r2p < 0) + 1
    assert (codes[unplaced] == 0).all()
    assert (scales[unplaced].view(np.float32) == 1).all()
