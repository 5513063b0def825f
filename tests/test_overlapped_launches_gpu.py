"""The kernel step's programmatic dependent launches on the GPU (SM 9.0).

The prepared step launches each kernel so that its blocks may start while
the previous kernel runs (``kernel_step.OVERLAP_LAUNCHES``, for steps of at
most ``OVERLAP_MAX_PAIRS`` pairs; larger steps here compare plain with
plain, and check that the limit holds no surprise). Each kernel
waits on the device before touching what earlier kernels wrote, so the
results must equal, bit for bit, those of the same step launched plainly:

- many steps back to back on one stream, each with new tokens and routing,
  no host synchronization between them (eager and replayed from the layer's
  own CUDA graphs), T from 1 to 4096, plain and packed gate|up weights;
- the same against float64 on the last step.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, wait_for_current_stream

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.moe import kernel_step

pytestmark = pytest.mark.gpu
BF16 = ml_dtypes.bfloat16


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the kernel step runs on SM 9.0 GPUs only")


def _steps(layer, inputs, stream, overlap: bool):
    """``layer.forward`` on each input back to back on ``stream`` (no sync
    between steps), each output copied out on the stream; then one sync."""
    import cupy

    saved = kernel_step.OVERLAP_LAUNCHES
    kernel_step.OVERLAP_LAUNCHES = overlap
    try:
        outs = []
        with stream:
            for x, ids, w in inputs:
                outs.append(cupy.copy(layer.forward(x, ids, w)))
        stream.synchronize()
        return outs
    finally:
        kernel_step.OVERLAP_LAUNCHES = saved


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("layout", ["gate_up", "gate_up_blocked"])
@pytest.mark.parametrize("tokens", [1, 5, 16, 64, 170, 171, 4096])  # k = 6: 1020 pairs overlap, 1026 not
def test_overlapped_steps_equal_plain_steps_bitwise(tokens, layout, graphs):
    import cupy

    rng = np.random.default_rng(tokens)
    experts, k, hidden, inter = 64, 6, 256, 256
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), BF16, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), BF16, scale=inter**-0.5)
    w1_run = cg.pack_gate_up(w1) if layout == "gate_up_blocked" else w1
    executor = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="sm90_grouped"))
    inputs, host = [], []
    for step in range(6):
        t = tokens if step % 2 == 0 else max(1, tokens // 3)  # T changes between steps
        ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(t)]).astype(np.int32)
        if step == 3:
            ids[: max(1, t // 2)] = ids[0]  # many tokens on the same experts
        w = rng.random((t, k)).astype(np.float32)
        x, x64 = device_random(rng, (t, hidden), BF16)
        inputs.append((x, cupy.asarray(ids), cupy.asarray(w)))
        host.append((x64, ids, w))
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # the weights and inputs were made on the null stream
    layers = [
        cg.FixedCapacityMoE(
            w1_run, w2, k, max_tokens=tokens, executor=executor, graphs=graphs, w1_layout=layout
        )
        for _ in range(2)
    ]
    for layer, overlap in zip(layers, (True, False)):
        _steps(layer, inputs[:2], stream, overlap)  # first calls: compile, capture
    got = _steps(layers[0], inputs, stream, True)
    want = _steps(layers[1], inputs, stream, False)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape
        assert bool((a.view(cupy.uint16) == b.view(cupy.uint16)).all()), f"T={tokens} step {i}: not bitwise"
    x64, ids, w = host[-1]
    check_close(got[-1], ref.moe_forward_ref(x64, ids, w, w1_64, w2_64), 2e-2, f"T={tokens} last step")
