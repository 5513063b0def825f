"""The fixed-capacity layer's FP8 step on the CPU: which layers it takes and why
not (the reason names the weight), ``quantize_rows_fp8``'s ``out`` refusals,
the capacity refusal before any device query, and the step's launch sequence
(each FP8 GEMM's rows quantized into the layer's own buffers: by the placement
and the activation kernel themselves where they can, else by a quantize launch;
the schedule made once for GEMM 1 and again for GEMM 2, the 16-bit kernel for
a 16-bit weight), recorded on stand-ins without a GPU."""

from __future__ import annotations

import dataclasses
import re

import ml_dtypes
import numpy as np
import pytest

import cublas_grouped as cg
from cublas_grouped.gemm.config import Algorithm
from cublas_grouped.moe import fp8_step
from cublas_grouped.moe.checks import layer_shape

BF16 = ml_dtypes.bfloat16
HOPPER = (9, 0)
PTR = 0x7F0000000000
# Any timer: fp8_kernel_step then launches each kernel afresh through the
# functions _record stands in for (without one it replays prepared launches:
# tests/test_fp8_step_launches.py compares the two).
TIMED = "a timer"


def _fp8(fake, shape, scaling="block128", ptr=PTR):
    e, r, c = shape
    tr, tc = (128, 128) if scaling == "block128" else (1, c)
    scales = (e, -(-r // tr), -(-c // tc))
    return cg.FP8ExpertWeights(fake(shape, np.uint8, ptr=ptr), fake(scales, np.float32), scaling, True)


def _layer(fake, e=8, h=256, i=128, **kw):
    """FP8 w1 [E, 2I, H] and w2 [E, H, I], trans_b, and the layer's shape."""
    w1, w2 = _fp8(fake, (e, 2 * i, h), **kw), _fp8(fake, (e, h, i), **kw)
    return w1, w2, layer_shape(w1, w2, 2, trans_b=True)


def test_takes_checkpoint_layout_bf16_on_hopper(fake):
    w1, w2, shape = _layer(fake)
    assert fp8_step.fp8_step_unsupported(HOPPER, Algorithm.AUTO, shape, w1, w2) is None
    assert fp8_step.fp8_step_unsupported(HOPPER, "sm90_grouped", shape, w1, w2) is None


def test_takes_k_not_a_multiple_of_128(fake):
    """H = 272 and I = 144 (2 * 128 + 16, 128 + 16): the last 128-column block of
    a row is partial and has its own scale, which the kernel reads as it is."""
    w1, w2, shape = _layer(fake, h=272, i=144)
    assert fp8_step.fp8_step_unsupported(HOPPER, Algorithm.AUTO, shape, w1, w2) is None


@pytest.mark.parametrize(
    "case, reason",
    [
        ("sm80", r"^w1: needs an SM 9\.0 GPU \(Hopper\); this one is SM 8\.0"),
        ("cublas", r"the executor's algorithm is 'cublas_grouped', not auto or sm90_grouped"),
        ("fp16", r"the FP8 kernel takes bfloat16 tokens; the layer's dtype is float16"),
        ("k % 16", r"^w1: needs K % 16 == 0 and N % 8 == 0 .*got K=200, N=256"),
        ("w2 k % 16", r"^w2: needs K % 16 == 0 and N % 8 == 0 .*got K=68, N=256"),
        ("channel", r"^w1: takes 'block128' scaling only; got 'channel'"),
        ("misaligned", r"^w1: needs 16-byte aligned operands; got address 0x7f0000000008"),
    ],
)
def test_refusals_name_the_weight(fake, case, reason):
    sm, algorithm, kw, dtype = HOPPER, Algorithm.AUTO, {}, None
    if case == "sm80":
        sm = (8, 0)
    elif case == "cublas":
        algorithm = Algorithm.CUBLAS_GROUPED
    elif case == "fp16":
        dtype = np.float16
    elif case == "k % 16":
        kw = {"h": 200}
    elif case == "w2 k % 16":
        kw = {"i": 68}  # 2I = 136 is w1's N (a multiple of 8); I = 68 is w2's K
    elif case == "channel":
        kw = {"scaling": "channel"}
    elif case == "misaligned":
        kw = {"ptr": PTR + 8}
    w1, w2, shape = _layer(fake, **kw)
    if dtype is not None:
        shape = layer_shape(w1, w2, 2, trans_b=True, dtype=dtype)
    got = fp8_step.fp8_step_unsupported(sm, algorithm, shape, w1, w2)
    assert got is not None
    assert re.search(reason, got), got


def test_one_fp8_weight_and_one_16_bit(fake):
    """A 16-bit w2 beside FP8 w1 runs on the 16-bit kernel: it must fit that one."""
    w1, w2, _ = _layer(fake)
    dense = fake((8, 256, 128), BF16)
    shape = layer_shape(w1, dense, 2, trans_b=True)
    assert fp8_step.fp8_step_unsupported(HOPPER, Algorithm.AUTO, shape, w1, dense) is None
    odd = fake((8, 256, 128), BF16, ptr=PTR + 2)
    got = fp8_step.fp8_step_unsupported(HOPPER, Algorithm.AUTO, shape, w1, odd)
    assert got == "w2: needs 16-byte aligned weights"
    dense1 = fake((8, 256, 256), BF16)
    assert fp8_step.fp8_step_unsupported(HOPPER, Algorithm.AUTO, shape, dense1, dense) == (
        "neither w1 nor w2 is FP8ExpertWeights"
    )


def test_quantize_rows_out_refusals(fake):
    x = fake((10, 300), BF16)  # 3 scale blocks per row, the last partial
    good = (fake((10, 300), np.uint8), fake((10, 3), np.float32))
    with pytest.raises(ValueError, match=r"out must be a pair \(values, scales\); got FakeGpuArray"):
        cg.quantize_rows_fp8(x, out=good[0])
    with pytest.raises(
        ValueError, match=r"out\[0\] \(values\) must be a C-contiguous uint8 array \(10, 300\)"
    ):
        cg.quantize_rows_fp8(x, out=(fake((10, 300), np.int8), good[1]))
    with pytest.raises(
        ValueError, match=r"out\[1\] \(scales\) must be a C-contiguous float32 array \(10, 3\)"
    ):
        cg.quantize_rows_fp8(x, out=(good[0], fake((10, 2), np.float32)))
    with pytest.raises(ValueError, match=r"out\[1\] \(scales\) is on device 1; x is on device 0"):
        cg.quantize_rows_fp8(x, out=(good[0], fake((10, 3), np.float32, device=1)))


def test_fixed_capacity_fp8_capacity_refused_before_any_device_query(fake, monkeypatch):
    from cublas_grouped.moe.chunk_capacity import MAX_FIXED_CAPACITY_TOKENS
    from cublas_grouped.runtime import device

    def no_query(*args, **kwargs):
        raise AssertionError("queried the device")

    monkeypatch.setattr(device, "device_info", no_query)
    w1, w2, _ = _layer(fake)
    with pytest.raises(ValueError, match=r"max_tokens=\d+ is too large"):
        cg.FixedCapacityMoE(w1, w2, 2, max_tokens=MAX_FIXED_CAPACITY_TOKENS + 1, trans_b=True)


# -- the step's launch sequence, recorded ------------------------------------------


class _Arr:
    """A stand-in device array: a shape, an address and row slices."""

    def __init__(self, shape, ptr):
        self.shape, self.ptr = tuple(shape), ptr
        self.data = type("Data", (), {"ptr": ptr})()

    def __getitem__(self, rows):
        assert isinstance(rows, slice) and rows.start is None
        return _Arr((min(rows.stop, self.shape[0]), *self.shape[1:]), self.ptr)


def _record(monkeypatch):
    calls = []
    monkeypatch.setattr(fp8_step, "kernel_arch", lambda res: "sm_90a")
    monkeypatch.setattr(fp8_step, "mark_stage", lambda *a: None)

    def place_rows(res, shape, buf, x, ids, dropped, timer=None, quantized=None):
        if quantized is None:
            calls.append(("place_rows",))
        else:  # the placement writes the rows as e4m3 (place_one_block_fp8 or gather_rows_fp8)
            codes, scales = quantized
            calls.append(("place_rows", codes.ptr, codes.shape, scales.ptr, scales.shape))
        return "pair_to_row", "row_to_pair"

    def quantize(a, *, out, stream=None):
        calls.append(("quantize", a.ptr, a.shape, out[0].ptr, out[0].shape, out[1].ptr, out[1].shape))
        return out

    def fp8_gemm(res, w, m, ptrs, sizes, *, scanned, storage, counter):
        calls.append(("fp8_gemm", w, m, ptrs, sizes, scanned, storage, counter))

    def bf16_gemm(res, problem, ptrs, sizes, *, scanned, storage, counter):
        calls.append(("bf16_gemm", problem, ptrs, sizes, scanned, storage, counter))

    monkeypatch.setattr(fp8_step, "place_rows", place_rows)
    monkeypatch.setattr(fp8_step, "quantize_rows_fp8", quantize)
    monkeypatch.setattr(fp8_step.hopper_fp8, "grouped_rows_fp8", fp8_gemm)
    monkeypatch.setattr(fp8_step.hopper, "grouped_rows", bf16_gemm)
    monkeypatch.setattr(
        fp8_step.K, "expert_activation", lambda *a: calls.append(("activation", a[2].ptr, a[9].ptr, a[10]))
    )

    def activation_fp8(stream, arch, h, inter, gated, act, bias, row_to_pair, ids, out, gate_up_block=0):
        codes, scales = out
        calls.append(
            ("activation_fp8", h.ptr, codes.ptr, codes.shape, scales.ptr, scales.shape, gate_up_block)
        )
        assert (inter, gated, row_to_pair) == (codes.shape[1], 1, "row_to_pair")

    monkeypatch.setattr(fp8_step.K, "expert_activation_fp8", activation_fp8)
    monkeypatch.setattr(fp8_step.K, "combine_rows", lambda *a: calls.append(("combine", a[2].ptr)))
    return calls


def _buffers(rows, h, i):
    buf = type("Buf", (), {})()
    buf.rows, buf.h, buf.act, buf.y = (
        _Arr((rows, c), 0x1000 * (n + 1)) for n, c in enumerate((h, 2 * i, i, h))
    )
    buf.counts, buf.schedule = "counts", "schedule"
    rows8 = fp8_step.FP8Rows(
        _Arr((rows, h), 0x10000), _Arr((rows, -(-h // 128)), 0x20000), _Arr((rows, i), 0x30000),
        _Arr((rows, -(-i // 128)), 0x40000),
    )  # fmt: skip
    return buf, rows8


def test_step_quantizes_before_each_fp8_gemm_and_reuses_the_schedule(fake, monkeypatch):
    """FUSE_QUANTIZE off: a quantize launch before each FP8 GEMM (the old
    sequence, which the GPU test compares the fused one against)."""
    monkeypatch.setattr(fp8_step, "FUSE_QUANTIZE", False)
    calls = _record(monkeypatch)
    w1, w2, shape = _layer(fake, h=256, i=384)
    buf, rows8 = _buffers(48, 256, 384)
    ids = np.zeros((5, 2), np.int32)  # T = 5, k = 2: 10 rows of the 48 held
    res = type("Res", (), {"stream": 7, "launch_stream": 7, "cupy_stream": None})()
    fp8_step.fp8_kernel_step(res, shape, buf, rows8, "x", ids, None, (w1, w2, None, None), "out", None, TIMED)
    assert [c[0] for c in calls] == [
        "place_rows", "quantize", "fp8_gemm", "activation", "quantize", "fp8_gemm", "combine"
    ]  # fmt: skip
    q1, g1, act, q2, g2 = calls[1:6]
    assert q1 == ("quantize", 0x1000, (10, 256), 0x10000, (10, 256), 0x20000, (10, 2))
    assert g1 == ("fp8_gemm", w1, 10, (0x10000, 0x20000, 0x2000), "counts", True, "schedule", 0)
    assert act == ("activation", 0x2000, 0x3000, 0)  # h -> act, gate|up not blocked
    assert q2 == ("quantize", 0x3000, (10, 384), 0x30000, (10, 384), 0x40000, (10, 3))
    # Scanned too: GEMM 1 used tile counter 0 up; GEMM 2 takes counter 1 of the
    # same offsets launch (place_rows'), so the offsets kernel does not run again.
    assert g2 == ("fp8_gemm", w2, 10, (0x30000, 0x40000, 0x4000), "counts", True, "schedule", 1)
    assert calls[-1] == ("combine", 0x4000)


@pytest.mark.parametrize("fuse", [True, False])
def test_step_runs_a_16_bit_weight_on_the_16_bit_kernel(fake, monkeypatch, fuse):
    """FP8 w1, 16-bit w2: GEMM 1's rows quantized (by the placement when
    fused), the plain activation kernel (bf16 act, which the 16-bit GEMM 2 reads)."""
    monkeypatch.setattr(fp8_step, "FUSE_QUANTIZE", fuse)
    calls = _record(monkeypatch)
    w1, _, _ = _layer(fake, h=256, i=128)
    dense = fake((8, 256, 128), BF16)
    shape = layer_shape(w1, dense, 2, trans_b=True)
    buf, rows8 = _buffers(16, 256, 128)
    ids = np.zeros((3, 2), np.int32)
    res = type("Res", (), {"stream": 7, "launch_stream": 7, "cupy_stream": None})()
    w2 = _Arr((8, 256, 128), 0x9000)
    fp8_step.fp8_kernel_step(res, shape, buf, rows8, "x", ids, None, (w1, w2, None, None), "out", None, TIMED)
    if fuse:
        assert [c[0] for c in calls] == ["place_rows", "fp8_gemm", "activation", "bf16_gemm", "combine"]
        assert calls[0] == ("place_rows", 0x10000, (6, 256), 0x20000, (6, 2))
    else:
        assert [c[0] for c in calls] == [
            "place_rows", "quantize", "fp8_gemm", "activation", "bf16_gemm", "combine"
        ]  # fmt: skip
        assert calls[0] == ("place_rows",)
    gemm1 = calls[-4]
    assert gemm1 == ("fp8_gemm", w1, 6, (0x10000, 0x20000, 0x2000), "counts", True, "schedule", 0)
    assert calls[-3] == ("activation", 0x2000, 0x3000, 0)
    problem = (8, 6, 256, 128, True, np.dtype(BF16))
    assert calls[-2] == ("bf16_gemm", problem, (0x3000, 0x9000, 0x4000), "counts", True, "schedule", 1)


def test_fused_step_has_no_quantize_launch(fake, monkeypatch):
    """Decode (one placement launch), both weights FP8: the placement writes
    GEMM 1's codes and scales (the layer's x_q, x_s for T*k rows) and no bf16
    rows, the activation kernel writes GEMM 2's (act_q, act_s), and each FP8
    GEMM reads the buffers written for it, with no quantize launch between."""
    assert fp8_step.FUSE_QUANTIZE is True  # the default
    calls = _record(monkeypatch)
    w1, w2, shape = _layer(fake, h=256, i=384)
    buf, rows8 = _buffers(48, 256, 384)
    ids = np.zeros((5, 2), np.int32)  # 10 pairs of the 48 rows held
    res = type("Res", (), {"stream": 7, "launch_stream": 7, "cupy_stream": None})()
    fp8_step.fp8_kernel_step(res, shape, buf, rows8, "x", ids, None, (w1, w2, None, None), "out", None, TIMED)
    assert [c[0] for c in calls] == ["place_rows", "fp8_gemm", "activation_fp8", "fp8_gemm", "combine"]
    place, g1, act, g2, combine = calls
    assert place == ("place_rows", 0x10000, (10, 256), 0x20000, (10, 2))
    assert g1 == ("fp8_gemm", w1, 10, (0x10000, 0x20000, 0x2000), "counts", True, "schedule", 0)
    assert act == ("activation_fp8", 0x2000, 0x30000, (10, 384), 0x40000, (10, 3), 0)  # h -> act_q, act_s
    assert g2 == ("fp8_gemm", w2, 10, (0x30000, 0x40000, 0x4000), "counts", True, "schedule", 1)
    assert combine == ("combine", 0x4000)


@pytest.mark.parametrize("case", ["1032 pairs", "one launch off"])
def test_four_launch_placement_quantizes_in_its_gather(fake, monkeypatch, case):
    """Where place_one_block does not run (more than 1024 pairs, or
    PLACE_IN_ONE_LAUNCH off; the layer takes at most the 1024 experts it
    takes), place_rows gets GEMM 1's codes and scales all the same (its
    gather launch writes them: gather_rows_fp8), so no quantize launch runs;
    the activation still writes GEMM 2's codes. With FUSE_QUANTIZE off the
    quantize launch is back."""
    from cublas_grouped.moe import kernel_step

    calls = _record(monkeypatch)
    tokens = 129  # k = 8: 1032 pairs
    if case == "one launch off":
        tokens = 5
        monkeypatch.setattr(kernel_step, "PLACE_IN_ONE_LAUNCH", False)
    w1, w2, shape = _layer(fake, h=256, i=384)
    pairs = tokens * 8
    buf, rows8 = _buffers(pairs, 256, 384)
    ids = np.zeros((tokens, 8), np.int32)
    res = type("Res", (), {"stream": 7, "launch_stream": 7, "cupy_stream": None})()
    fp8_step.fp8_kernel_step(res, shape, buf, rows8, "x", ids, None, (w1, w2, None, None), "out", None, TIMED)
    assert [c[0] for c in calls] == ["place_rows", "fp8_gemm", "activation_fp8", "fp8_gemm", "combine"]
    assert calls[0] == ("place_rows", 0x10000, (pairs, 256), 0x20000, (pairs, 2))
    assert calls[1] == ("fp8_gemm", w1, pairs, (0x10000, 0x20000, 0x2000), "counts", True, "schedule", 0)
    assert calls[2] == ("activation_fp8", 0x2000, 0x30000, (pairs, 384), 0x40000, (pairs, 3), 0)
    assert calls[3] == ("fp8_gemm", w2, pairs, (0x30000, 0x40000, 0x4000), "counts", True, "schedule", 1)
    calls.clear()
    monkeypatch.setattr(fp8_step, "FUSE_QUANTIZE", False)
    fp8_step.fp8_kernel_step(res, shape, buf, rows8, "x", ids, None, (w1, w2, None, None), "out", None, TIMED)
    names = [c[0] for c in calls]
    assert names == ["place_rows", "quantize", "fp8_gemm", "activation", "quantize", "fp8_gemm", "combine"]
    assert calls[0] == ("place_rows",)  # bf16 rows into buf.rows
    assert calls[1] == ("quantize", 0x1000, (pairs, 256), 0x10000, (pairs, 256), 0x20000, (pairs, 2))


@pytest.mark.parametrize("block", [0, 128])
def test_16_bit_w1_beside_fp8_w2_fuses_only_the_activation(fake, monkeypatch, block):
    """16-bit w1 (gate|up plain, or packed in blocks: the activation kernel
    reads them so), FP8 w2: the placement gathers bf16 rows for the 16-bit
    GEMM 1, and the activation writes GEMM 2's codes and scales."""
    calls = _record(monkeypatch)
    _, w2, _ = _layer(fake, h=256, i=128)
    dense = fake((8, 256, 256), BF16)
    shape = layer_shape(dense, w2, 2, trans_b=True)
    if block:
        shape = dataclasses.replace(shape, gate_up_block=block)
    buf, rows8 = _buffers(16, 256, 128)
    ids = np.zeros((3, 2), np.int32)
    res = type("Res", (), {"stream": 7, "launch_stream": 7, "cupy_stream": None})()
    w1 = _Arr((8, 256, 256), 0x9000)
    fp8_step.fp8_kernel_step(res, shape, buf, rows8, "x", ids, None, (w1, w2, None, None), "out", None, TIMED)
    assert [c[0] for c in calls] == ["place_rows", "bf16_gemm", "activation_fp8", "fp8_gemm", "combine"]
    assert calls[0] == ("place_rows",)
    problem = (8, 6, 256, 256, True, np.dtype(BF16))
    assert calls[1] == ("bf16_gemm", problem, (0x1000, 0x9000, 0x2000), "counts", True, "schedule", 0)
    assert calls[2] == ("activation_fp8", 0x2000, 0x30000, (6, 128), 0x40000, (6, 1), block)
    assert calls[3] == ("fp8_gemm", w2, 6, (0x30000, 0x40000, 0x4000), "counts", True, "schedule", 1)


def test_step_refuses_too_few_fp8_rows(fake, monkeypatch):
    _record(monkeypatch)
    w1, w2, shape = _layer(fake)
    buf, rows8 = _buffers(8, 256, 128)
    ids = np.zeros((5, 2), np.int32)
    res = type("Res", (), {"stream": 7, "launch_stream": 7, "cupy_stream": None})()
    with pytest.raises(RuntimeError, match="a step of 5 tokens needs 10 FP8 rows; 8 held"):
        fp8_step.fp8_kernel_step(
            res, shape, buf, rows8, "x", ids, None, (w1, w2, None, None), "out", None, TIMED
        )


def test_fixed_capacity_step_refuses_fp8_weights_without_their_rows(fake, monkeypatch):
    from cublas_grouped.moe import fixed_capacity

    monkeypatch.setattr(fixed_capacity, "kernel_arch", lambda res: "sm_90a")
    w1, w2, shape = _layer(fake)
    res = type("Res", (), {"launch_stream": 7})()
    with pytest.raises(RuntimeError, match=r"needs its quantized-row buffers \(fp8_rows\)"):
        fixed_capacity.fixed_capacity_step(
            res, None, shape, None, "x", np.zeros((2, 2), np.int32), None, (w1, w2, None, None), "out"
        )


# -- the benchmark's FP8 row (--fp8) -----------------------------------------------


@pytest.mark.parametrize(
    "sm, dtype, error",
    [
        ((8, 0), "bfloat16", "skipped: fp8 needs an SM 9.0 GPU (this one is SM 8.0)"),
        ((9, 0), "float32", "skipped: fp8 takes bfloat16 or float16, not float32"),
        ((9, 0), "float16", "skipped: fp8 takes bfloat16 activations, not float16"),
    ],
)
def test_bench_fp8_row_only_with_the_flag_and_says_why_not(monkeypatch, sm, dtype, error):
    import sys

    from test_bench_cpu import _FakeGpu

    from cublas_grouped.tools.bench import cli, runner, workloads

    fake = _FakeGpu()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    argv = ["--experts", "4", "--topk", "2", "--hidden", "8", "--inter", "16", "--tokens", "16"]
    argv += ["--routing", "uniform", "--no-torch", "--warmup", "1", "--repeat", "3", "--dtype", dtype]
    for flag in (False, True):
        args = cli.parse_args(argv + (["--fp8"] if flag else []))
        args.hbm_gbs = 3350.0
        results, _ = runner.run_all(workloads.build_cases(args), args, fake.api(sm=sm))
        rows = [r for r in results if r.method in ("fp8", "fp8-rows")]
        if not flag:
            assert rows == []
            continue
        # The FP8 row and the kernel-alone row (rows quantized beforehand), each saying why not.
        assert [(r.section, r.method, r.error) for r in rows] == [
            ("gemm1", "fp8", error),
            ("gemm1", "fp8-rows", error),
        ]
        gemm1 = [r.method for r in results if r.section == "gemm1"]
        assert gemm1[-2:] == ["fp8", "fp8-rows"] and "dense" in gemm1  # after the others; they still run


# -- quantize_rows_fp8's vector path --------------------------------------------------


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_quantize_rows_has_16_byte_loads_and_exact_division(arch):
    from test_fp8_cpu import _ptx_entries

    from cublas_grouped.gemm.fp8_kernels import QROWS_PAIRS

    entries = _ptx_entries(arch)
    for dtype, loads in (("f32", 2), ("f16", 1), ("bf16", 1)):
        body = entries[f"quantize_rows_fp8_{dtype}"]
        # 8 elements per lane (32 or 16 bytes) for each of the pass's tile pairs, all issued first.
        assert body.count("ld.global.v4") == loads * QROWS_PAIRS, dtype
        assert "st.global.v2.b32" in body  # 8 codes per store
        assert "st.global.u8" in body  # the scalar path for other shapes and addresses
        assert "div.rn.f32" in body and "div.approx" not in body and ".ftz" not in body
        # The hardware conversion from SM 8.9 on (e4m3_code), the software routine before.
        assert ("cvt.rn.satfinite.e4m3x2.f32" in body) == (arch == "sm_90"), (arch, dtype)


def test_quantize_rows_grid_covers_the_tiles_of_a_warp_pass_on_the_vector_path():
    from cublas_grouped.gemm.fp8_kernels import QROWS_PAIRS, rows_per_warp

    assert rows_per_warp(2048, 0x1000, 0x2008) == 2 * QROWS_PAIRS == 8
    assert rows_per_warp(300, 0x1000, 0x2000) == 1  # cols % 8
    assert rows_per_warp(2048, 0x1002, 0x2000) == 1  # x not 16-byte aligned
    assert rows_per_warp(2048, 0x1000, 0x2004) == 1  # q not 8-byte aligned


# -- moe_forward(fixed_capacity=True): which weights reach the step as they are ----------


class _ReachedTheStep(Exception):
    pass


@pytest.mark.parametrize(
    "sm, algorithm, dequantized",
    [((9, 0), "auto", []), ((9, 0), "sm90_grouped", []), ((8, 0), "auto", ["w1", "w2"]),
     ((9, 0), "cublas_grouped", ["w1", "w2"])],
)  # fmt: skip
def test_moe_forward_fixed_capacity_keeps_fp8_weights_for_the_fp8_step(
    fake, monkeypatch, sm, algorithm, dequantized
):
    """Up to its first GPU work: on SM 9.0 under AUTO or SM90_GROUPED the FP8
    weights are not dequantized (the FP8 step reads them); elsewhere both are."""
    import types

    from cublas_grouped.moe import layer

    seen = []

    def dense_weights(w, dtype, stream=None):
        seen.append("w1" if w is w1 else "w2")
        return fake(w.shape, dtype)

    def stop(*args, **kwargs):
        raise _ReachedTheStep

    monkeypatch.setattr(layer, "dense_weights", dense_weights)
    monkeypatch.setattr(layer, "stream_resources", stop)
    w1, w2, _ = _layer(fake)
    info = types.SimpleNamespace(sm=sm)
    executor = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm=algorithm), device_info=info)
    x, ids = fake((4, 256), BF16), fake((4, 2), np.int32)
    with pytest.raises(_ReachedTheStep):
        cg.moe_forward(x, ids, None, w1, w2, trans_b=True, fixed_capacity=True, executor=executor)
    assert seen == dequantized


def test_a_16_bit_w1_beside_fp8_w2(fake):
    """Either weight may be the FP8 one: a 16-bit w1 with FP8 w2 is taken, and
    the 16-bit w1 must fit the 16-bit kernel (its address, its shape)."""
    _, w2, _ = _layer(fake)
    dense = fake((8, 256, 256), BF16)
    shape = layer_shape(dense, w2, 2, trans_b=True)
    assert fp8_step.fp8_step_unsupported(HOPPER, Algorithm.AUTO, shape, dense, w2) is None
    odd = fake((8, 256, 256), BF16, ptr=PTR + 2)
    got = fp8_step.fp8_step_unsupported(HOPPER, Algorithm.AUTO, shape, odd, w2)
    assert got == "w1: needs 16-byte aligned weights"


def test_a_16_bit_weight_of_a_shape_the_16_bit_kernel_refuses(fake):
    """FP8 w1 (N = 2I = 136, K = 256: the FP8 kernel takes it) beside a 16-bit
    w2 whose K = I = 68 is no multiple of 8: the 16-bit kernel's refusal, named."""
    w1, _, _ = _layer(fake, i=68)
    dense = fake((8, 256, 68), BF16)
    shape = layer_shape(w1, dense, 2, trans_b=True)
    got = fp8_step.fp8_step_unsupported(HOPPER, Algorithm.AUTO, shape, w1, dense)
    assert got == "w2: needs K and N to be multiples of 8 (16-byte rows); got K=68, N=256", got
