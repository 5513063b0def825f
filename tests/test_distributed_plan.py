"""The expert-parallel dispatch plan (CPU): placement, send order, receive layout,
and the whole exchange for faked ranks against the single-GPU float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from cublas_grouped.distributed.plan import (
    dispatch_model,
    forward_model,
    placement,
    receive_layout,
    send_layout,
    send_order,
)
from cublas_grouped.testing import moe_forward_ref


def _routing(rng, tokens, experts, k, kind):
    """ids [T, k] (distinct per token) and weights for one rank."""
    if kind == "uniform":
        p = None
    elif kind == "skewed":  # a few hot experts take most pairs
        p = np.exp(-np.arange(experts) / 2.0)
        p /= p.sum()
    else:
        raise AssertionError(kind)
    ids = np.array([rng.choice(experts, size=k, replace=False, p=p) for _ in range(tokens)]).reshape(
        tokens, k
    )
    w = rng.random((tokens, k))
    return ids.astype(np.int32), w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)


def _layer(rng, experts, hidden=12, inter=5):
    w1 = rng.standard_normal((experts, hidden, 2 * inter)) * hidden**-0.5
    w2 = rng.standard_normal((experts, inter, hidden)) * inter**-0.5
    return w1, w2


def test_placement_blocks_and_errors():
    where = placement(12, 4)
    assert where.experts_per_rank == 3
    assert [where.owner(e) for e in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [where.first_expert(r) for r in range(4)] == [0, 3, 6, 9]
    assert placement(5, 5).experts_per_rank == 1
    with pytest.raises(ValueError, match="num_experts=10 is not divisible by world_size=4"):
        placement(10, 4)
    with pytest.raises(
        ValueError, match=r"each rank holds the same number of experts \(E / R\) in one contiguous"
    ):
        placement(6, 4)
    with pytest.raises(ValueError, match="num_experts=2 is not divisible by world_size=4"):
        placement(2, 4)
    with pytest.raises(ValueError, match="world_size must be a positive int; got 0"):
        placement(8, 0)
    with pytest.raises(ValueError, match="num_experts must be a positive int; got True"):
        placement(True, 1)


def test_send_order_is_destination_expert_token_choice():
    rng = np.random.default_rng(0)
    experts, ranks = 8, 4
    ids = rng.integers(0, experts, size=(37, 3))
    order = send_order(ids, experts)
    k = ids.shape[1]
    # An independent sort with explicit keys: (destination rank, expert, token, choice).
    expected = sorted(
        range(ids.size), key=lambda p: (ids.flat[p] // (experts // ranks), ids.flat[p], p // k, p % k)
    )
    assert order.tolist() == expected
    assert send_order(np.zeros((0, 4), np.int32), experts).size == 0


def test_send_layout_and_receive_layout_by_hand():
    where = placement(6, 3)
    rows, offsets = send_layout(np.array([2, 0, 0, 0, 5, 1]), where)
    assert rows.tolist() == [2, 0, 6] and offsets.tolist() == [0, 2, 2, 8]
    # From source 0: 1 row for local expert 0, 2 for expert 1; from source 1: none; from 2: 3 for expert 1.
    rows, offsets, local = receive_layout(np.array([[1, 2], [0, 0], [0, 3]]))
    assert rows.tolist() == [3, 0, 3] and offsets.tolist() == [0, 3, 3, 6]
    assert local.dtype == np.int32 and local.tolist() == [0, 1, 1, 1, 1, 1]
    rows, offsets, local = receive_layout(np.zeros((2, 4), np.int64))
    assert rows.tolist() == [0, 0] and offsets.tolist() == [0, 0, 0] and local.size == 0


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_every_pair_goes_once_to_its_owner_in_order(ranks, kind):
    rng = np.random.default_rng(ranks * 10 + len(kind))
    experts, k = 16, 4
    ids = [_routing(rng, int(rng.integers(0, 40)), experts, k, kind)[0] for _ in range(ranks)]
    traffic = dispatch_model(ids, experts)
    epr = experts // ranks
    for d, mine in enumerate(traffic):
        # What d receives from s is what s sends to d, in the same order.
        got = mine.received
        assert len(got) == sum(len(t.sent_pairs[d]) for t in traffic)
        assert mine.recv_counts.shape == (ranks, epr)
        assert mine.recv_counts.sum() == len(got)
        for s in range(ranks):
            block = got[got[:, 0] == s]
            assert block[:, 1].tolist() == traffic[s].sent_pairs[d].tolist()
            assert np.bincount(block[:, 3], minlength=epr).tolist() == mine.recv_counts[s].tolist()
        assert ((got[:, 2] // epr) == d).all() and (got[:, 3] == got[:, 2] - d * epr).all()
        keys = [tuple(r) for r in got[:, [0, 2, 1]]]  # (source, expert, pair) ascending
        assert keys == sorted(keys)
        _, _, local = receive_layout(mine.recv_counts)
        assert local.tolist() == got[:, 3].tolist()
    for s, mine in enumerate(traffic):
        sent = np.concatenate(mine.sent_pairs)
        assert sorted(sent.tolist()) == list(range(ids[s].size))  # every pair once
        for d, pairs in enumerate(mine.sent_pairs):
            assert (ids[s].reshape(-1)[pairs] // epr == d).all()
        assert mine.send_rows.tolist() == [len(p) for p in mine.sent_pairs]


def test_all_tokens_to_one_ranks_experts_and_ranks_that_receive_nothing():
    experts = 8
    # Every rank routes only to experts 2 and 3 (rank 1's): ranks 0, 2, 3 receive nothing.
    ids = [np.tile(np.array([[3, 2]], np.int32), (t, 1)) for t in (5, 0, 1, 7)]
    traffic = dispatch_model(ids, experts)
    assert [len(t.received) for t in traffic] == [0, 26, 0, 0]
    assert traffic[1].recv_counts.tolist() == [[5, 5], [0, 0], [1, 1], [7, 7]]
    for s, t in enumerate(traffic):
        assert t.send_rows.tolist() == [0, 2 * ids[s].shape[0], 0, 0]
    # Rank 1's rows: source by source, expert 2 before 3, tokens in order.
    got = traffic[1].received
    assert got[:5, 1].tolist() == [1, 3, 5, 7, 9] and got[5:10, 1].tolist() == [0, 2, 4, 6, 8]


def test_dispatch_model_refuses_ids_out_of_range():
    with pytest.raises(ValueError, match=r"rank 1 routes to an expert id outside \[0, 4\)"):
        dispatch_model([np.zeros((2, 1), np.int32), np.full((2, 1), 4, np.int32)], 4)


@pytest.mark.parametrize(
    "ranks,kind,tokens",
    [
        (1, "uniform", (33,)),
        (2, "uniform", (40, 25)),
        (2, "skewed", (64, 1)),
        (4, "uniform", (0, 1, 17, 30)),
        (4, "skewed", (50, 0, 0, 9)),
        (8, "uniform", (3, 1, 0, 4, 9, 2, 0, 12)),
    ],
)
def test_forward_model_equals_one_gpu_layer(ranks, kind, tokens):
    rng = np.random.default_rng(sum(tokens) + ranks)
    experts, k, hidden = 16, 3, 12
    w1, w2 = _layer(rng, experts, hidden)
    routing = [_routing(rng, t, experts, k, kind) for t in tokens]
    xs = [rng.standard_normal((t, hidden)) for t in tokens]
    outs = forward_model(xs, [r[0] for r in routing], [r[1] for r in routing], w1, w2)
    for r, (x, (ids, w), out) in enumerate(zip(xs, routing, outs)):
        ref = moe_forward_ref(x, ids, w, w1, w2)
        assert out.shape == (tokens[r], hidden)
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12, err_msg=f"rank {r}")


def test_forward_model_all_to_one_rank_and_no_weights():
    rng = np.random.default_rng(3)
    experts, hidden = 8, 6
    w1, w2 = _layer(rng, experts, hidden, inter=3)
    ids = [np.full((t, 2), 7, np.int32) for t in (4, 3)]  # expert 7 twice: a repeat, rank 1's expert
    ids[0][:, 1] = 6
    xs = [rng.standard_normal((t, hidden)) for t in (4, 3)]
    outs = forward_model(xs, ids, None, w1, w2)
    for x, i, out in zip(xs, ids, outs):
        np.testing.assert_allclose(out, moe_forward_ref(x, i, None, w1, w2), rtol=1e-12, atol=1e-12)


def test_forward_model_detects_a_wrong_placement():
    """The model must be able to fail: an expert function that ignores which
    rank computes makes no difference, but rows landing at a wrong offset do."""
    rng = np.random.default_rng(4)
    experts, hidden = 4, 5
    w1, w2 = _layer(rng, experts, hidden, inter=2)
    ids = [np.array([[0, 3], [1, 2]], np.int32), np.array([[3, 0]], np.int32)]
    xs = [rng.standard_normal((2, hidden)), rng.standard_normal((1, hidden))]
    outs = forward_model(xs, ids, None, w1, w2, expert_fn=lambda rows, e: rows * (e + 1))
    # Expert e scales by e + 1: token rows come back weighted by the sum of (e + 1) of their choices.
    np.testing.assert_allclose(outs[0], xs[0] * np.array([[5.0], [5.0]]))
    np.testing.assert_allclose(outs[1], xs[1] * 5.0)
    ids_bad = [np.array([[0, 3], [1, 2]], np.int32), np.array([[3, 1]], np.int32)]
    outs = forward_model(xs, ids_bad, None, w1, w2, expert_fn=lambda rows, e: rows * (e + 1))
    assert not np.allclose(outs[1], xs[1] * 5.0)


def test_layouts_are_int64_whatever_the_counts_type():
    # Pins int64 layouts: the layer turns rows and offsets into byte spans
    # (rows * hidden * itemsize), which pass 2^31 at a few hundred thousand
    # rows; counts copied from the GPU may be int32.
    where = placement(4, 2)
    counts = np.array([150_000, 50_000, 0, 1], dtype=np.int32)
    rows, offsets = send_layout(counts, where)
    recv_rows, recv_offsets, local = receive_layout(counts.reshape(2, 2))
    for got in (rows, offsets, recv_rows, recv_offsets):
        assert got.dtype == np.int64
    row_bytes = 7168 * 2  # a DeepSeek-V3 row of bfloat16
    assert int(offsets[1] * row_bytes) == 200_000 * 14_336 > 2**31
    assert int(recv_offsets[1] * row_bytes) == 200_000 * 14_336
    assert local.tolist() == [0] * 150_000 + [1] * 50_000 + [1]


def test_forward_model_hands_experts_float64_rows():
    # Pins the float64 play: rows of float16 inputs reach expert_fn as float64
    # (300^2 overflows float16, not float64).
    ids = [np.array([[0], [1]], np.int32)]
    xs = [np.full((2, 3), 300.0, np.float16)]
    w1, w2 = np.zeros((2, 3, 2)), np.zeros((2, 1, 3))
    (out,) = forward_model(xs, ids, None, w1, w2, expert_fn=lambda rows, e: rows * rows)
    assert out.tolist() == [[90_000.0] * 3] * 2


def test_forward_model_checks_the_plan_it_plays(monkeypatch):
    # Pins forward_model's check of each received row: a row for a local
    # expert past the rank's block (its owner right) is refused.
    from cublas_grouped.distributed import plan as plan_module

    real = plan_module.dispatch_model

    def off_by_one(ids_per_rank, num_experts):
        traffic = real(ids_per_rank, num_experts)
        traffic[0].received[0, 3] = 2  # rank 0 owns local experts 0 and 1
        return traffic

    monkeypatch.setattr(plan_module, "dispatch_model", off_by_one)
    ids = [np.array([[0], [1]], np.int32), np.array([[2]], np.int32)]
    xs = [np.ones((2, 3)), np.ones((1, 3))]
    w1, w2 = np.zeros((4, 3, 2)), np.zeros((4, 1, 3))
    with pytest.raises(AssertionError):
        forward_model(xs, ids, None, w1, w2, expert_fn=lambda rows, e: rows)


def test_send_order_of_int32_ids_past_two_to_the_31():
    # Pins the int64 sort key expert * pairs + pair: with int32 ids (as the GPU
    # routes) and 2.2 million pairs, expert 1000's key passes 2^31.
    pairs = 2_200_000
    ids = np.zeros(pairs, np.int32)
    ids[0], ids[1] = 1000, 999
    order = send_order(ids, 1024)
    assert order[:3].tolist() == [2, 3, 4] and order[-2:].tolist() == [1, 0]


def test_dispatch_model_reports_each_ranks_send_order():
    rng = np.random.default_rng(5)
    ids = [_routing(rng, t, 8, 2, "uniform")[0] for t in (5, 0, 3)]
    ids.append(_routing(rng, 4, 8, 2, "skewed")[0])
    for r, traffic in enumerate(dispatch_model(ids, 8)):
        assert traffic.order.tolist() == send_order(ids[r], 8).tolist(), r
