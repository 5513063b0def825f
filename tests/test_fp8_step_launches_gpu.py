"""The FP8 step's prepared, overlapped launches on the GPU (SM 9.0).

The FP8 step replays prepared launches, each a programmatic dependent launch
for steps of at most ``kernel_step.OVERLAP_MAX_PAIRS`` pairs (larger steps
here compare plain with plain). Every kernel waits on the device before
touching what earlier kernels wrote, so the outputs must equal, bit for bit,
those of the same layer launched plainly (``OVERLAP_LAUNCHES`` off):

- six steps back to back on one stream, each with new tokens and routing
  (random, the worst case, every token on the same experts; T alternating
  between T and T // 3), no host synchronization between them, every layer
  buffer NaN-poisoned first; eager, and replayed from the layer's own CUDA
  graphs (captured under each setting);
- T in {1, 5, 16, 64, 200} (k = 8: 200 tokens are 1600 pairs, the four-launch
  placement and its quantize launch, not overlapped), a Qwen3-like shape
  (E = 128, k = 8) and a few-expert one (E = 8, k = 2), the Qwen3-like one
  also with the quantization in launches of its own (``FUSE_QUANTIZE`` off);
- the last step of each against float64 of the FP8 step's arithmetic.

    python3 -m pytest -q -m gpu tests/test_fp8_step_launches_gpu.py
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_util import check_close, wait_for_current_stream
from test_fixed_capacity_gpu import step_routing
from test_fp8_decode_sm90_gpu import BF16, TOL, _bits_equal, _layer, _poison, fp8_step_ref

import cublas_grouped as cg
from cublas_grouped.moe import fp8_step, kernel_step

pytestmark = pytest.mark.gpu

# (name, experts, top_k, hidden, inter, biases, fused quantization)
SHAPES = [
    ("qwen3-like", 128, 8, 256, 128, False, True),
    ("qwen3-like unfused", 128, 8, 256, 128, True, False),
    ("few experts", 8, 2, 384, 256, True, True),
]


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the FP8 kernel step runs on SM 9.0 GPUs only")


def _steps(layer, inputs, stream, overlap: bool):
    """``layer.forward`` on each input back to back on ``stream`` (no sync
    between steps; the layer's buffers poisoned before the first), each output
    copied out on the stream; then one sync."""
    import cupy

    saved = kernel_step.OVERLAP_LAUNCHES
    kernel_step.OVERLAP_LAUNCHES = overlap
    try:
        with stream:
            _poison(layer)
            outs = [cupy.copy(layer.forward(x, ids, w)) for x, ids, w in inputs]
        stream.synchronize()
        return outs
    finally:
        kernel_step.OVERLAP_LAUNCHES = saved


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("tokens", [1, 5, 16, 64, 200])
@pytest.mark.parametrize("name, experts, k, hidden, inter, biases, fuse", SHAPES)
def test_overlapped_fp8_steps_equal_plain_steps_bitwise(
    monkeypatch, name, experts, k, hidden, inter, biases, fuse, tokens, graphs
):
    import cupy

    monkeypatch.setattr(fp8_step, "FUSE_QUANTIZE", fuse)
    rng = np.random.default_rng(tokens + experts)
    (q1, q2), _, ref_ops, (b1, b2) = _layer(rng, experts, hidden, inter, biases)
    inputs, host = [], []
    for step in range(6):
        t = tokens if step % 2 == 0 else max(1, tokens // 3)  # T changes between steps
        ids, w = step_routing(rng, step, t, experts, k)
        x = rng.standard_normal((t, hidden)).astype(BF16)
        inputs.append((cupy.asarray(x), cupy.asarray(ids), cupy.asarray(w)))
        host.append((x.astype(np.float64), ids, w))
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # the weights and inputs were made on the null stream
    opts = dict(b1=b1, b2=b2, trans_b=True, graphs=graphs)
    layers = [cg.FixedCapacityMoE(q1, q2, k, max_tokens=tokens, **opts) for _ in range(2)]
    assert all(layer.fp8_kernel for layer in layers)
    for layer, overlap in zip(layers, (True, False)):
        _steps(layer, inputs[:2], stream, overlap)  # first calls: compile, prepare, capture
    got = _steps(layers[0], inputs, stream, True)
    want = _steps(layers[1], inputs, stream, False)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape
        assert _bits_equal(a, b), f"{name} T={tokens} graphs={graphs} step {i}: not bitwise"
    x64, ids, w = host[-1]
    check_close(got[-1], fp8_step_ref(x64, ids, w, *ref_ops), TOL, f"{name} T={tokens} last step")
    assert layers[0].dropped_pairs() == 0
