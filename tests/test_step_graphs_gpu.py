"""Eager fixed-capacity steps replayed from the layer's own CUDA graphs
(``FixedCapacityMoE(graphs=True)``, the default): the same bits as launching
every kernel, whatever arrays, streams and token counts the calls bring."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_util import check_close, device_random

import cublas_grouped as cg
from cublas_grouped import testing as ref

pytestmark = pytest.mark.gpu

E, K, H, INTER = 16, 4, 128, 64
STEPS = [8, 1, 8, 5, 32, 5, 1, 32, 17, 17, 8]


def _layers(rng, **kw):
    w1, w1_64 = device_random(rng, (E, H, 2 * INTER), np.float32, scale=H**-0.5)
    w2, w2_64 = device_random(rng, (E, INTER, H), np.float32, scale=INTER**-0.5)
    replay = cg.FixedCapacityMoE(w1, w2, K, max_tokens=32, **kw)
    launch = cg.FixedCapacityMoE(w1, w2, K, max_tokens=32, graphs=False, **kw)
    return replay, launch, (w1, w2), (w1_64, w2_64)


def _routing(rng, tokens, experts=E):
    ids = np.stack([rng.choice(experts, K, replace=False) for _ in range(tokens)]).astype(np.int32)
    return ids, (rng.random((tokens, K)) + 0.05).astype(np.float32)


def test_replayed_steps_equal_launched_steps_bit_for_bit():
    import cupy

    rng = np.random.default_rng(11)
    replay, launch, _, (w1_64, w2_64) = _layers(rng)
    streams = [None, cupy.cuda.Stream(non_blocking=True)]
    for step, tokens in enumerate(STEPS):
        stream = streams[step % 2]
        # Inputs made and outputs copied on the calls' stream: a non-blocking
        # stream is not ordered with the null stream.
        with cupy.cuda.Stream.null if stream is None else stream:
            x, x64 = device_random(rng, (tokens, H), np.float32)  # fresh arrays every call
            ids, w = _routing(rng, tokens)
            ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
            weights = None if step % 4 == 3 else w_d
            a = replay.forward(x, ids_d, weights, stream=stream).copy()
            b = launch.forward(x, ids_d, weights, stream=stream).copy()
        cupy.cuda.Device().synchronize()
        assert (a.view(np.uint32) == b.view(np.uint32)).all(), (step, tokens)
        expected = ref.moe_forward_ref(x64, ids, None if weights is None else w, w1_64, w2_64)
        check_close(a, expected, 1e-5, f"T={tokens} step {step}")
    assert len(replay._graphs._graphs) == len({(t, s % 4 != 3) for s, t in enumerate(STEPS)})


def test_replays_count_dropped_pairs_and_see_weights_changed_in_place():
    import cupy

    rng = np.random.default_rng(12)
    replay, _, (w1, w2), (w1_64, w2_64) = _layers(rng)
    x, x64 = device_random(rng, (6, H), np.float32)
    ids, w = _routing(rng, 6)
    bad = ids.copy()
    bad[0, 0] = E + 3  # outside [0, E): counted, adds nothing
    for _ in range(3):  # first sight (eager, then captured), then two replays
        replay.forward(x, cupy.asarray(bad), cupy.asarray(w))
    assert replay.dropped_pairs(reset=True) == 3
    w2 *= 2  # in place: the graph reads the same memory
    out = replay.forward(x, cupy.asarray(ids), cupy.asarray(w))
    check_close(out, ref.moe_forward_ref(x64, ids, w, w1_64, 2 * w2_64), 1e-5, "weights changed in place")


def test_more_token_counts_than_graphs_kept(monkeypatch):
    import cupy

    from cublas_grouped.moe import step_graphs

    monkeypatch.setattr(step_graphs, "MAX_GRAPHS", 3)
    rng = np.random.default_rng(13)
    replay, _, _, (w1_64, w2_64) = _layers(rng)
    for tokens in [1, 2, 3, 4, 1, 2, 5, 3, 1]:  # the least recently used graph goes first
        x, x64 = device_random(rng, (tokens, H), np.float32)
        ids, w = _routing(rng, tokens)
        out = replay.forward(x, cupy.asarray(ids), cupy.asarray(w))
        check_close(out, ref.moe_forward_ref(x64, ids, w, w1_64, w2_64), 1e-5, f"T={tokens}")
        assert len(replay._graphs._graphs) <= 3
    assert list(replay._graphs._graphs) == [(5, True), (3, True), (1, True)]
