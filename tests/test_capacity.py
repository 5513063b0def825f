"""Fixed-capacity decode: the chunk rule, the exact problem bound and the buffer
capacity, checked against routings built here, independently of the code (CPU).

A routing is a [T, k] array of expert ids, distinct within each token (a token
that names an expert twice gets one row for it, so counts never exceed T). The
number of chunk problems a routing needs is ``sum_e ceil(m_e / C)`` over the
experts' row counts m_e; the tests count it with ``np.bincount`` on real
routings rather than with the formula under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from cublas_grouped.moe.checks import LayerShape
from cublas_grouped.moe.fixed_capacity import MAX_FIXED_CAPACITY_TOKENS, ChunkCapacity, chunk_rows, max_chunks

EXPERTS_TOPK = [(8, 1), (8, 2), (16, 4), (32, 4), (64, 6), (128, 8), (160, 6), (256, 8)]


def spec(experts: int, top_k: int) -> LayerShape:
    return LayerShape(experts, 8, 4, 8, top_k, True, "silu", False, np.dtype(np.float32))


def documented_chunk(experts: int, top_k: int, tokens: int) -> int:
    """The rule as the docs state it: T rows when T*k > 8*E (more than half of a
    16-row chunk per expert on average), else min(T, 16)."""
    return tokens if tokens * top_k > 8 * experts else min(tokens, 16)


def chunks_needed(ids: np.ndarray, experts: int, chunk: int) -> int:
    counts = np.bincount(ids.ravel(), minlength=experts)
    return int((-(-counts // chunk)).sum())


def worst_counts(experts: int, top_k: int, tokens: int, chunk: int) -> np.ndarray:
    """Row counts with the most chunks: as many experts as possible get one row
    (one chunk each), then whole chunks are added (chunk rows buy one more
    chunk) while no expert exceeds T rows; leftover rows go where they open no
    chunk. Built greedily, not from the formula under test."""
    pairs = tokens * top_k
    counts = np.zeros(experts, dtype=np.int64)
    active = min(experts, pairs)
    counts[:active] = 1
    left = pairs - active
    for e in range(active):  # fill whole extra chunks, expert by expert
        extra = min((tokens - counts[e]) // chunk, left // chunk)
        counts[e] += extra * chunk
        left -= extra * chunk
    for e in range(active):  # the rest: partial chunks that add no problem
        room = min(tokens, -(-counts[e] // chunk) * chunk) - counts[e]
        take = min(room, left)
        counts[e] += take
        left -= take
    for e in range(active):  # whatever still remains opens chunks anyway
        take = min(tokens - counts[e], left)
        counts[e] += take
        left -= take
    assert left == 0 and counts.max() <= tokens
    return counts


def routing_with_counts(counts: np.ndarray, tokens: int, top_k: int) -> np.ndarray:
    """A [T, k] routing, ids distinct per token, whose experts get ``counts`` rows:
    lay the experts' rows end to end and deal them to tokens round robin (an
    expert's run of at most T rows never reaches one token twice)."""
    rows = np.repeat(np.arange(len(counts)), counts)
    assert len(rows) == tokens * top_k
    ids = rows.reshape(top_k, tokens).T.copy()
    assert all(len(set(row)) == top_k for row in ids.tolist())
    return ids.astype(np.int32)


@pytest.mark.parametrize("experts, top_k", EXPERTS_TOPK)
def test_chunk_rule_is_the_documented_one(experts, top_k):
    s = spec(experts, top_k)
    for tokens in range(1, 1025):
        assert chunk_rows(s, tokens) == documented_chunk(experts, top_k, tokens), tokens
    # The switch itself, from both sides: T*k = 8E stays thin, one token more does not.
    if (8 * experts) % top_k == 0 and 8 * experts // top_k > 16:
        edge = 8 * experts // top_k
        assert chunk_rows(s, edge) == 16 and chunk_rows(s, edge + 1) == edge + 1


@pytest.mark.parametrize("experts, top_k", EXPERTS_TOPK)
def test_problem_bound_is_reached_by_a_real_routing(experts, top_k):
    s = spec(experts, top_k)
    for tokens in range(1, 200):
        chunk = chunk_rows(s, tokens)
        ids = routing_with_counts(worst_counts(experts, top_k, tokens, chunk), tokens, top_k)
        assert chunks_needed(ids, experts, chunk) == max_chunks(s, tokens), tokens


def _exhaustive_max_chunks(experts: int, top_k: int, tokens: int, chunk: int) -> int:
    """Max of sum ceil(m_e / C) over every count vector with m_e <= T and
    sum m_e <= T*k (every such vector is a routing, and dropped pairs only
    lower counts): a knapsack over experts, brute force."""
    budget = tokens * top_k
    best = np.zeros(budget + 1, dtype=np.int64)  # best[b]: most chunks using at most b rows
    gain = -(-np.arange(tokens + 1) // chunk)
    for _ in range(experts):
        new = best.copy()
        for m in range(1, tokens + 1):
            new[m:] = np.maximum(new[m:], best[: budget + 1 - m] + gain[m])
        best = new
    return int(best[budget])


@pytest.mark.parametrize("experts, top_k", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 3), (5, 2), (8, 2)])
def test_problem_bound_is_exact_in_small_spaces(experts, top_k):
    s = spec(experts, top_k)
    for tokens in range(1, 41):
        want = _exhaustive_max_chunks(experts, top_k, tokens, chunk_rows(s, tokens))
        assert max_chunks(s, tokens) == want, tokens


@pytest.mark.parametrize("experts, top_k", EXPERTS_TOPK)
@pytest.mark.parametrize("max_tokens", [1, 17, 64, 300])
def test_capacity_holds_every_step_up_to_max_tokens(experts, top_k, max_tokens):
    s = spec(experts, top_k)
    cap = ChunkCapacity.of(s, max_tokens)
    assert cap.pairs == max_tokens * top_k
    for tokens in range(1, max_tokens + 1):
        chunk = documented_chunk(experts, top_k, tokens)
        ids = routing_with_counts(worst_counts(experts, top_k, tokens, chunk), tokens, top_k)
        problems = chunks_needed(ids, experts, chunk)
        assert problems <= cap.chunks, tokens
        assert problems * chunk <= cap.rows, tokens
        assert chunk <= cap.chunk_rows, tokens
        cap.check_step(s, tokens)  # and the step check agrees


def test_the_reported_overflow_is_covered():
    # E=8, k=2, capacity 64: T=64 runs 8 problems of 64 rows, but T=20 needs 10
    # problems of 16 rows. Buffers sized at T=64 alone held 8 problems.
    s = spec(8, 2)
    ids = routing_with_counts(worst_counts(8, 2, 20, 16), 20, 2)
    assert chunks_needed(ids, 8, 16) == 10
    cap = ChunkCapacity.of(s, 64)
    assert cap.chunks >= 10 and cap.rows >= 8 * 64


def test_a_step_past_the_capacity_is_refused():
    s = spec(8, 2)
    cap = ChunkCapacity.of(s, 16)
    cap.check_step(s, 16)
    with pytest.raises(RuntimeError, match="a step of 17 tokens needs 34 pairs"):
        cap.check_step(s, 17)


def test_max_tokens_limits():
    s = spec(8, 2)
    assert ChunkCapacity.of(s, MAX_FIXED_CAPACITY_TOKENS).max_tokens == MAX_FIXED_CAPACITY_TOKENS
    with pytest.raises(ValueError, match="is too large"):
        ChunkCapacity.of(s, MAX_FIXED_CAPACITY_TOKENS + 1)


def test_which_gemms_a_step_runs(fake):
    """The kernel on SM 9.0 for 16-bit layers it fits; chunked elsewhere, for a
    forced cuBLAS algorithm, and under AUTO for few-expert decode steps."""
    import ml_dtypes

    from cublas_grouped import Algorithm, GroupedGemmConfig, GroupedGemmExecutor
    from cublas_grouped.moe.fixed_capacity import (
        CHUNKED_DECODE_MAX_EXPERTS,
        CHUNKED_DECODE_MAX_TOKENS,
        fixed_capacity_backend,
    )

    def shape(experts, hidden=2048, inter=768, dtype=ml_dtypes.bfloat16):
        return LayerShape(experts, hidden, inter, 2 * inter, 8, True, "silu", False, np.dtype(dtype))

    def backend(algorithm, layer, tokens, sm=(9, 0), ptr=1 << 20):
        executor = GroupedGemmExecutor(device=0, config=GroupedGemmConfig(algorithm=algorithm))
        weights = (
            fake((4, 8, 8), ml_dtypes.bfloat16, ptr=ptr),
            fake((4, 8, 8), ml_dtypes.bfloat16, ptr=1 << 21),
        )
        return fixed_capacity_backend(sm, executor, layer, *weights, tokens)

    auto, kernel = Algorithm.AUTO, Algorithm.SM90_GROUPED
    assert backend(auto, shape(128), 1) == "sm90_grouped"
    assert backend(auto, shape(128), 16) == "sm90_grouped"
    few, decode = CHUNKED_DECODE_MAX_EXPERTS, CHUNKED_DECODE_MAX_TOKENS
    assert backend(auto, shape(few), decode) == "chunked_batched"
    assert backend(auto, shape(few), decode + 1) == "sm90_grouped"
    assert backend(auto, shape(few + 1), 1) == "sm90_grouped"
    assert backend(kernel, shape(few), 1) == "sm90_grouped"  # forced: the kernel
    assert backend(Algorithm.CUBLAS_GROUPED, shape(128), 16) == "chunked_batched"
    assert backend(auto, shape(128), 16, sm=(8, 0)) == "chunked_batched"
    assert backend(kernel, shape(128, dtype=np.float32), 16) == "chunked_batched"
    assert backend(auto, shape(128, inter=764), 16) == "chunked_batched"  # I % 8 != 0
    assert backend(auto, shape(128), 16, ptr=(1 << 20) + 8) == "chunked_batched"  # 8-byte aligned weights


def test_kernel_step_capacity_limits():
    """Buffers for the kernel step hold T*k rows and no chunk; past the token
    limit they are refused before any allocation; a step past them is an error."""
    shape = spec(128, 8)
    cap = ChunkCapacity.kernel_rows(shape, 64)
    assert (cap.pairs, cap.rows, cap.chunks, cap.chunk_rows) == (512, 512, 0, 0)
    cap.check_kernel_step(shape, 64)
    with pytest.raises(RuntimeError, match="a step of 65 tokens needs 520 rows but the buffers hold 512"):
        cap.check_kernel_step(shape, 65)
    with pytest.raises(ValueError, match=f"max_tokens={MAX_FIXED_CAPACITY_TOKENS + 1} is too large"):
        ChunkCapacity.kernel_rows(shape, MAX_FIXED_CAPACITY_TOKENS + 1)
