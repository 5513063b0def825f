"""The FP8 step's rows quantized by the kernels that write them (SM 9.0 for the
layer; the two kernels on any GPU): activation.cu's ``expert_activation_fp8``
and dispatch.cu's ``place_one_block_fp8`` against ``quantize_rows_fp8`` of
what ``expert_activation`` and ``place_one_block`` write, byte for byte
(codes and scales), for every activation, gated or not, with and without a
bias, gate|up in blocks, widths with a partial last 128-column block, 1 to
1024 rows, both access paths (vector and scalar), NaN, infinities and values
past bf16's range; every output buffer poisoned, with spare rows past the
step's that must stay so; and dispatch.cu's ``gather_rows_fp8`` against
``quantize_rows_fp8`` of ``gather_rows``' rows. Then the FP8 layer
(``FixedCapacityMoE`` with FP8 weights) with ``fp8_step.FUSE_QUANTIZE`` on
and off: the same output bits, no quantize launch where fused, and no bf16
rows gathered for an FP8 GEMM 1."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from test_fixed_capacity_gpu import poison, step_routing

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper
from cublas_grouped.moe import fp8_step
from cublas_grouped.moe import kernels as K
from cublas_grouped.testing import pair_to_row_of

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
SPARE = 5  # rows past the step's in every output buffer: they must keep the poison
CODE_POISON = 0x7F  # e4m3 NaN
ACTS = ("silu", "gelu", "relu")
# (rows, inter): inter 136 and 200 end in a partial 128-column block, 384 has
# an odd number of blocks (a warp's second half-warp idle), 100 is no multiple
# of 8 (the scalar path); 768 is Qwen3-30B-A3B's.
SHAPES = [(1, 136), (7, 200), (128, 768), (1024, 384), (7, 100), (128, 136), (1024, 200)]


def _arch():
    from cublas_grouped.runtime.nvrtc import arch_for

    return arch_for(cg.device_info().sm)


def _stream():
    import cupy

    return cupy.cuda.get_current_stream().ptr


def _poisoned_fp8(rows, cols, code_offset=0):
    """Codes (rows + SPARE, cols) of CODE_POISON, starting ``code_offset``
    bytes into their buffer, and scales (rows + SPARE, ceil(cols/128)) of NaN."""
    import cupy

    n = (rows + SPARE) * cols
    codes = cupy.full(n + code_offset, CODE_POISON, dtype=cupy.uint8)[code_offset:].reshape(
        rows + SPARE, cols
    )
    scales = cupy.full((rows + SPARE, -(-cols // 128)), np.nan, dtype=cupy.float32)
    return codes, scales


def _assert_same_bits(got, ref, rows, what):
    """The fused kernel's (codes, scales) over their first ``rows`` rows equal
    ``ref`` (quantize_rows_fp8's) byte for byte; the spare rows past them kept
    the poison."""
    import cupy

    codes, scales = (cupy.asnumpy(a) for a in got)
    ref_codes, ref_scales = (cupy.asnumpy(a) for a in ref)
    bad = np.nonzero(codes[:rows] != ref_codes)
    assert bad[0].size == 0, (
        f"{what}: {bad[0].size} codes differ, first at (row, column) {(int(bad[0][0]), int(bad[1][0]))}: "
        f"{codes[:rows][bad][0]:#04x} against {ref_codes[bad][0]:#04x}"
    )
    same = scales[:rows].view(np.uint32) == ref_scales.view(np.uint32)
    assert same.all(), f"{what}: scales differ at {np.argwhere(~same)[:4].tolist()}"
    assert (codes[rows:] == CODE_POISON).all(), f"{what}: codes written past the step's rows"
    assert np.isnan(scales[rows:]).all(), f"{what}: scales written past the step's rows"


def _values(rng, shape, dtype, specials):
    """Random normal values; with ``specials``, rows of NaN, infinities,
    values past the 16-bit range once multiplied, tiny values and -0 too."""
    v = rng.standard_normal(shape).astype(np.float32) * 2
    if specials:
        flat = v.reshape(-1)
        picks = rng.choice(flat.size, size=max(8, flat.size // 50), replace=False)
        pool = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-30, -0.0, 6e4, 1e-8], np.float32)
        flat[picks] = pool[rng.integers(0, pool.size, picks.size)]
        v[0] = 0.0  # a row of zeros: scale 1
        if shape[0] > 2:
            v[2] = 1e-30  # a row of tiny values: the scale's floor (2^-126)
    with np.errstate(over="ignore"):  # float16: past its range is infinity, as meant
        return v.astype(dtype)


def _on_device(host, misaligned: bool):
    """``host`` copied to the GPU; ``misaligned``: starting one element past a
    16-byte boundary (which forces the fused kernels' scalar path)."""
    import cupy

    if not misaligned:
        return cupy.asarray(host)
    out = cupy.zeros(host.size + 1, dtype=host.dtype)[1:].reshape(host.shape)
    out[...] = cupy.asarray(host)
    return out


def _activation_both_ways(
    rng, rows, inter, act, gated, bias, *, block=0, dtype=BF16, specials=False, offset=""
):
    """(fused codes and scales, quantize_rows_fp8 of expert_activation's
    output): the same h, bias and routing for both. ``offset``: "h" puts h 1
    element off a 16-byte boundary, "q" the codes 1 byte off 8 (each forces
    the fused kernel's scalar path)."""
    import cupy

    experts = 6
    width = 2 * inter if gated else inter
    h = _on_device(_values(rng, (rows, width), dtype, specials), offset == "h")
    b = cupy.asarray((rng.standard_normal((experts, width)) * 0.5).astype(dtype)) if bias else None
    ids = cupy.asarray(rng.integers(0, experts, (rows, 1)).astype(np.int32))  # pair p is row p's token
    r2p = rng.permutation(rows).astype(np.int32)
    if rows > 1:
        r2p[rng.random(rows) < 0.15] = -1  # padding rows: zeros
    r2p = cupy.asarray(r2p)
    code = K.ACTIVATIONS[act]
    plain = cupy.full((rows, inter), np.nan, dtype=dtype)
    K.expert_activation(_stream(), _arch(), h, inter, int(gated), code, b, r2p, ids, plain, block)
    ref = cg.quantize_rows_fp8(plain)
    codes, scales = _poisoned_fp8(rows, inter, 1 if offset == "q" else 0)
    out = (codes[:rows], scales[:rows])
    K.expert_activation_fp8(_stream(), _arch(), h, inter, int(gated), code, b, r2p, ids, out, block)
    cupy.cuda.get_current_stream().synchronize()
    return (codes, scales), ref


@pytest.mark.parametrize("rows, inter", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_activation_fp8_is_the_quantized_activation(act, gated, bias, rows, inter):
    rng = np.random.default_rng(rows * 1000 + inter + 7 * gated + 3 * bias + len(act))
    got, ref = _activation_both_ways(rng, rows, inter, act, gated, bias)
    _assert_same_bits(got, ref, rows, f"{act} gated={gated} bias={bias} rows={rows} I={inter}")


@pytest.mark.parametrize("block, inter", [(8, 136), (8, 200), (128, 384), (128, 768)])
@pytest.mark.parametrize("act", ACTS)
def test_activation_fp8_reads_gate_up_blocks(act, block, inter):
    """w1 packed in gate|up blocks of B columns (a 16-bit w1 beside FP8 w2)."""
    rng = np.random.default_rng(block + inter)
    for rows in (7, 128):
        got, ref = _activation_both_ways(rng, rows, inter, act, True, True, block=block)
        _assert_same_bits(got, ref, rows, f"{act} B={block} I={inter} rows={rows}")


@pytest.mark.parametrize("offset", ["h", "q"])
@pytest.mark.parametrize("inter", [136, 768])
def test_activation_fp8_scalar_path_on_misaligned_operands(offset, inter):
    rng = np.random.default_rng(inter)
    for gated, bias in ((True, True), (False, False)):
        got, ref = _activation_both_ways(rng, 128, inter, "silu", gated, bias, offset=offset)
        _assert_same_bits(got, ref, 128, f"{offset} misaligned, I={inter} gated={gated}")


@pytest.mark.parametrize("inter", [136, 100, 768])
@pytest.mark.parametrize("act", ACTS)
def test_activation_fp8_special_values(act, inter):
    """NaN (kept, with its sign), infinities and products past the 16-bit
    range (left out of the amax, saturated to 448), -0, tiny rows."""
    rng = np.random.default_rng(inter + len(act))
    for gated in (True, False):
        got, ref = _activation_both_ways(rng, 128, inter, act, gated, True, specials=True)
        _assert_same_bits(got, ref, 128, f"specials {act} I={inter} gated={gated}")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("inter", [200, 100])
def test_activation_fp8_other_element_types(dtype, inter):
    """The kernel is stamped for every element type; each value rounded to it
    as expert_activation stores it."""
    rng = np.random.default_rng(inter)
    got, ref = _activation_both_ways(rng, 128, inter, "gelu", True, True, dtype=dtype, specials=True)
    _assert_same_bits(got, ref, 128, f"{np.dtype(dtype).name} I={inter}")


# -- the gather: place_one_block_fp8 -------------------------------------------------

# (experts, k, tokens, routing, hidden): 1, 7, 30, 128 and 1024 pairs; repeats
# and ids outside [0, E) leave rows no pair takes (zeros past the taken ones).
GATHERS = [
    (8, 1, 1, "distinct", 2048),
    (16, 7, 1, "distinct", 136),
    (3, 6, 5, "messy", 200),
    (128, 8, 16, "distinct", 2048),  # Qwen3-30B-A3B decode
    (128, 8, 16, "messy", 384),
    (128, 8, 128, "distinct", 200),  # 1024 pairs: the launch's limit
    (40, 4, 70, "messy", 100),  # the scalar path
]


def _routing(rng, tokens, k, e, kind):
    if kind == "distinct":
        return np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    return rng.integers(-2, e + 2, (tokens, k)).astype(np.int32)  # repeats, ids outside [0, E)


def _place(ids, experts, weights, x, rows=None, quantized=None):
    """One place_one_block launch on fresh index buffers; returns them."""
    import cupy

    pairs = ids.size
    counts, p2r, r2p = (cupy.full(n + SPARE, -7, dtype=cupy.int32) for n in (experts, pairs, pairs))
    schedule = cupy.full(hopper.schedule_ints(experts), 77, dtype=cupy.int32)
    row_weights = cupy.full(pairs + SPARE, np.nan, dtype=cupy.float32)
    dropped = cupy.zeros(1, dtype=cupy.uint64)
    K.place_one_block(
        _stream(), _arch(), ids, experts, weights, x, hopper.BLOCK_M, counts,
        hopper.schedule_addresses(schedule.data.ptr, experts), p2r, r2p,
        row_weights=row_weights, dropped=dropped, rows=rows, quantized=quantized,
    )  # fmt: skip
    cupy.cuda.get_current_stream().synchronize()
    return [a.get() for a in (counts, p2r, r2p, schedule, row_weights, dropped)]


def _gather_both_ways(rng, experts, k, tokens, kind, hidden, *, dtype=BF16, offset="", specials=False):
    import cupy

    ids_host = _routing(rng, tokens, k, experts, kind)
    ids = cupy.asarray(ids_host)
    weights = cupy.asarray(rng.random((tokens, k)).astype(np.float32) + 0.05)
    x = _on_device(_values(rng, (tokens, hidden), dtype, specials), offset == "x")
    pairs = tokens * k
    rows = cupy.full((pairs, hidden), np.nan, dtype=dtype)
    plain = _place(ids, experts, weights, x, rows=rows)
    ref = cg.quantize_rows_fp8(rows)
    codes, scales = _poisoned_fp8(pairs, hidden, 1 if offset == "q" else 0)
    fused = _place(ids, experts, weights, x, quantized=(codes[:pairs], scales[:pairs]))
    for name, a, b in zip(
        ("counts", "pair_to_row", "row_to_pair", "schedule", "row_weights", "dropped"), plain, fused
    ):
        assert a.tobytes() == b.tobytes(), f"{name}: not what place_one_block writes"
    return (codes, scales), ref, pairs


@pytest.mark.parametrize("experts, k, tokens, kind, hidden", GATHERS)
def test_place_one_block_fp8_is_the_quantized_gather(experts, k, tokens, kind, hidden):
    rng = np.random.default_rng(experts * 31 + tokens + hidden)
    got, ref, pairs = _gather_both_ways(rng, experts, k, tokens, kind, hidden)
    _assert_same_bits(got, ref, pairs, f"E={experts} k={k} T={tokens} {kind} H={hidden}")


@pytest.mark.parametrize("offset", ["x", "q"])
@pytest.mark.parametrize("hidden", [2048, 136])
def test_place_one_block_fp8_scalar_path_on_misaligned_operands(offset, hidden):
    rng = np.random.default_rng(hidden)
    got, ref, pairs = _gather_both_ways(rng, 64, 8, 16, "messy", hidden, offset=offset)
    _assert_same_bits(got, ref, pairs, f"{offset} misaligned, H={hidden}")


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float32])
def test_place_one_block_fp8_special_values_and_element_types(dtype):
    rng = np.random.default_rng(11)
    for hidden in (200, 100):
        got, ref, pairs = _gather_both_ways(rng, 32, 4, 33, "messy", hidden, dtype=dtype, specials=True)
        _assert_same_bits(got, ref, pairs, f"{np.dtype(dtype).name} H={hidden}")


# -- the gather above decode sizes: gather_rows_fp8 ---------------------------------------

# (rows, tokens, k, hidden): 2048 is Qwen3-30B-A3B's hidden size, 7168
# DeepSeek-V3's; 136 and 200 end in a partial 128-column block; 100 is no
# multiple of 8 (the scalar path); 70,000 rows pass the grid's 65,535 blocks.
ROW_GATHERS = [(1, 1, 1, 2048), (1032, 129, 8, 2048), (333, 60, 6, 136), (700, 100, 7, 200),
               (4096, 512, 8, 7168), (257, 40, 8, 100), (70_000, 8750, 8, 136)]  # fmt: skip


def _gather_rows_both_ways(rng, rows, tokens, k, hidden, *, dtype=BF16, offset="", specials=False):
    """(gather_rows_fp8's codes and scales, quantize_rows_fp8 of what
    gather_rows writes) for the same x and row_to_pair: a permutation of the
    pairs with about 15% of the rows empty (-1: zeros). ``offset`` "x" puts x
    1 element off a 16-byte boundary, "q" the codes 1 byte off 8."""
    import cupy

    x = _on_device(_values(rng, (tokens, hidden), dtype, specials), offset == "x")
    r2p = rng.permutation(max(rows, tokens * k))[:rows].astype(np.int32)
    r2p[r2p >= tokens * k] = -1
    if rows > 1:
        r2p[rng.random(rows) < 0.15] = -1
    p2r = cupy.asarray(pair_to_row_of(r2p, tokens * k))
    r2p = cupy.asarray(r2p)
    plain = cupy.full((rows, hidden), np.nan, dtype=dtype)
    K.gather_rows(_stream(), _arch(), x, p2r, r2p, k, plain)
    ref = cg.quantize_rows_fp8(plain)
    codes, scales = _poisoned_fp8(rows, hidden, 1 if offset == "q" else 0)
    K.gather_rows(_stream(), _arch(), x, p2r, r2p, k, None, (codes[:rows], scales[:rows]))
    cupy.cuda.get_current_stream().synchronize()
    return (codes, scales), ref


@pytest.mark.parametrize("rows, tokens, k, hidden", ROW_GATHERS)
def test_gather_rows_fp8_is_the_quantized_gather(rows, tokens, k, hidden):
    rng = np.random.default_rng(rows + hidden)
    got, ref = _gather_rows_both_ways(rng, rows, tokens, k, hidden)
    _assert_same_bits(got, ref, rows, f"rows={rows} T={tokens} k={k} H={hidden}")


@pytest.mark.parametrize("offset", ["x", "q"])
@pytest.mark.parametrize("hidden", [2048, 136])
def test_gather_rows_fp8_scalar_path_on_misaligned_operands(offset, hidden):
    rng = np.random.default_rng(hidden + 1)
    got, ref = _gather_rows_both_ways(rng, 300, 50, 8, hidden, offset=offset)
    _assert_same_bits(got, ref, 300, f"{offset} misaligned, H={hidden}")


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float32])
def test_gather_rows_fp8_special_values_and_element_types(dtype):
    rng = np.random.default_rng(12)
    for hidden in (200, 100):
        got, ref = _gather_rows_both_ways(rng, 150, 33, 4, hidden, dtype=dtype, specials=True)
        _assert_same_bits(got, ref, 150, f"{np.dtype(dtype).name} H={hidden}")


# -- the FP8 decode layer, fused and not ----------------------------------------------

# (name, experts, k, hidden, inter, biases, which weights are FP8)
LAYERS = [
    ("qwen3-30b-a3b", 128, 8, 2048, 768, False, "both"),
    ("k-tails", 16, 4, 272, 144, True, "both"),
    ("fp8 w1 only", 16, 8, 256, 256, True, "w1"),
    ("fp8 w2 only", 16, 4, 256, 256, True, "w2"),
]
# T up to 129 with k = 8: 1032 pairs, past one block: the four-launch
# placement, whose gather quantizes GEMM 1's rows (gather_rows_fp8).
STEPS = [1, 2, 7, 16, 33, 64, 128, 129, 16, 1]


@pytest.fixture
def _hopper(monkeypatch):
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the FP8 kernel runs on SM 9.0 GPUs only")

    def refuse(self, *args, **kwargs):
        raise AssertionError("an FP8 weight was dequantized on the FP8 kernel step")

    monkeypatch.setattr(cg.FP8ExpertWeights, "dequantize", refuse)


def _weights(rng, experts, hidden, inter, biases, fp8):
    """(w1, w2, b1, b2) in the checkpoint layout: FP8 where ``fp8`` says, else
    bf16 (the FP8 weight's dequantized values, by the NumPy twin)."""
    import cupy

    from cublas_grouped.testing_fp8 import dequantize_ref

    out = []
    for name, shape in (("w1", (experts, 2 * inter, hidden)), ("w2", (experts, hidden, inter))):
        w = cupy.asarray((rng.standard_normal(shape) * shape[2] ** -0.5).astype(BF16))
        q = cg.quantize_fp8(w, trans_b=True)
        if fp8 in ("both", name):
            out.append(q)
        else:
            out.append(cupy.asarray(dequantize_ref(q.values.get(), q.scales.get(), 128, 128).astype(BF16)))
    if biases:
        out += [
            cupy.asarray((rng.standard_normal((experts, n)) * 0.1).astype(BF16)) for n in (2 * inter, hidden)
        ]
    else:
        out += [None, None]
    return out


def _poison(layer):
    """NaN in every float buffer (bf16 rows included), the schedule far out of
    range, and e4m3 NaN codes with NaN scales in the FP8 rows: what a step
    reads without writing it first shows."""
    poison(layer)
    layer._buffers.schedule.fill(0x3FFFFFFF)
    rows8 = layer._fp8_rows
    for codes, scales in ((rows8.x_q, rows8.x_s), (rows8.act_q, rows8.act_s)):
        codes.fill(CODE_POISON)
        scales.fill(np.nan)


def _nan_bf16(array):
    """Whether every element of a bf16 array is still NaN (never written)."""
    bits = array.view(np.uint16)
    return bool(((bits & 0x7FFF) > 0x7F80).all())


@pytest.mark.parametrize("name, experts, k, hidden, inter, biases, fp8", LAYERS)
def test_fp8_layer_fused_and_unfused_give_the_same_bits(
    _hopper, monkeypatch, name, experts, k, hidden, inter, biases, fp8
):
    """One eager layer, FUSE_QUANTIZE toggled between two calls on the same
    inputs: the same output bits; no quantize launch when fused (the gather,
    in one placement launch or after four, and the activation write e4m3),
    one per FP8 GEMM when not; with FP8 w1 no bf16 row gathered when fused."""
    import cupy

    rng = np.random.default_rng(experts + hidden + inter)
    w1, w2, b1, b2 = _weights(rng, experts, hidden, inter, biases, fp8)
    layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=max(STEPS), b1=b1, b2=b2, trans_b=True, graphs=False)
    assert layer.fp8_kernel and layer.fp8_unsupported is None
    from cublas_grouped.moe import fp8_step_launches

    quantized = []  # the quantize launches of each step the layer replays (prepared launches)
    real = fp8_step_launches.FP8StepLaunches.__call__

    def counted(self, *args):
        quantized.extend(q for q in (self.quantize1, self.quantize2) if q is not None)
        return real(self, *args)

    monkeypatch.setattr(fp8_step_launches.FP8StepLaunches, "__call__", counted)
    fp8_w1, fp8_w2 = fp8 in ("both", "w1"), fp8 in ("both", "w2")
    for step, tokens in enumerate(STEPS):
        x = cupy.asarray((rng.standard_normal((tokens, hidden)) * 2).astype(BF16))
        ids, w = step_routing(rng, step, tokens, experts, k)
        ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
        outs = {}
        for fuse in (False, True):
            monkeypatch.setattr(fp8_step, "FUSE_QUANTIZE", fuse)
            quantized.clear()
            _poison(layer)
            outs[fuse] = layer.forward(x, ids_d, w_d).copy()
            cupy.cuda.get_current_stream().synchronize()
            if fuse:
                assert quantized == [], (name, tokens, quantized)
                if fp8_w1:
                    assert _nan_bf16(layer._buffers.rows[: tokens * k]), (
                        f"{name} T={tokens}: bf16 rows gathered"
                    )
            else:
                assert len(quantized) == fp8_w1 + fp8_w2, (name, tokens, quantized)
        host = {fuse: cupy.asnumpy(out.view(cupy.uint16)) for fuse, out in outs.items()}
        assert not ((host[True] & 0x7FFF) > 0x7F80).any(), f"{name} T={tokens}: NaN in the output"
        assert (host[True] == host[False]).all(), (
            f"{name} T={tokens}: {int((host[True] != host[False]).sum())} output elements differ fused/unfused"
        )


@pytest.mark.parametrize("name, experts, k, hidden, inter, biases, fp8", LAYERS[:2])
def test_fp8_layer_graphs_fused_and_unfused_give_the_same_bits(
    _hopper, monkeypatch, name, experts, k, hidden, inter, biases, fp8
):
    """The layer's own CUDA graphs (captured with the flag as set at each
    step's first call): two layers, one captured fused, one not; the same
    output bits at every T, replays included."""
    import cupy

    rng = np.random.default_rng(experts * 3 + inter)
    w1, w2, b1, b2 = _weights(rng, experts, hidden, inter, biases, fp8)
    opts = {"b1": b1, "b2": b2, "trans_b": True, "graphs": True}
    layers = {fuse: cg.FixedCapacityMoE(w1, w2, k, max_tokens=max(STEPS), **opts) for fuse in (False, True)}
    for step, tokens in enumerate(STEPS + STEPS):  # the second round replays
        x = cupy.asarray((rng.standard_normal((tokens, hidden)) * 2).astype(BF16))
        ids, w = step_routing(rng, step, tokens, experts, k)
        ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
        host = {}
        for fuse, layer in layers.items():
            monkeypatch.setattr(fp8_step, "FUSE_QUANTIZE", fuse)
            _poison(layer)
            host[fuse] = cupy.asnumpy(layer.forward(x, ids_d, w_d).view(cupy.uint16))
        assert (host[True] == host[False]).all(), f"{name} T={tokens} step {step}: fused and unfused differ"
        assert not ((host[True] & 0x7FFF) > 0x7F80).any(), f"{name} T={tokens}: NaN in the output"
