"""ExpertParallelMoE's host logic on the CPU: R threads play R ranks.

The layer's own code runs unchanged; below it, NumPy stands in for CuPy, a
mailbox between threads for NCCL (every receive checks that its size equals
what the peer sent), and float64 NumPy for the local experts and the combine
kernel. So this checks everything the layer decides on the host (counts,
send order, offsets, what goes to whom and comes back where, the agreement
checks and refusals) against the single-GPU float64 layer, with no GPU.
"""

from __future__ import annotations

import collections
import ctypes
import threading
import types

import numpy as np
import pytest

from cublas_grouped.distributed import ExpertParallelMoE, FixedCapacityExpertParallelMoE, dispatch_model
from cublas_grouped.distributed import fixed_capacity as fixed_mod
from cublas_grouped.distributed import layer as layer_mod
from cublas_grouped.testing import moe_forward_ref


class Arr(np.ndarray):
    """A NumPy array that answers ``.data.ptr`` like a CuPy array."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _arr(a):
    return np.ascontiguousarray(a).view(Arr)


class Dev:
    """What the caller passes: host memory published as a 'GPU' array on device 0."""

    device = types.SimpleNamespace(id=0)

    def __init__(self, host):
        self.host = np.ascontiguousarray(host)

    @property
    def __cuda_array_interface__(self):
        h = self.host
        return {
            "shape": h.shape,
            "typestr": h.dtype.str,
            "data": (h.ctypes.data, False),
            "strides": None,
            "version": 3,
        }


class _Stream:
    ptr = 0

    def record(self):
        return types.SimpleNamespace(done=True)

    def wait_event(self, event):  # the threads run every step at once: nothing to order
        assert event.done

    def synchronize(self):  # nor anything to wait for (the layers' constructors ask)
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Device:
    def __init__(self, _id):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fake_cupy():
    m = types.ModuleType("cupy")
    m.ndarray = Arr
    for name in ("int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32"):
        setattr(m, name, getattr(np, name))

    def wrap(fn):
        return lambda *a, **k: _arr(fn(*a, **k))

    for name in (
        "where",
        "searchsorted",
        "arange",
        "diff",
        "empty",
        "empty_like",
        "concatenate",
        "zeros",
        "ones",
        "cumsum",
        "maximum",
    ):
        setattr(m, name, wrap(getattr(np, name)))
    m.argsort = wrap(lambda a: np.argsort(a, kind="stable"))
    m.take = wrap(np.take)
    m.asarray = lambda obj, dtype=None: _arr(obj.host if isinstance(obj, Dev) else np.asarray(obj, dtype))
    m.asnumpy = lambda a: np.array(a)
    m.cuda = types.SimpleNamespace(
        Device=_Device,
        get_current_stream=_Stream,
        runtime=types.SimpleNamespace(streamIsCapturing=lambda s: 0),
    )
    return m


class World:
    """The 'NCCL' of R threads: a mailbox and a barrier."""

    def __init__(self, size):
        self.size, self.barrier = size, threading.Barrier(size, timeout=20)
        self.box, self.reduce = {}, {}


class FakeGroup:
    def __init__(self, world, rank):
        self.world, self.rank, self.world_size, self.device_id = world, rank, world.size, 0

    def all_reduce(self, buf, op, stream_ptr):
        assert op == "max"
        self.world.reduce[self.rank] = np.array(buf)
        self.world.barrier.wait()
        result = np.max(np.stack([self.world.reduce[r] for r in range(self.world_size)]), axis=0)
        self.world.barrier.wait()
        buf[...] = result

    def exchange(self, send_ptr, send_spans, recv_ptr, recv_spans, stream_ptr):
        for peer, (off, count) in enumerate(send_spans):
            if count:
                self.world.box[(self.rank, peer)] = ctypes.string_at(send_ptr + int(off), int(count))
        self.world.barrier.wait()
        for peer, (off, count) in enumerate(recv_spans):
            if count:
                data = self.world.box.pop((peer, self.rank))
                assert len(data) == count, (
                    f"rank {self.rank} expects {count} bytes from {peer}, got {len(data)}"
                )
                ctypes.memmove(recv_ptr + int(off), data, int(count))
            else:
                assert (peer, self.rank) not in self.world.box, (
                    f"rank {peer} sent what rank {self.rank} skips"
                )
        self.world.barrier.wait()

    def wait(self, event, what, timeout=None):
        assert event.done
        STEPS[threading.get_ident()].append(what)


# Per rank thread: the group's waits and the local experts' calls, in order.
STEPS = collections.defaultdict(list)


def _local_experts(x, ids, weights, w1, w2, b1=None, b2=None, **kw):
    assert weights is None and ids.shape[1] == 1
    STEPS[threading.get_ident()].append("experts")
    b1, b2 = (None if b is None else np.asarray(b) for b in (b1, b2))
    out = moe_forward_ref(np.asarray(x), np.asarray(ids), None, np.asarray(w1), np.asarray(w2), b1, b2)
    return _arr(out.astype(x.dtype))


def _combine(stream, arch, y, pair_to_row, weights, ids, bias, tokens, k, out):
    """combine.cu's contract: row -1 adds nothing; others are weighted and summed in choice order."""
    y, rows = np.asarray(y, np.float64), np.asarray(pair_to_row).reshape(tokens, k)
    w = np.ones((tokens, k)) if weights is None else np.asarray(weights, np.float64)
    acc = np.zeros(out.shape)
    for j in range(k):
        take = rows[:, j] >= 0
        acc[take] += w[take, j, None] * y[rows[take, j]]
    out[...] = acc


PAIRS_PER_BLOCK = 4  # small blocks, so that the sort's blocks matter at these sizes


def _block_histogram(stream, arch, ids, pairs, experts, blocks):
    flat = np.asarray(ids).reshape(-1)
    blocks[...] = 0
    for p in range(pairs):
        if 0 <= flat[p] < experts:
            blocks[p // PAIRS_PER_BLOCK, flat[p]] += 1


def _column_scan(stream, arch, blocks, nb, experts, counts):
    counts[...] = blocks.sum(axis=0)
    blocks[...] = np.cumsum(blocks, axis=0) - blocks


def _assign_rows(stream, arch, ids, pairs, experts, blocks, offsets, p2r, r2p, *, dropped=None):
    """The kernel's contract (dispatch.cu): row = offsets[e] + earlier pairs of e; -1 when dropped."""
    flat = np.asarray(ids).reshape(-1)
    for p in range(pairs):
        e = flat[p]
        if 0 <= e < experts:
            b = p // PAIRS_PER_BLOCK
            row = offsets[e] + blocks[b, e] + np.count_nonzero(flat[b * PAIRS_PER_BLOCK : p] == e)
            p2r[p], r2p[row] = row, p
        else:
            p2r[p] = -1
            dropped[0] += 1


class _LocalFixed:
    """FixedCapacityMoE's contract: ids outside [0, E) add nothing (a zero row)."""

    def __init__(self, w1, w2, top_k, max_tokens, **kw):
        self.w1, self.w2 = np.asarray(w1.host), np.asarray(w2.host)
        self.out = _arr(np.full((max_tokens, self.w1.shape[1]), np.nan, np.float32))

    def forward(self, x, ids, weights, *, stream=None):
        rows = np.asarray(x)
        flat = np.asarray(ids).reshape(-1)
        for i, e in enumerate(flat):
            if 0 <= e < self.w1.shape[0]:
                one = moe_forward_ref(
                    rows[i : i + 1], np.zeros((1, 1), np.int32), None, self.w1[e : e + 1], self.w2[e : e + 1]
                )
                self.out[i] = one[0]
            else:
                self.out[i] = 0
        return self.out[: len(flat)]


def _host_as_array(obj, name="array"):
    if isinstance(obj, Arr):
        return obj
    return _arr(obj.host if isinstance(obj, Dev) else obj.obj.host if hasattr(obj, "obj") else obj)


@pytest.fixture
def fake_stack(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    res = types.SimpleNamespace(cupy_stream=_Stream(), launch_stream=None, stream=0)
    monkeypatch.setattr(layer_mod, "stream_resources", lambda device, stream: res)
    monkeypatch.setattr(layer_mod, "kernel_arch", lambda res: "sm_90")
    monkeypatch.setattr(layer_mod, "moe_forward", _local_experts)
    monkeypatch.setattr(layer_mod, "K", types.SimpleNamespace(combine_rows=_combine))
    monkeypatch.setattr(fixed_mod, "stream_resources", lambda device, stream: res)
    monkeypatch.setattr(fixed_mod, "kernel_arch", lambda res: "sm_90")
    monkeypatch.setattr(fixed_mod, "FixedCapacityMoE", _LocalFixed)
    kernels = {
        "combine_rows": _combine,
        "block_histogram": _block_histogram,
        "column_scan": _column_scan,
        "assign_rows": _assign_rows,
        "num_pair_blocks": lambda pairs: max(1, -(-pairs // PAIRS_PER_BLOCK)),
    }
    monkeypatch.setattr(fixed_mod, "K", types.SimpleNamespace(**kernels))
    # The real as_cupy wraps foreign device memory as CuPy memory; here it is host memory.
    for mod in (layer_mod, fixed_mod):
        monkeypatch.setattr(mod, "as_cupy", _host_as_array)


def _run(world_size, fn):
    """fn(group) on world_size threads; returns each rank's result or exception."""
    world, results = World(world_size), [None] * world_size

    def body(rank):
        try:
            results[rank] = fn(FakeGroup(world, rank))
        except (ValueError, TypeError) as exc:  # a refusal: the other ranks refuse too
            results[rank] = exc
        except Exception as exc:  # anything else: free the other ranks from the barrier
            results[rank] = exc
            world.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _problem(rng, world, tokens, experts, k, hidden=16, inter=6, kind="uniform"):
    w1 = rng.standard_normal((experts, hidden, 2 * inter)).astype(np.float32) * hidden**-0.5
    w2 = rng.standard_normal((experts, inter, hidden)).astype(np.float32) * inter**-0.5
    data = []
    for r in range(world):
        t = tokens[r % len(tokens)]
        if kind == "last_rank":
            pool = np.arange(experts - experts // world, experts)
        else:
            pool = np.arange(experts)
        p = (
            None
            if kind != "skewed"
            else np.exp(-np.arange(experts) / 2.0) / np.exp(-np.arange(experts) / 2.0).sum()
        )
        # The last rank alone may hold fewer than k experts: repeats (one expert twice) are allowed then.
        repeat = kind == "last_rank"
        ids = np.array([rng.choice(pool, k, replace=repeat, p=p) for _ in range(t)], np.int32).reshape(t, k)
        w = rng.random((t, k)).astype(np.float32)
        data.append((rng.standard_normal((t, hidden)).astype(np.float32), ids, w))
    return w1, w2, data


@pytest.mark.parametrize(
    "world,tokens,kind",
    [(1, (9,), "uniform"), (2, (40, 25), "skewed"), (4, (0, 1, 17, 30), "uniform"), (4, (8, 3), "last_rank")],
)
def test_threads_as_ranks_equal_the_one_gpu_layer(fake_stack, world, tokens, kind):
    rng = np.random.default_rng(world * 100 + sum(tokens))
    experts, k = 8, 3
    w1, w2, data = _problem(rng, world, tokens, experts, k, kind=kind)
    epr = experts // world

    def rank_fn(group):
        r = group.rank
        layer = ExpertParallelMoE(
            group, Dev(w1[r * epr : (r + 1) * epr]), Dev(w2[r * epr : (r + 1) * epr]), experts, k
        )
        x, ids, w = data[r]
        out = layer(Dev(x), Dev(ids), Dev(w))
        return np.array(out), {key: v.tolist() for key, v in layer.last_traffic.items()}

    results = _run(world, rank_fn)
    model = dispatch_model([d[1] for d in data], experts)
    for r, got in enumerate(results):
        assert not isinstance(got, Exception), f"rank {r}: {got!r}"
        out, traffic = got
        x, ids, w = data[r]
        np.testing.assert_allclose(out, moe_forward_ref(x, ids, w, w1, w2), rtol=2e-5, atol=2e-6)
        assert traffic["sent"] == model[r].send_rows.tolist()
        assert traffic["received"] == model[r].recv_counts.sum(axis=1).tolist()
    if kind == "last_rank":
        assert all(results[r][1]["received"] == [0] * world for r in range(world - 1))


def test_refusals_reach_every_rank(fake_stack):
    rng = np.random.default_rng(5)
    world, experts, k = 3, 6, 2
    w1, w2, data = _problem(rng, world, (5,), experts, k)

    def layer_for(group, top_k=k):
        r = group.rank
        return ExpertParallelMoE(
            group, Dev(w1[2 * r : 2 * r + 2]), Dev(w2[2 * r : 2 * r + 2]), experts, top_k
        )

    def bad_id(group):
        x, ids, w = data[group.rank]
        ids = ids.copy()
        if group.rank == 1:
            ids[2, 0] = -1
        return layer_for(group)(Dev(x), Dev(ids), None)

    for r, got in enumerate(_run(world, bad_id)):
        assert isinstance(got, ValueError), got
        assert str(got).startswith(
            f"rank {r}: topk_ids on ranks [1] name experts outside [0, 6) ([0, 1, 0] pairs)"
        )

    def mismatched_k(group):
        x, ids, w = data[group.rank]
        top_k = 1 if group.rank == 2 else k
        return layer_for(group, top_k)(Dev(x), Dev(ids[:, :top_k].copy()), None)

    for r, got in enumerate(_run(world, mismatched_k)):
        assert isinstance(got, ValueError) and str(got).startswith(
            f"rank {r}: the ranks' layers or inputs disagree"
        ), got
        assert "disagree on experts per token k (this rank:" in str(got)

    def refused_on_rank_0(group):
        x, ids, w = data[group.rank]
        if group.rank == 0:
            x = np.zeros((5, 3), np.float32)
        return layer_for(group)(Dev(x), Dev(ids), Dev(w))

    got = _run(world, refused_on_rank_0)
    assert str(got[0]) == "x has 3 columns; the layer's hidden size is 16"
    for r in (1, 2):
        assert str(got[r]) == f"rank {r}: another rank refused its arguments to ExpertParallelMoE.forward"


@pytest.mark.parametrize(
    "world,tokens,kind", [(2, (12, 5), "skewed"), (4, (0, 1, 9, 6), "uniform"), (1, (7,), "uniform")]
)
def test_fixed_capacity_without_overflow_equals_the_one_gpu_layer(fake_stack, world, tokens, kind):
    rng = np.random.default_rng(world * 7 + sum(tokens))
    experts, k = 8, 3
    w1, w2, data = _problem(rng, world, tokens, experts, k, kind=kind)
    epr, max_tokens = experts // world, max(tokens)

    def rank_fn(group):
        r = group.rank
        layer = FixedCapacityExpertParallelMoE(
            group,
            Dev(w1[r * epr : (r + 1) * epr]),
            Dev(w2[r * epr : (r + 1) * epr]),
            experts,
            k,
            capacity=max_tokens * k,  # never overflows
            max_tokens=max_tokens,
        )
        x, ids, w = data[r]
        outs = [np.array(layer(Dev(x), Dev(ids), Dev(w))) for _ in range(2)]
        return outs, layer.overflow_pairs(), layer.dropped_pairs()

    for r, got in enumerate(_run(world, rank_fn)):
        assert not isinstance(got, Exception), f"rank {r}: {got!r}"
        (first, second), overflow, dropped = got
        x, ids, w = data[r]
        np.testing.assert_allclose(first, moe_forward_ref(x, ids, w, w1, w2), rtol=2e-5, atol=2e-6)
        assert first.tobytes() == second.tobytes() and overflow == 0 and dropped == 0


@pytest.mark.parametrize("policy", ["nan", "drop"])
def test_fixed_capacity_counts_overflow_and_bad_ids(fake_stack, policy):
    rng = np.random.default_rng(11)
    world, experts, k, hidden = 2, 4, 2, 16
    w1, w2, _ = _problem(rng, world, (1,), experts, k, hidden=hidden)
    # Rank 0: 4 tokens, all to experts 2 and 3 (rank 1's): 8 pairs for rank 1, capacity 5 -> 3 overflow
    # (the last three in send order: expert 3's tokens 1, 2, 3). Rank 1: one id out of range.
    ids = [np.array([[2, 3]] * 4, np.int32), np.array([[0, 9], [1, 2]], np.int32)]
    xs = [
        rng.standard_normal((4, hidden)).astype(np.float32),
        rng.standard_normal((2, hidden)).astype(np.float32),
    ]

    def rank_fn(group):
        r = group.rank
        layer = FixedCapacityExpertParallelMoE(
            group,
            Dev(w1[2 * r : 2 * r + 2]),
            Dev(w2[2 * r : 2 * r + 2]),
            experts,
            k,
            capacity=5,
            max_tokens=4,
            on_overflow=policy,
        )
        out = np.array(layer(Dev(xs[r]), Dev(ids[r]), None))
        counts = layer.overflow_pairs(), layer.dropped_pairs()
        try:
            layer.check_overflow()
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        return out, counts, message, layer.overflow_pairs(reset=True), layer.overflow_pairs()

    (out0, counts0, msg0, before0, after0), (out1, counts1, msg1, _, _) = _run(world, rank_fn)
    assert counts0 == (3, 0) and counts1 == (0, 1) and (before0, after0) == (3, 0)
    assert msg0.startswith(
        "rank 0: 3 pairs found no slot (capacity 5 rows per rank pair) and 0 named an expert"
    )
    assert msg1.startswith(
        "rank 1: 0 pairs found no slot (capacity 5 rows per rank pair) and 1 named an expert"
    )
    ref_full = moe_forward_ref(xs[0], ids[0], None, w1, w2)
    np.testing.assert_allclose(out0[0], ref_full[0], rtol=2e-5, atol=2e-6)  # token 0 kept both choices
    only_expert_2 = moe_forward_ref(xs[0], ids[0][:, :1].copy(), None, w1, w2)
    if policy == "nan":
        assert np.isnan(out0[1:]).all(axis=1).all()
    else:
        np.testing.assert_allclose(out0[1:], only_expert_2[1:], rtol=2e-5, atol=2e-6)
    # Rank 1: the bad id adds nothing; the rest is exact.
    keep = moe_forward_ref(xs[1], np.array([[0], [1]], np.int32), None, w1, w2)
    keep[1] += moe_forward_ref(xs[1][1:], np.array([[2]], np.int32), None, w1, w2)[0]
    np.testing.assert_allclose(out1, keep, rtol=2e-5, atol=2e-6)


def test_fixed_capacity_refuses_bad_construction(fake_stack):
    rng = np.random.default_rng(1)
    w1, w2, _ = _problem(rng, 2, (1,), 4, 2)

    def build(group, **kw):
        r = group.rank
        args = {"capacity": 4, "max_tokens": 2, **kw}
        return FixedCapacityExpertParallelMoE(
            group, Dev(w1[2 * r : 2 * r + 2]), Dev(w2[2 * r : 2 * r + 2]), 4, 2, **args
        )

    for kw, message in (
        ({"capacity": 0}, "capacity must be a positive int; got 0"),
        ({"max_tokens": True}, "max_tokens must be a positive int; got True"),
        ({"on_overflow": "clip"}, "on_overflow must be one of ['drop', 'nan']; got 'clip'"),
    ):
        got = _run(2, lambda g, kw=kw: build(g, **kw))
        assert all(isinstance(e, ValueError) and str(e) == message for e in got), got
    got = _run(2, lambda g: build(g, capacity=4 + g.rank))
    for r, e in enumerate(got):
        assert isinstance(e, ValueError) and str(e).startswith(
            f"rank {r}: the ranks' layers or inputs disagree"
        ), e
        assert "disagree on capacity per rank pair" in str(e)
    layer = _run(
        1, lambda g: FixedCapacityExpertParallelMoE(g, Dev(w1), Dev(w2), 4, 2, capacity=4, max_tokens=2)
    )[0]
    with pytest.raises(ValueError, match="x has 3 tokens but this layer was built for max_tokens=2"):
        layer(Dev(np.zeros((3, 16), np.float32)), Dev(np.zeros((3, 2), np.int32)), None)


@pytest.mark.parametrize("world,biases", [(2, "both"), (4, "b2"), (4, "b1")])
def test_biases_equal_the_one_gpu_layer(fake_stack, world, biases):
    """Each rank passes its experts' biases: the layer equals the one-GPU layer
    with all biases (b2 weighted with its expert's output, as moe_forward)."""
    rng = np.random.default_rng(world * 7)
    experts, k = 8, 2
    w1, w2, data = _problem(rng, world, (11, 5, 0, 20), experts, k)
    b1 = rng.standard_normal((experts, w1.shape[2])).astype(np.float32) if biases in ("both", "b1") else None
    b2 = rng.standard_normal((experts, w1.shape[1])).astype(np.float32) if biases in ("both", "b2") else None
    epr = experts // world

    def rank_fn(group):
        r, mine = group.rank, slice(group.rank * epr, (group.rank + 1) * epr)
        layer = ExpertParallelMoE(
            group, Dev(w1[mine]), Dev(w2[mine]), experts, k,
            b1=None if b1 is None else Dev(b1[mine]), b2=None if b2 is None else Dev(b2[mine]),
        )  # fmt: skip
        x, ids, w = data[r]
        return np.array(layer(Dev(x), Dev(ids), Dev(w)))

    for r, got in enumerate(_run(world, rank_fn)):
        assert not isinstance(got, Exception), f"rank {r}: {got!r}"
        x, ids, w = data[r]
        np.testing.assert_allclose(got, moe_forward_ref(x, ids, w, w1, w2, b1, b2), rtol=2e-5, atol=2e-6)


def test_ranks_that_disagree_on_biases_refuse(fake_stack):
    rng = np.random.default_rng(3)
    experts, k = 4, 2
    w1, w2, data = _problem(rng, 2, (6, 6), experts, k)
    b2 = rng.standard_normal((experts, w1.shape[1])).astype(np.float32)

    def rank_fn(group):
        r, mine = group.rank, slice(group.rank * 2, group.rank * 2 + 2)
        bias = Dev(b2[mine]) if r == 0 else None  # only rank 0 has b2
        layer = ExpertParallelMoE(group, Dev(w1[mine]), Dev(w2[mine]), experts, k, b2=bias)
        x, ids, w = data[r]
        return layer(Dev(x), Dev(ids), Dev(w))

    for r, got in enumerate(_run(2, rank_fn)):
        assert isinstance(got, ValueError) and "disagree on biases" in str(got), f"rank {r}: {got!r}"


def test_bias_shape_refused_at_construction(fake_stack):
    w1 = np.zeros((2, 16, 12), np.float32)
    w2 = np.zeros((2, 6, 16), np.float32)

    def rank_fn(group):
        return ExpertParallelMoE(group, Dev(w1), Dev(w2), 4, 2, b2=Dev(np.zeros((4, 16), np.float32)))

    got = _run(2, rank_fn)
    assert all(isinstance(g, ValueError) and "b2 must be" in str(g) for g in got), got


def test_experts_wait_for_the_dispatch_with_the_group_timeout(fake_stack):
    """The local experts' moe_forward synchronizes without a timeout: before it
    the layer waits for the dispatch through the group (which polls NCCL's
    error and times out), so a peer lost after the counts exchange raises."""
    rng = np.random.default_rng(17)
    experts, k, world = 8, 2, 2
    w1, w2, data = _problem(rng, world, (12, 7), experts, k)
    epr = experts // world
    STEPS.clear()

    def rank_fn(group):
        r = group.rank
        layer = ExpertParallelMoE(
            group, Dev(w1[r * epr : (r + 1) * epr]), Dev(w2[r * epr : (r + 1) * epr]), experts, k
        )
        x, ids, w = data[r]
        layer(Dev(x), Dev(ids), Dev(w))
        return list(STEPS[threading.get_ident()])

    for r, steps in enumerate(_run(world, rank_fn)):
        assert not isinstance(steps, Exception), f"rank {r}: {steps!r}"
        assert "experts" in steps, steps
        first = steps.index("experts")
        assert "the dispatch exchange" in steps[:first], steps
        assert steps.index("the counts exchange") < steps.index("the dispatch exchange"), steps
