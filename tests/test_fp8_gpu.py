"""FP8 on the GPU: the quantize and dequantize kernels against the NumPy model
bit for bit, and every entry point with FP8 weights against float64 computed
from the dequantized weights (plus the difference to 16-bit weights, printed)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, poisoned, random_sizes, wait_for_current_stream

import cublas_grouped as cg
from cublas_grouped.moe.checkpoints import read_gguf_experts
from cublas_grouped.testing import gmm_ref, moe_forward_ref, rel_error
from cublas_grouped.testing_fp8 import dequantize_ref, quantize_ref

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": BF16}
SCALINGS = ("block128", "channel")
GMM_TOL, LAYER_TOL = 1e-2, 3e-2


def layer_ref(x64, ids, weights64, d1, d2, trans_b, scaling):
    """float64 of the layer as it runs: on SM 9.0 with [E, N, K] block128 FP8
    weights and bf16 tokens (these tests' sizes: K % 16 == 0, N % 8 == 0) the
    FP8 kernel also quantizes the activations (test_fp8_sm90_gpu.fp8_layer_ref);
    elsewhere only the weights are FP8."""
    import cupy

    if trans_b and scaling == "block128" and cupy.cuda.Device().compute_capability == "90":
        from test_fp8_sm90_gpu import fp8_layer_ref

        return fp8_layer_ref(x64, ids, weights64, d1, d2)
    return moe_forward_ref(x64, ids, weights64, d1, d2)


def hard_values(rng, shape, dtype) -> np.ndarray:
    """Host values of ``dtype`` that reach every branch of the conversion: magnitudes
    over 12 orders per row, a zero block, values that become e4m3 subnormals next
    to large ones, the largest finite numbers, NaN and infinities."""
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-6, 6, size=(*shape[:-1], 1)))
    flat = x.reshape(-1, shape[-1])
    if flat.shape[0] > 4 and shape[-1] > 4:
        flat[: min(130, flat.shape[0] // 2), : min(130, shape[-1] // 2)] = (
            0  # a zero block (whole or partial)
        )
        flat[-1, 0], flat[-1, 1] = 1.0, 1e-4  # 1e-4 * 448 is below 2^-6: an e4m3 subnormal
        flat[-2, 0], flat[-2, 1], flat[-2, 2] = np.nan, np.inf, -np.inf
        big = float(np.finfo(dtype).max) if dtype is not BF16 else 3.0e38
        flat[-3, 0], flat[-3, 1] = big, -big / 3
    return x.astype(np.float32).astype(dtype)


def same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal element for element; NaNs compared by position (their payloads may differ)."""
    g, w = got.astype(np.float32), want.astype(np.float32)
    assert np.array_equal(np.isnan(g), np.isnan(w)), f"{what}: NaN positions differ"
    keep = ~np.isnan(w)
    bad = np.flatnonzero(g[keep].view(np.uint32) != w[keep].view(np.uint32))
    assert not bad.size, f"{what}: {bad.size} differ, e.g. got {g[keep][bad[:4]]} want {w[keep][bad[:4]]}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("shape", [(1, 128, 128), (3, 200, 300), (2, 1, 129), (5, 257, 64), (0, 128, 128)])
def test_quantize_and_dequantize_match_the_model_bit_for_bit(dtype, scaling, trans_b, shape):
    import cupy

    rng = np.random.default_rng(abs(hash((dtype, scaling, trans_b, shape))) % 2**32)
    host = hard_values(rng, shape, DTYPES[dtype])
    q = cg.quantize_fp8(cupy.asarray(host), scaling=scaling, trans_b=trans_b)
    assert q.shape == shape and q.source_nbytes == host.nbytes and q.trans_b == trans_b
    codes, scales = quantize_ref(host.astype(np.float32), *q.tile)
    assert np.array_equal(cupy.asnumpy(q.values), codes), "e4m3 codes differ from the model"
    got_scales = cupy.asnumpy(q.scales)
    assert got_scales.shape == scales.shape and np.array_equal(
        got_scales.view(np.uint32), scales.view(np.uint32)
    )
    assert np.all(np.isfinite(got_scales)) and np.all(got_scales > 0)
    want = dequantize_ref(codes, scales, *q.tile)
    for name, out_dtype in DTYPES.items():
        out = q.dequantize(name)
        assert out.dtype == np.dtype(out_dtype) and out.shape == shape
        same_bits(cupy.asnumpy(out), want.astype(out_dtype), f"dequantize to {name}")
    # Into a caller's NaN-poisoned buffer: every element written.
    out = poisoned(shape, BF16)
    assert q.dequantize(BF16, out=out) is out
    same_bits(cupy.asnumpy(out), want.astype(BF16), "dequantize into out")


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float32])
@pytest.mark.parametrize("tokens", [1, 7, 1000])
@pytest.mark.parametrize("cols", [64, 128, 136, 300, 2056])
def test_quantize_rows_matches_the_model(tokens, cols, dtype):
    """The kernel against the NumPy model, byte for byte: its vector path (cols
    % 8 == 0; 136 and 2056 end in a partial tile, 2056's 17 tiles per row put
    a warp's two tiles on two rows) and its scalar path (300)."""
    import cupy

    rng = np.random.default_rng(tokens * cols)
    host = hard_values(rng, (tokens, cols), dtype)
    values, scales = cg.quantize_rows_fp8(cupy.asarray(host))
    codes, want_scales = quantize_ref(host.astype(np.float32), 1, 128)
    assert values.dtype == np.uint8 and scales.shape == (tokens, -(-cols // 128))
    assert np.array_equal(cupy.asnumpy(values), codes)
    assert np.array_equal(cupy.asnumpy(scales).view(np.uint32), want_scales.view(np.uint32))


@pytest.mark.parametrize("cols", [64, 2056])
def test_quantize_rows_one_block_walks_every_tile(cols, monkeypatch):
    """A grid of one block: each warp takes many passes of 2 * QROWS_PAIRS
    tiles (the grid stride, and the row stepping across passes), the same
    bytes as the model."""
    import cupy

    from cublas_grouped.gemm import fp8_kernels

    monkeypatch.setattr(fp8_kernels, "MAX_GRID", 1)
    rng = np.random.default_rng(cols)
    host = hard_values(rng, (777, cols), BF16)
    values, scales = cg.quantize_rows_fp8(cupy.asarray(host))
    codes, want_scales = quantize_ref(host.astype(np.float32), 1, 128)
    assert np.array_equal(cupy.asnumpy(values), codes)
    assert np.array_equal(cupy.asnumpy(scales).view(np.uint32), want_scales.view(np.uint32))


@pytest.mark.parametrize("offset", [1, 4])
def test_quantize_rows_off_the_vector_alignment(offset):
    """x starting 2 (or 8) bytes past a 16-byte boundary, cols % 8 == 0: the
    scalar path, the same bytes as the model."""
    import cupy

    rng = np.random.default_rng(offset)
    tokens, cols = 33, 264
    host = hard_values(rng, (tokens, cols), BF16)
    buf = cupy.zeros(tokens * cols + 16, dtype=BF16)
    x = buf[offset : offset + tokens * cols].reshape(tokens, cols)
    x.set(host)
    from cublas_grouped.gemm.fp8_kernels import rows_per_warp

    assert rows_per_warp(cols, x.data.ptr, 0) == 1
    values, scales = cg.quantize_rows_fp8(x)
    codes, want_scales = quantize_ref(host.astype(np.float32), 1, 128)
    assert np.array_equal(cupy.asnumpy(values), codes)
    assert np.array_equal(cupy.asnumpy(scales).view(np.uint32), want_scales.view(np.uint32))


def test_round_trip_error_is_e4m3_sized():
    import cupy

    rng = np.random.default_rng(3)
    w, w64 = device_random(rng, (4, 512, 384), np.float32)
    back = cupy.asnumpy(cg.quantize_fp8(w).dequantize(np.float32)).astype(np.float64)
    err = rel_error(back, w64)
    print(f"e4m3 block128 round trip: relative error {err:.3e}")
    assert 5e-3 < err < 4e-2  # 3 mantissa bits: a few percent, never exact


def _fp8_and_reference(w, scaling, trans_b, dtype):
    """FP8 weights of ``w`` and, as float64, the dense weights the fallback multiplies by."""
    import cupy

    q = cg.quantize_fp8(w, scaling=scaling, trans_b=trans_b)
    dense = cupy.asnumpy(q.dequantize(dtype))
    model = dequantize_ref(cupy.asnumpy(q.values), cupy.asnumpy(q.scales), *q.tile).astype(dtype)
    same_bits(dense, model, "dequantized weights")
    return q, dense.astype(np.float64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("num_groups", [1, 8, 128])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_gmm_with_fp8_weights(dtype, trans_b, num_groups, scaling):
    import cupy

    rng = np.random.default_rng(abs(hash((dtype, trans_b, num_groups, scaling))) % 2**32)
    k, n = 200, 136  # K not a multiple of 128: partial blocks
    total = int(rng.integers(num_groups, 4 * num_groups + 64))
    sizes = random_sizes(rng, num_groups, total)
    a, a64 = device_random(rng, (total, k), DTYPES[dtype])
    w, _ = device_random(rng, (num_groups, n, k) if trans_b else (num_groups, k, n), DTYPES[dtype], k**-0.5)
    q, deq64 = _fp8_and_reference(w, scaling, trans_b, DTYPES[dtype])
    out = poisoned((total, n), DTYPES[dtype])
    assert cg.gmm(a, q, sizes.tolist(), trans_b=trans_b, out=out) is out
    err = check_close(out, gmm_ref(a64, deq64, sizes, trans_b=trans_b), GMM_TOL, f"gmm fp8 {scaling}")
    # Sizes on the GPU, out allocated.
    again = cg.gmm(a, q, cupy.asarray(sizes), trans_b=trans_b)
    check_close(again, gmm_ref(a64, deq64, sizes, trans_b=trans_b), GMM_TOL, "gmm fp8, sizes on the GPU")
    dense = cg.gmm(a, w, sizes.tolist(), trans_b=trans_b)
    diff = rel_error(cupy.asnumpy(out).astype(np.float64), cupy.asnumpy(dense).astype(np.float64))
    print(f"gmm {dtype} E={num_groups} {scaling}: err vs float64 {err:.2e}, FP8 vs 16-bit weights {diff:.2e}")
    assert diff < 0.1


def test_gmm_fp8_zero_rows_and_one_row():
    import cupy

    rng = np.random.default_rng(5)
    w, _ = device_random(rng, (4, 128, 64), BF16)
    q, deq64 = _fp8_and_reference(w, "block128", False, BF16)
    empty = cg.gmm(cupy.empty((0, 128), dtype=BF16), q, [0, 0, 0, 0])
    assert empty.shape == (0, 64)
    a, a64 = device_random(rng, (1, 128), BF16)
    out = cg.gmm(a, q, [0, 0, 1, 0])
    check_close(out, gmm_ref(a64, deq64, [0, 0, 1, 0]), GMM_TOL, "one row")


def _routing(rng, tokens, experts, k):
    import cupy

    allowed = np.arange(experts)[experts // 4 :] if experts - experts // 4 >= k else np.arange(experts)
    ids = np.stack([rng.choice(allowed, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    weights = rng.random((tokens, k)).astype(np.float32)
    weights /= weights.sum(axis=1, keepdims=True)
    return cupy.asarray(ids), cupy.asarray(weights), ids, weights.astype(np.float64)


def _layer(rng, experts, hidden, inter, trans_b, scaling):
    w1, _ = device_random(
        rng, (experts, 2 * inter, hidden) if trans_b else (experts, hidden, 2 * inter), BF16, hidden**-0.5
    )
    w2, _ = device_random(
        rng, (experts, hidden, inter) if trans_b else (experts, inter, hidden), BF16, inter**-0.5
    )
    q1, d1 = _fp8_and_reference(w1, scaling, trans_b, BF16)
    q2, d2 = _fp8_and_reference(w2, scaling, trans_b, BF16)
    if trans_b:  # the reference takes [E, K, N]
        d1, d2 = d1.transpose(0, 2, 1), d2.transpose(0, 2, 1)
    return (w1, w2), (q1, q2), (d1, d2)


@pytest.mark.parametrize("tokens, experts, k", [(1, 8, 2), (64, 16, 4), (1000, 64, 8), (37, 1, 1)])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_moe_forward_with_fp8_weights(tokens, experts, k, trans_b, scaling):
    import cupy

    rng = np.random.default_rng(tokens * 31 + experts)
    hidden, inter = 256, 192
    dense, (q1, q2), (d1, d2) = _layer(rng, experts, hidden, inter, trans_b, scaling)
    x, x64 = device_random(rng, (tokens, hidden), BF16)
    ids, weights, ids_h, weights64 = _routing(rng, tokens, experts, k)
    y = cg.moe_forward(x, ids, weights, q1, q2, trans_b=trans_b)
    expected = moe_forward_ref(x64, ids_h, weights64, d1, d2)
    as_run = layer_ref(x64, ids_h, weights64, d1, d2, trans_b, scaling)
    err = check_close(y, as_run, LAYER_TOL, f"moe_forward fp8 {scaling} T={tokens} E={experts}")
    y16 = cg.moe_forward(x, ids, weights, *dense, trans_b=trans_b)
    diff = rel_error(cupy.asnumpy(y).astype(np.float64), cupy.asnumpy(y16).astype(np.float64))
    print(f"layer T={tokens} E={experts} {scaling}: err vs float64 {err:.2e}, FP8 vs bf16 layer {diff:.2e}")
    assert diff < 0.1
    # Deterministic, and the fixed-capacity path gives a result as close (on
    # SM 9.0 its FP8 step quantizes the activations as the default path does).
    again = cg.moe_forward(x, ids, weights, q1, q2, trans_b=trans_b)
    assert np.array_equal(cupy.asnumpy(again).view(np.uint16), cupy.asnumpy(y).view(np.uint16))
    fixed = cg.moe_forward(x, ids, weights, q1, q2, trans_b=trans_b, fixed_capacity=True)
    check_close(fixed, as_run, LAYER_TOL, "moe_forward fp8 fixed_capacity")
    check_close(y, expected, 0.1, "moe_forward fp8 vs unquantized activations")


def test_moe_forward_mixed_fp8_and_bf16_weights():
    rng = np.random.default_rng(9)
    dense, (q1, _), (d1, _) = _layer(rng, 8, 128, 128, False, "block128")
    x, x64 = device_random(rng, (50, 128), BF16)
    ids, weights, ids_h, weights64 = _routing(rng, 50, 8, 2)
    import cupy

    y = cg.moe_forward(x, ids, weights, q1, dense[1])
    expected = moe_forward_ref(x64, ids_h, weights64, d1, cupy.asnumpy(dense[1]).astype(np.float64))
    check_close(y, expected, LAYER_TOL, "w1 FP8, w2 bf16")
    # With a context for the backward: the same forward, gradients of the dequantized weights.
    y2, ctx = cg.moe_forward(x, ids, weights, q1, dense[1], return_context=True)
    check_close(y2, expected, LAYER_TOL, "w1 FP8 with return_context")
    grads = cg.moe_backward(ctx, cupy.ones_like(y2))
    assert grads.dw1.shape == q1.shape and not bool(cupy.isnan(grads.dw1.astype(cupy.float32)).any())


@pytest.mark.parametrize("graphs", [True, False])
def test_fixed_capacity_moe_with_fp8_weights(graphs):
    import cupy

    rng = np.random.default_rng(11)
    experts, hidden, inter, k = 16, 256, 128, 4
    _, (q1, q2), (d1, d2) = _layer(rng, experts, hidden, inter, True, "block128")
    layer = cg.FixedCapacityMoE(q1, q2, k, max_tokens=32, trans_b=True, graphs=graphs)
    dense_bytes = (q1.shape[0] * q1.shape[1] * q1.shape[2] + q2.shape[0] * q2.shape[1] * q2.shape[2]) * 2
    if cupy.cuda.Device().compute_capability == "90":
        # The FP8 kernel step: the FP8 weights themselves, no dense copy.
        assert layer.fp8_kernel and layer.w1 is q1 and layer.w2 is q2
        assert layer.weight_nbytes < dense_bytes
    else:
        assert not layer.fp8_kernel and layer.w1.dtype == np.dtype(BF16)
        assert layer.nbytes >= dense_bytes
    for tokens in (1, 5, 32, 5):
        x, x64 = device_random(rng, (tokens, hidden), BF16)
        ids, weights, ids_h, weights64 = _routing(rng, tokens, experts, k)
        layer._out.fill(np.nan)
        out = layer.forward(x, ids, weights)
        check_close(
            out,
            layer_ref(x64, ids_h, weights64, d1, d2, True, "block128"),
            LAYER_TOL,
            f"FixedCapacityMoE T={tokens}",
        )
    # New FP8 values in place: the next step reads them (elsewhere the dense copy is refilled every step).
    q1.values.fill(0)
    out = layer.forward(x, ids, weights)
    assert float(cupy.abs(out.astype(cupy.float32)).max()) == 0.0
    assert layer.dropped_pairs() == 0


def test_moe_mlp_and_weight_manager_with_fp8():
    import cupy

    rng = np.random.default_rng(13)
    experts, hidden, inter, k = 8, 128, 64, 2
    mats1 = [device_random(rng, (hidden, 2 * inter), BF16, hidden**-0.5)[0] for _ in range(experts)]
    mats2 = [device_random(rng, (inter, hidden), BF16, inter**-0.5)[0] for _ in range(experts)]
    w1 = cg.ExpertWeightManager.load(mats1, quantize="fp8-block128")
    w2 = cg.ExpertWeightManager.load(mats2, quantize="fp8-channel")
    assert isinstance(w1.weight, cg.FP8ExpertWeights) and w2.weight.scaling == "channel"
    assert w1.weight.source_nbytes == experts * hidden * 2 * inter * 2 and w1.nbytes < w1.weight.source_nbytes
    print(w1.weight.memory_report())
    router, _ = device_random(rng, (hidden, experts), BF16)
    x, x64 = device_random(rng, (40, hidden), BF16)
    mlp = cg.MoEMLP(router, w1, w2, top_k=k)
    y = mlp(x)
    logits = cupy.matmul(x, router)
    weights, ids = cg.route(logits, k)
    d1 = cupy.asnumpy(w1.weight.dequantize(BF16)).astype(np.float64)
    d2 = cupy.asnumpy(w2.weight.dequantize(BF16)).astype(np.float64)
    expected = moe_forward_ref(x64, cupy.asnumpy(ids), cupy.asnumpy(weights).astype(np.float64), d1, d2)
    check_close(y, expected, LAYER_TOL, "MoEMLP with FP8 experts")
    q = cg.ExpertWeightManager.quantize(cg.ExpertWeightManager.load(mats1))
    assert np.array_equal(cupy.asnumpy(q.weight.values), cupy.asnumpy(w1.weight.values))


def test_fp8_checkpoint_loads_onto_the_gpu(tmp_path):
    save_file = pytest.importorskip("safetensors.numpy").save_file
    import cupy
    from test_fp8_checkpoints import NAME, fp8_expert_tensors

    rng = np.random.default_rng(17)
    tensors = fp8_expert_tensors(rng, 4, 256, 128)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    w1, w2 = cg.load_fp8_experts(tmp_path / "m.safetensors", 4, layer=3)
    assert w1.trans_b and w1.shape == (4, 256, 256) and w2.shape == (4, 256, 128)
    gate = tensors[NAME.format(e=2, p="gate_proj", t="weight")].view(np.uint8)
    assert np.array_equal(cupy.asnumpy(w1.values[2, :128]), gate)
    x, x64 = device_random(rng, (20, 256), BF16)
    ids, weights, ids_h, weights64 = _routing(rng, 20, 4, 2)
    y = cg.moe_forward(x, ids, weights, w1, w2, trans_b=True)
    d1 = cupy.asnumpy(w1.dequantize(BF16)).astype(np.float64).transpose(0, 2, 1)
    d2 = cupy.asnumpy(w2.dequantize(BF16)).astype(np.float64).transpose(0, 2, 1)
    expected = layer_ref(x64, ids_h, weights64, d1, d2, True, "block128")
    check_close(y, expected, LAYER_TOL, "layer from an FP8 checkpoint")


def test_gguf_q8_0_loads_dense_and_requantized(tmp_path):
    gguf = pytest.importorskip("gguf")
    import cupy
    from test_fp8_checkpoints import gguf_layer, write_gguf

    rng = np.random.default_rng(19)
    write_gguf(tmp_path / "m.gguf", gguf_layer(rng, layer=0), gguf.GGMLQuantizationType.Q8_0)
    host1, _ = read_gguf_experts(tmp_path / "m.gguf")
    w1, w2 = cg.load_gguf_experts(tmp_path / "m.gguf")
    assert w1.trans_b and w1.weight.dtype == np.dtype(BF16)
    assert np.array_equal(cupy.asnumpy(w1.weight), host1.astype(BF16))
    f1, _ = cg.load_gguf_experts(tmp_path / "m.gguf", quantize="fp8-block128")
    codes, scales = quantize_ref(host1, 128, 128)
    assert np.array_equal(cupy.asnumpy(f1.weight.values), codes)
    assert np.array_equal(cupy.asnumpy(f1.weight.scales), scales)


def test_fp8_weights_refused_in_a_capture_of_the_per_call_paths():
    import cupy

    rng = np.random.default_rng(23)
    _, (q1, q2), _ = _layer(rng, 4, 128, 128, False, "block128")
    x, _ = device_random(rng, (4, 128), BF16)
    ids, weights, _, _ = _routing(rng, 4, 4, 2)
    a = cupy.zeros((4, 128), dtype=BF16)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # the inputs were made on the null stream
    with stream:
        cg.moe_forward(x, ids, weights, q1, q2, fixed_capacity=True)  # eager: fine
        stream.begin_capture()
        try:
            with pytest.raises(ValueError, match="cannot run in a CUDA graph capture"):
                cg.moe_forward(x, ids, weights, q1, q2, fixed_capacity=True)
            with pytest.raises(ValueError, match="cannot run in a CUDA graph capture"):
                cg.gmm(a, q1, [1, 1, 1, 1])
        finally:
            stream.end_capture()
