"""The MoE layer and its kernels on the GPU against the float64 references."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, wait_for_current_stream

import cublas_grouped as cg
from cublas_grouped import testing as ref

pytestmark = pytest.mark.gpu

ALGORITHMS = ["cublas_grouped", "sequential", "chunked_batched", "padded_strided", "auto"]


def routing(rng, tokens, experts, k, skew_zero=0):
    """Random distinct top-k ids per token (some experts never chosen when skew_zero > 0)."""
    import cupy

    allowed = np.arange(experts)[skew_zero:] if experts - skew_zero >= k else np.arange(experts)
    ids = np.stack([rng.choice(allowed, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w = rng.random((tokens, k)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    return cupy.asarray(ids), cupy.asarray(w), ids, w.astype(np.float64)


@pytest.mark.parametrize(
    "tokens, experts, k", [(1, 8, 2), (37, 16, 1), (200, 16, 16), (65536, 256, 8), (300, 1024, 4)]
)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_matches_reference(tokens, experts, k, scoring):
    rng = np.random.default_rng(tokens + experts)
    logits, logits64 = device_random(rng, (tokens, experts), np.float32)
    weights, ids = cg.route(logits, k, scoring=scoring)
    ref_w, ref_ids = ref.route_ref(logits64.astype(np.float32), k, scoring=scoring)
    import cupy

    got_ids, got_w = cupy.asnumpy(ids), cupy.asnumpy(weights)
    # fp32 scores may tie where float64 ones differ (sigmoid saturates near 1):
    # ids must agree wherever the reference's top k+1 scores are clearly apart.
    raw = ref.route_ref(logits64.astype(np.float32), min(k + 1, experts), scoring=scoring, renormalize=False)[
        0
    ]
    clear = (np.abs(np.diff(raw, axis=1)) > 1e-6).all(axis=1)
    assert clear.mean() > 0.5
    assert (got_ids[clear] == ref_ids[clear]).all()
    assert np.abs(got_w - ref_w).max() < 1e-5


@pytest.mark.parametrize("tokens, experts, k", [(1, 8, 1), (1, 8, 8), (513, 64, 6), (65536, 256, 8)])
@pytest.mark.parametrize("algorithm", ["cublas_grouped", "chunked_batched", "padded_strided"])
def test_plan_gather_scatter(tokens, experts, k, algorithm):
    import cupy

    rng = np.random.default_rng(tokens * 7 + k)
    ids, w, ids_h, _ = routing(rng, tokens, experts, k, skew_zero=experts // 4)
    x, x64 = device_random(rng, (tokens, 64), ml_dtypes.bfloat16)
    inp = cg.prepare_input(x, (w, ids), experts, algorithm=algorithm)
    expected = ref.plan_ref(ids_h, experts)
    assert (cupy.asnumpy(inp.tokens_per_expert) == expected["counts"]).all()
    assert (inp.counts_host == expected["counts"]).all()
    if experts - experts // 4 >= k:
        assert (inp.counts_host[: experts // 4] == 0).all()  # experts nobody picked
    # Stable: within an expert, rows follow token order; every pair has its own row.
    p2r = cupy.asnumpy(inp.pair_to_row)
    r2p = cupy.asnumpy(inp.row_to_pair)
    assert len(np.unique(p2r)) == tokens * k and (r2p[p2r] == np.arange(tokens * k)).all()
    offsets = cupy.asnumpy(inp.expert_offsets)
    rank = p2r - offsets[ids_h.reshape(-1)]
    ref_rank = expected["pair_to_row"] - expected["row_offsets"][ids_h.reshape(-1)]
    assert (rank == ref_rank).all()
    gathered = cupy.asnumpy(inp.rows).astype(np.float64)
    assert (gathered[p2r] == ref.gather_ref(x64, np.arange(tokens * k), k)).all()
    assert (gathered[r2p < 0] == 0).all()
    back = cg.scatter_output(inp.rows, inp)
    assert (cupy.asnumpy(back).astype(np.float64) == np.repeat(x64, k, axis=0)).all()


def _layer_case(rng, tokens, experts, k, hidden, inter, dtype, gated=True, bias=False):
    width = 2 * inter if gated else inter
    x, x64 = device_random(rng, (tokens, hidden), dtype)
    w1, w1_64 = device_random(rng, (experts, hidden, width), dtype, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), dtype, scale=inter**-0.5)
    b1 = b2 = b1_64 = b2_64 = None
    if bias:
        b1, b1_64 = device_random(rng, (experts, width), dtype, scale=0.1)
        b2, b2_64 = device_random(rng, (experts, hidden), dtype, scale=0.1)
    return (x, w1, w2, b1, b2), (x64, w1_64, w2_64, b1_64, b2_64)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (ml_dtypes.bfloat16, 2e-2), (np.float16, 2e-2)])
def test_layer_matches_reference(algorithm, dtype, tol):
    rng = np.random.default_rng(42)
    tokens, experts, k = 300, 32, 4
    ids, w, ids_h, w64 = routing(rng, tokens, experts, k, skew_zero=5)
    (x, w1, w2, _, _), (x64, w1_64, w2_64, _, _) = _layer_case(rng, tokens, experts, k, 128, 96, dtype)
    out = cg.moe_forward(x, ids, w, w1, w2, algorithm=algorithm)
    expected = ref.moe_forward_ref(x64, ids_h, w64, w1_64, w2_64)
    check_close(out, expected, tol, f"moe {algorithm} {np.dtype(dtype).name}")


@pytest.mark.parametrize(
    "activation, gated, bias",
    [("gelu", True, True), ("relu", False, True), ("silu", False, False), ("gelu", False, False)],
)
def test_layer_activations_and_biases(activation, gated, bias):
    rng = np.random.default_rng(9)
    tokens, experts, k = 64, 8, 2
    ids, w, ids_h, w64 = routing(rng, tokens, experts, k)
    (x, w1, w2, b1, b2), (x64, w1_64, w2_64, b1_64, b2_64) = _layer_case(
        rng, tokens, experts, k, 64, 48, np.float32, gated, bias
    )
    out = cg.moe_forward(x, ids, w, w1, w2, b1=b1, b2=b2, activation=activation, gated=gated)
    expected = ref.moe_forward_ref(x64, ids_h, w64, w1_64, w2_64, b1_64, b2_64, activation, gated)
    check_close(out, expected, 1e-5, f"{activation} gated={gated} bias={bias}")


def test_layer_is_deterministic_and_handles_one_token_and_k_equals_e():
    import cupy

    rng = np.random.default_rng(1)
    for tokens, experts, k in [(1, 8, 8), (1, 128, 8), (4096, 128, 8)]:
        ids, w, ids_h, w64 = routing(rng, tokens, experts, k)
        (x, w1, w2, _, _), (x64, w1_64, w2_64, _, _) = _layer_case(
            rng, tokens, experts, k, 256, 64, ml_dtypes.bfloat16
        )
        first = cg.moe_forward(x, ids, w, w1, w2)
        second = cg.moe_forward(x, ids, w, w1, w2)
        assert (cupy.asnumpy(first).view(np.uint16) == cupy.asnumpy(second).view(np.uint16)).all()
        if tokens <= 128:
            check_close(first, ref.moe_forward_ref(x64, ids_h, w64, w1_64, w2_64), 2e-2, f"T={tokens}")


def test_trans_b_weights_and_mlp_with_shared_expert():
    import cupy

    rng = np.random.default_rng(4)
    tokens, experts, k, hidden, inter = 50, 8, 2, 64, 32
    (x, w1, w2, _, _), (x64, w1_64, w2_64, _, _) = _layer_case(
        rng, tokens, experts, k, hidden, inter, np.float32
    )
    router, router64 = device_random(rng, (hidden, experts), np.float32)
    sw1, sw1_64 = device_random(rng, (hidden, 2 * inter), np.float32, scale=hidden**-0.5)
    sw2, sw2_64 = device_random(rng, (inter, hidden), np.float32, scale=inter**-0.5)
    lin1 = cg.ExpertWeightManager.load(
        [cupy.ascontiguousarray(w1[e].T) for e in range(experts)], trans_b=True
    )
    lin2 = cg.ExpertWeightManager.load(
        [cupy.ascontiguousarray(w2[e].T) for e in range(experts)], trans_b=True
    )
    mlp = cg.MoEMLP(router, lin1, lin2, k, shared_w1=sw1, shared_w2=sw2)
    out = mlp(x)
    logits = x64 @ router64
    w_ref, ids_ref = ref.route_ref(logits, k)
    expected = ref.moe_forward_ref(x64, ids_ref, w_ref, w1_64, w2_64)
    expected += ref.moe_forward_ref(
        x64, np.zeros((tokens, 1), np.int32), np.ones((tokens, 1)), sw1_64[None], sw2_64[None]
    )
    check_close(out, expected, 1e-5, "MoEMLP trans_b + shared")


@pytest.mark.parametrize("dtype, experts", [(np.float32, 8), (ml_dtypes.bfloat16, 16)])
def test_out_of_range_ids_are_refused(dtype, experts):
    """Counts on the host (float32, and bf16 off SM 9.0): the call raises. On
    SM 9.0 the bf16 layer takes the sync-free kernel step: the call leaves
    the bad pairs out (its output is the layer of the good ones), then
    check_expert_ids raises with their count, once; unchecked, the next call
    raises once the count has reached the host. Either way the next good
    call is right."""
    import cupy

    rng = np.random.default_rng(2)
    (x, w1, w2, _, _), (x64, w1_64, w2_64, _, _) = _layer_case(rng, 4, experts, 2, 32, 16, dtype)
    bad = np.array([[0, 1], [2, experts + 1], [3, -4], [5, 6]], dtype=np.int32)
    ids = cupy.asarray(bad)
    good = np.array([[0, 1], [2, 3], [3, 4], [5, 6]], dtype=np.int32)
    tol = 1e-5 if dtype == np.float32 else 2e-2
    sync_free = dtype != np.float32 and tuple(cg.device_info().sm) == (9, 0)
    message = rf"2 ids outside \[0, {experts}\)" if not sync_free else r"held 2 ids outside \[0, E\)"
    if not sync_free:
        with pytest.raises(ValueError, match=message):
            cg.moe_forward(x, ids, None, w1, w2)
    else:
        out = cg.moe_forward(x, ids, None, w1, w2)
        kept = (bad >= 0) & (bad < experts)
        expected = ref.moe_forward_ref(x64, np.where(kept, bad, 0), kept.astype(np.float64), w1_64, w2_64)
        check_close(out, expected, tol, "the good pairs of a call with bad ids")
        with pytest.raises(ValueError, match=message + " in moe_forward calls on this stream"):
            cg.check_expert_ids()
        cg.check_expert_ids()  # reported once
        cg.moe_forward(x, ids, None, w1, w2)
        cupy.cuda.get_current_stream().synchronize()  # the count's copy has landed
        with pytest.raises(ValueError, match=message + " in earlier moe_forward calls"):
            cg.moe_forward(x, cupy.asarray(good), None, w1, w2)
    out = cg.moe_forward(x, cupy.asarray(good), None, w1, w2)
    check_close(out, ref.moe_forward_ref(x64, good, None, w1_64, w2_64), tol, "after refused ids")
    cg.check_expert_ids()


# -- fixed-capacity decode path -------------------------------------------------------------------


@pytest.mark.parametrize("tokens, experts, k", [(1, 128, 8), (16, 128, 8), (64, 256, 8), (16, 8, 2)])
def test_fixed_capacity_graph_replay_matches_reference(tokens, experts, k):
    import cupy

    rng = np.random.default_rng(tokens + experts)
    hidden, inter = 256, 128
    (x, w1, w2, _, _), (_, w1_64, w2_64, _, _) = _layer_case(
        rng, tokens, experts, k, hidden, inter, ml_dtypes.bfloat16
    )
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # x, w1 and w2 were copied in on the null stream
    layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=64)
    with stream:  # the buffers and what fills them made on the stream that reads them
        x_buf = cupy.empty_like(x)
        ids_buf = cupy.empty((tokens, k), dtype=cupy.int32)
        w_buf = cupy.empty((tokens, k), dtype=cupy.float32)
        ids, w, _, _ = routing(rng, tokens, experts, k)
        x_buf[...] = x
        ids_buf[...] = ids
        w_buf[...] = w
        layer.forward(x_buf, ids_buf, w_buf)  # eager warm-up: compiles, sets the workspace
        stream.begin_capture()
        out = layer.forward(x_buf, ids_buf, w_buf)
        graph = stream.end_capture()
    for step in range(100):
        with stream:  # new inputs copied in on this stream: the copies below must not outrun them
            ids, w, ids_h, w64 = routing(rng, tokens, experts, k, skew_zero=step % 3)
            new_x, x64 = device_random(rng, (tokens, hidden), ml_dtypes.bfloat16)
            x_buf[...] = new_x
            ids_buf[...] = ids
            w_buf[...] = w
            graph.launch(stream)
        stream.synchronize()
        check_close(out, ref.moe_forward_ref(x64, ids_h, w64, w1_64, w2_64), 2e-2, f"replay {step}")


def test_fixed_capacity_matches_dynamic_and_capacity_is_enforced():
    import cupy

    rng = np.random.default_rng(8)
    (x, w1, w2, b1, b2), _ = _layer_case(rng, 16, 32, 4, 128, 64, np.float32, bias=True)
    ids, w, _, _ = routing(rng, 16, 32, 4)
    layer = cg.FixedCapacityMoE(w1, w2, 4, max_tokens=16, b1=b1, b2=b2)
    fixed = cupy.asnumpy(layer.forward(x, ids, w)).astype(np.float64)
    dynamic = cupy.asnumpy(cg.moe_forward(x, ids, w, w1, w2, b1=b1, b2=b2)).astype(np.float64)
    assert ref.rel_error(fixed, dynamic) < 1e-5
    big = cupy.concatenate([x, x])
    with pytest.raises(
        ValueError, match="x has 32 tokens but this FixedCapacityMoE was built for max_tokens=16"
    ):
        layer.forward(big, cupy.concatenate([ids, ids]), cupy.concatenate([w, w]))
    with pytest.raises(ValueError, match=r"x must be float32 \[T, 128\]; got float32 \(16, 64\)"):
        layer.forward(x[:, :64].copy(), ids, w)
    with pytest.raises(ValueError, match="topk_ids must have top_k=4 columns"):
        layer.forward(x, ids[:, :2].copy(), w[:, :2].copy())


def test_dynamic_path_cannot_be_captured():
    import cupy

    rng = np.random.default_rng(3)
    (x, w1, w2, _, _), _ = _layer_case(rng, 8, 8, 2, 32, 16, np.float32)
    ids, w, _, _ = routing(rng, 8, 8, 2)
    cg.moe_forward(x, ids, w, w1, w2)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="[Cc]aptur"):  # the counts' copy to the host
                cg.moe_forward(x, ids, w, w1, w2)
        finally:
            try:
                stream.end_capture()
            except Exception:
                pass


def test_fixed_capacity_layer_matches_reference_at_every_step_size():
    rng = np.random.default_rng(21)
    experts, k, hidden, inter = 64, 4, 128, 64
    (x, w1, w2, b1, b2), (x64, w1_64, w2_64, b1_64, b2_64) = _layer_case(
        rng, 64, experts, k, hidden, inter, np.float32, bias=True
    )
    # Largest step first, then smaller ones that reuse a slice of its cached buffers.
    for tokens in (64, 1, 16, 37, 64):
        ids, w, ids_h, w64 = routing(rng, tokens, experts, k, skew_zero=tokens % 5)
        out = cg.moe_forward(x[:tokens], ids, w, w1, w2, b1=b1, b2=b2, fixed_capacity=True)
        expected = ref.moe_forward_ref(x64[:tokens], ids_h, w64, w1_64, w2_64, b1_64, b2_64)
        check_close(out, expected, 1e-5, f"fixed_capacity T={tokens}")
    # Larger than anything cached: the buffers grow.
    ids, w, ids_h, w64 = routing(rng, 200, experts, k)
    (x2, *_), (x2_64, *_) = _layer_case(rng, 200, experts, k, hidden, inter, np.float32)
    out = cg.moe_forward(x2, ids, w, w1, w2, b1=b1, b2=b2, activation="gelu", fixed_capacity=True)
    expected = ref.moe_forward_ref(x2_64, ids_h, w64, w1_64, w2_64, b1_64, b2_64, "gelu")
    check_close(out, expected, 1e-5, "fixed_capacity T=200 gelu")


def test_fixed_capacity_layer_can_be_captured():
    import cupy

    rng = np.random.default_rng(22)
    (x, w1, w2, _, _), (x64, w1_64, w2_64, _, _) = _layer_case(rng, 16, 32, 4, 64, 32, ml_dtypes.bfloat16)
    ids, w, ids_h, w64 = routing(rng, 16, 32, 4)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # the inputs were copied in on the null stream
    with stream:
        cg.moe_forward(x, ids, w, w1, w2, fixed_capacity=True)  # warm-up outside the capture
        stream.begin_capture()
        out = cg.moe_forward(x, ids, w, w1, w2, fixed_capacity=True)
        graph = stream.end_capture()
        graph.launch(stream)
    stream.synchronize()
    check_close(out, ref.moe_forward_ref(x64, ids_h, w64, w1_64, w2_64), 2e-2, "captured fixed_capacity")


@pytest.mark.parametrize("algorithm", ["cublas_grouped", "chunked_batched", "padded_strided"])
def test_step_by_step_api_matches_references(algorithm):
    import cupy

    rng = np.random.default_rng(31)
    tokens, experts, k = 120, 16, 3
    ids, w, ids_h, w64 = routing(rng, tokens, experts, k, skew_zero=3)
    (x, w1, _, _, b2), (x64, w1_64, _, _, b2_64) = _layer_case(
        rng, tokens, experts, k, 64, 32, np.float32, gated=False, bias=True
    )
    inp = cg.prepare_input(x, (w, ids), experts, algorithm=algorithm)
    assert inp.algorithm.value == algorithm
    # Expert of every row, -1 on padding rows.
    r2p = cupy.asnumpy(inp.row_to_pair)
    want = np.where(r2p >= 0, ids_h.reshape(-1)[np.maximum(r2p, 0)], -1)
    assert (cupy.asnumpy(inp.expert_index) == want).all()
    # expert_gemm on the layout equals each row times its expert's matrix.
    out = cupy.full((inp.rows.shape[0], 32), np.nan, dtype=cupy.float32)
    result = cg.expert_gemm(inp, w1, out=out)
    assert result is out
    rows64 = cupy.asnumpy(inp.rows).astype(np.float64)
    real = r2p >= 0
    expected = np.einsum("rk,rkn->rn", rows64[real], w1_64[want[real]])
    assert ref.rel_error(cupy.asnumpy(out)[real].astype(np.float64), expected) < 1e-5
    # combine_output with biases against its reference; unweighted scatter keeps bits.
    y = cupy.asarray(rng.standard_normal((inp.rows.shape[0], 64)).astype(np.float32))
    combined = cg.combine_output(y, inp, bias=b2)
    p2r = cupy.asnumpy(inp.pair_to_row)
    check_close(
        combined,
        ref.combine_ref(cupy.asnumpy(y).astype(np.float64), p2r, w64, ids_h, b2_64),
        1e-6,
        "combine_output",
    )
    shaped = cg.scatter_output(y, inp, (tokens, k, 64))
    assert shaped.shape == (tokens, k, 64)
    assert (cupy.asnumpy(shaped).reshape(-1, 64) == cupy.asnumpy(y)[p2r]).all()


def test_torch_arrays_work_without_copies():
    torch = pytest.importorskip("torch")
    import cupy

    rng = np.random.default_rng(5)
    sizes = np.array([7, 0, 30, 12])
    a = torch.from_numpy(rng.standard_normal((49, 64)).astype(np.float32)).cuda()
    b = torch.from_numpy(rng.standard_normal((4, 64, 48)).astype(np.float32)).cuda()
    out = torch.full((49, 48), float("nan"), device="cuda")
    result = cg.gmm(a, b, sizes, out=out)
    assert result is out  # the caller's torch tensor was written in place
    torch.cuda.synchronize()
    expected = ref.gmm_ref(a.cpu().numpy().astype(np.float64), b.cpu().numpy().astype(np.float64), sizes)
    assert ref.rel_error(out.cpu().numpy().astype(np.float64), expected) < 1e-5
    as_cupy = cupy.asarray(a)  # zero-copy view: same memory
    assert as_cupy.data.ptr == a.data_ptr()
