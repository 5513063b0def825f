"""``moe_forward``'s default path on SM 9.0 (the Hopper kernel step) waits
for nothing: it can be captured in a CUDA graph at any token count, decode
and prefill alike, and the graph replays new tokens and routing bit for bit
as the eager call computes them; ids outside [0, E) in a replay reach the
host through the graph's own copy of the count (moe/dropped_pairs.py)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random

import cublas_grouped as cg
from cublas_grouped import testing as ref

pytestmark = pytest.mark.gpu

E, K, H, INTER = 32, 4, 256, 128


def _sm90() -> bool:
    return tuple(cg.device_info().sm) == (9, 0)


def _routing(rng, tokens):
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)]).astype(np.int32)
    return ids, (rng.random((tokens, K)) + 0.05).astype(np.float32)


@pytest.mark.parametrize("tokens", [1, 7, 300, 2048])
def test_default_layer_captured_and_replayed_with_new_routing(tokens):
    import cupy

    if not _sm90():
        pytest.skip("the sync-free default path runs on SM 9.0")
    rng = np.random.default_rng(tokens)
    bf16 = ml_dtypes.bfloat16
    w1, w1_64 = device_random(rng, (E, H, 2 * INTER), bf16, scale=H**-0.5)
    w2, w2_64 = device_random(rng, (E, INTER, H), bf16, scale=INTER**-0.5)
    x = cupy.empty((tokens, H), dtype=bf16)
    ids = cupy.empty((tokens, K), dtype=cupy.int32)
    weights = cupy.empty((tokens, K), dtype=cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)

    def fill():
        x_new, x64 = device_random(rng, (tokens, H), bf16)
        ids_h, w_h = _routing(rng, tokens)
        cupy.cuda.Device().synchronize()  # x_new was made on another stream
        with stream:
            cupy.copyto(x, x_new)
            ids.set(ids_h, stream=stream)
            weights.set(w_h, stream=stream)
        return x64, ids_h, w_h

    fill()
    with stream:
        cg.moe_forward(x, ids, weights, w1, w2)  # eager first: compiles and prepares
        stream.begin_capture()
        out = cg.moe_forward(x, ids, weights, w1, w2)
        graph = stream.end_capture()
    for replay in range(3):
        x64, ids_h, w_h = fill()
        with stream:
            out.fill(np.nan)
        graph.launch(stream)
        with stream:
            eager = cg.moe_forward(x, ids, weights, w1, w2)
        stream.synchronize()
        assert (out.view(np.uint16) == eager.view(np.uint16)).all(), f"replay {replay}"
        expected = ref.moe_forward_ref(x64, ids_h, w_h.astype(np.float64), w1_64, w2_64)
        check_close(out, expected, 2e-2, f"T={tokens} replay {replay}")
    # A replay with ids outside [0, E): the bad pairs add nothing, and the
    # graph's copy of the count lets the check raise.
    x64, ids_h, w_h = fill()
    ids_h[0, 0], ids_h[-1, -1] = E, -1
    with stream:
        ids.set(ids_h, stream=stream)
    graph.launch(stream)
    with pytest.raises(
        ValueError,
        match=rf"held 2 ids outside \[0, E\) in moe_forward calls on this stream \(E of the layers .*\b{E}\b",
    ):
        cg.check_expert_ids(stream)
    kept = (ids_h >= 0) & (ids_h < E)
    expected = ref.moe_forward_ref(x64, np.where(kept, ids_h, 0), np.where(kept, w_h, 0.0), w1_64, w2_64)
    check_close(out, expected, 2e-2, f"T={tokens}, the good pairs of a replay with bad ids")
    cg.check_expert_ids(stream)  # reported once
