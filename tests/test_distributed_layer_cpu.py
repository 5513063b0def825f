"""ExpertParallelMoE's host logic on the CPU: R threads play R ranks.

The layer's own code runs unchanged; below it, NumPy stands in for CuPy, a
mailbox between threads for NCCL (every receive checks that its size equals
what the peer sent), and float64 NumPy for the local experts and the combine
kernel. So this checks everything the layer decides on the host (counts,
send order, offsets, what goes to whom and comes back where, the agreement
checks and refusals) against the single-GPU float64 layer, with no GPU.
"""

from __future__ import annotations

import ctypes
import threading
import types

import numpy as np
import pytest

from cublas_grouped.distributed import ExpertParallelMoE, dispatch_model
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
    for name in ("int32", "int64", "uint8", "float32"):
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
    ):
        setattr(m, name, wrap(getattr(np, name)))
    m.argsort = wrap(lambda a: np.argsort(a, kind="stable"))
    m.take = wrap(np.take)
    m.asarray = lambda obj, dtype=None: _arr(obj.host if isinstance(obj, Dev) else np.asarray(obj, dtype))
    m.asnumpy = lambda a: np.array(a)
    m.cuda = types.SimpleNamespace(Device=_Device, get_current_stream=_Stream)
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


def _local_experts(x, ids, weights, w1, w2, **kw):
    assert weights is None and ids.shape[1] == 1
    return _arr(
        moe_forward_ref(np.asarray(x), np.asarray(ids), None, np.asarray(w1), np.asarray(w2)).astype(x.dtype)
    )


def _combine(stream, arch, y, pair_to_row, weights, ids, bias, tokens, k, out):
    y, rows = np.asarray(y, np.float64), np.asarray(pair_to_row).reshape(tokens, k)
    w = np.ones((tokens, k)) if weights is None else np.asarray(weights, np.float64)
    acc = np.zeros(out.shape)
    for j in range(k):
        acc += w[:, j, None] * y[rows[:, j]]
    out[...] = acc


@pytest.fixture
def fake_stack(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    res = types.SimpleNamespace(cupy_stream=_Stream(), launch_stream=None)
    monkeypatch.setattr(layer_mod, "stream_resources", lambda device, stream: res)
    monkeypatch.setattr(layer_mod, "kernel_arch", lambda res: "sm_90")
    monkeypatch.setattr(layer_mod, "moe_forward", _local_experts)
    monkeypatch.setattr(layer_mod, "K", types.SimpleNamespace(combine_rows=_combine))


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
