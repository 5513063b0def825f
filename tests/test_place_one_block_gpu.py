"""dispatch.cu's ``place_one_block``: the decode step's whole placement in one
launch, against a NumPy model of it (the stable counting sort by expert with
repeats aliased and out-of-range ids dropped, the Hopper kernel's contiguous
schedule, each row's weight summed in choice order, the gathered rows), every
output compared exactly, every output buffer poisoned first and checked
untouched past its end. Expert counts from 1 to the 1024 the launch allows,
1 to 1024 pairs, each element type, rows with and without 16-byte vectors,
and the optional outputs left out."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper
from cublas_grouped.moe import kernels as K

pytestmark = pytest.mark.gpu

POISON = -12345  # in every int output before the launch
SPARE = 16  # entries past each output's end that must keep the poison


def placement_model(ids, weights, e, tile_rows):
    """What place_one_block writes, from the definitions in dispatch.cu's header."""
    tokens, k = ids.shape
    flat = ids.reshape(-1)
    pairs = flat.size
    expert = np.full(pairs, -1)
    pair_to_row = np.full(pairs, -1)
    for p, x in enumerate(flat):
        j = p % k
        if 0 <= x < e:
            earlier = [i for i in range(j) if flat[p - j + i] == x]
            if earlier:
                pair_to_row[p] = -2 - earlier[0]  # a repeat aliases its first choice's row
            else:
                expert[p] = x
    counts = np.bincount(expert[expert >= 0], minlength=e).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    tiles = -(-counts // tile_rows)
    row_to_pair = np.full(pairs, -1)
    row_weights = np.zeros(pairs, np.float32)
    taken = np.zeros(e, np.int64)
    w = np.ones(pairs, np.float32) if weights is None else weights.reshape(-1)
    for p in range(pairs):
        x = expert[p]
        if x < 0:
            continue
        row = offsets[x] + taken[x]
        taken[x] += 1
        pair_to_row[p], row_to_pair[row] = row, p
        j = p % k
        total = np.float32(w[p])
        for i in range(j + 1, k):  # later repeats of the same expert, in choice order
            if flat[p - j + i] == x:
                total = np.float32(total + w[p - j + i])
        row_weights[row] = total
    dropped = int(((flat < 0) | (flat >= e)).sum())
    return {
        "counts": counts,
        "row_offsets": offsets,
        "row_ends": offsets[:-1] + counts,
        "tile_offsets": np.concatenate([[0], np.cumsum(tiles)]),
        "pair_to_row": pair_to_row,
        "row_to_pair": row_to_pair,
        "row_weights": row_weights,
        "dropped": dropped,
        "rows_used": int(counts.sum()),
    }


def _routing(rng, tokens, k, e, kind):
    if kind == "distinct":
        return np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    if kind == "one-expert":  # every pair on expert e - 1: one group of all the rows
        return np.full((tokens, k), e - 1, np.int32)
    # repeats and ids outside [0, E) (negative and past the end)
    return rng.integers(-2, e + 2, (tokens, k)).astype(np.int32)


CASES = [
    # (experts, k, tokens, routing)
    (1, 1, 1, "distinct"),
    (1, 1, 1024, "one-expert"),
    (8, 2, 1, "distinct"),
    (8, 2, 64, "messy"),
    (3, 6, 5, "messy"),  # k > E: every token repeats
    (128, 8, 16, "distinct"),
    (128, 8, 128, "distinct"),  # 1024 pairs: the launch's limit
    (128, 8, 17, "one-expert"),
    (256, 8, 64, "messy"),
    (40, 4, 70, "messy"),
    (1024, 4, 256, "distinct"),  # the expert limit and the pair limit together
    (1000, 1, 1, "messy"),
]


@pytest.mark.parametrize("experts, k, tokens, kind", CASES)
@pytest.mark.parametrize("dtype, hidden", [(ml_dtypes.bfloat16, 136), (np.float16, 100), (np.float32, 64)])
def test_place_one_block_against_its_model(experts, k, tokens, kind, dtype, hidden):
    import cupy

    from cublas_grouped.runtime.nvrtc import arch_for

    rng = np.random.default_rng(experts * 7919 + tokens * 31 + k)
    ids = _routing(rng, tokens, k, experts, kind)
    weights = rng.random((tokens, k)).astype(np.float32) + 0.05
    pairs = tokens * k
    want = placement_model(ids, weights, experts, hopper.BLOCK_M)
    x_host = rng.standard_normal((tokens, hidden)).astype(dtype)
    x = cupy.asarray(x_host)

    def ints(n, value=POISON):
        return cupy.full(n + SPARE, value, dtype=cupy.int32)

    counts, pair_to_row, row_to_pair = ints(experts), ints(pairs), ints(pairs)
    schedule = ints(hopper.schedule_ints(experts), 77)  # the tile counters too: 77 until zeroed
    row_weights = cupy.full(pairs + SPARE, np.nan, dtype=cupy.float32)
    dropped = cupy.full(1, 5, dtype=cupy.uint64)  # added to, not overwritten
    rows = cupy.full((pairs + SPARE, hidden), np.nan, dtype=dtype)
    stream = cupy.cuda.get_current_stream()
    K.place_one_block(
        stream.ptr,
        arch_for(cg.device_info().sm),
        cupy.asarray(ids),
        experts,
        cupy.asarray(weights),
        x,
        hopper.BLOCK_M,
        counts,
        hopper.schedule_addresses(schedule.data.ptr, experts),
        pair_to_row,
        row_to_pair,
        row_weights=row_weights,
        dropped=dropped,
        rows=rows,
    )
    stream.synchronize()
    e = experts
    sched = schedule.get()
    got = {
        "counts": counts.get()[:e],
        "row_offsets": sched[: e + 1],
        "row_ends": sched[e + 1 : 2 * e + 1],
        "tile_offsets": sched[2 * e + 1 : 3 * e + 2],
        "pair_to_row": pair_to_row.get()[:pairs],
        "row_to_pair": row_to_pair.get()[:pairs],
    }
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    assert (sched[3 * e + 2 : 3 * e + 4] == 0).all(), "the two tile counters were not zeroed"
    assert (sched[3 * e + 4 :] == 77).all(), "written past the schedule"
    for name, array in (("counts", counts), ("pair_to_row", pair_to_row), ("row_to_pair", row_to_pair)):
        assert (array.get()[-SPARE:] == POISON).all(), f"written past {name}"
    used = want["rows_used"]
    w = row_weights.get()
    assert w[:used].tobytes() == want["row_weights"][:used].tobytes(), "row weights differ"
    assert np.isnan(w[used:]).all(), "a row weight written past the rows taken"
    assert int(dropped.get()[0]) == 5 + want["dropped"]
    gathered = rows.get()
    src = np.where(want["row_to_pair"][:, None] >= 0, x_host[want["row_to_pair"] // k], 0).astype(dtype)
    assert gathered[:pairs].tobytes() == src.tobytes(), "gathered rows differ"
    assert np.isnan(gathered[pairs:].astype(np.float32)).all(), "a row gathered past T*k"


def test_optional_outputs_left_out_and_misaligned_x():
    """No row weights, no dropped counter, no gathered rows (GEMM 1 gathers):
    the index arrays and schedule as before, with one block; then x 2 bytes
    off a 16-byte boundary (the element-wise copy) gathers the same rows."""
    import cupy

    from cublas_grouped.runtime.nvrtc import arch_for

    rng = np.random.default_rng(3)
    experts, k, tokens, hidden = 64, 6, 33, 128
    ids = _routing(rng, tokens, k, experts, "messy")
    want = placement_model(ids, None, experts, hopper.BLOCK_M)
    arch = arch_for(cg.device_info().sm)
    stream = cupy.cuda.get_current_stream()
    pairs = tokens * k
    counts, p2r, r2p = (cupy.full(n, POISON, dtype=cupy.int32) for n in (experts, pairs, pairs))
    schedule = cupy.full(hopper.schedule_ints(experts), 77, dtype=cupy.int32)
    base = cupy.zeros((tokens * hidden + 1,), dtype=ml_dtypes.bfloat16)
    x = base[1:].reshape(tokens, hidden)  # 2 bytes past the allocation's start
    x[...] = cupy.asarray(rng.standard_normal((tokens, hidden)).astype(ml_dtypes.bfloat16))
    addresses = hopper.schedule_addresses(schedule.data.ptr, experts)
    K.place_one_block(
        stream.ptr, arch, cupy.asarray(ids), experts, None, x, hopper.BLOCK_M, counts, addresses, p2r, r2p
    )
    stream.synchronize()
    np.testing.assert_array_equal(counts.get(), want["counts"])
    np.testing.assert_array_equal(p2r.get(), want["pair_to_row"])
    np.testing.assert_array_equal(r2p.get(), want["row_to_pair"])
    np.testing.assert_array_equal(schedule.get()[: experts + 1], want["row_offsets"])
    weights = cupy.full(pairs, np.nan, dtype=cupy.float32)
    rows = cupy.full((pairs, hidden), np.nan, dtype=ml_dtypes.bfloat16)
    K.place_one_block(
        stream.ptr, arch, cupy.asarray(ids), experts, None, x, hopper.BLOCK_M, counts, addresses, p2r, r2p,
        row_weights=weights, rows=rows,
    )  # fmt: skip
    stream.synchronize()
    used = want["rows_used"]
    assert (weights.get()[:used] == want["row_weights"][:used]).all()  # 1 per choice: repeats add up
    x_host = x.get()
    src = np.where(want["row_to_pair"][:, None] >= 0, x_host[want["row_to_pair"] // k], 0)
    assert rows.get().tobytes() == src.astype(ml_dtypes.bfloat16).tobytes()
