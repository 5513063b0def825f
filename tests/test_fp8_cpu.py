"""FP8 without a GPU: the NumPy e4m3 model against ml_dtypes (exhaustively), the
tile-scale rules, the kernel's build, the format's checks and every argument
error of the FP8 entry points (raised before any GPU work, on fake arrays)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import cublas_grouped as cg
from cublas_grouped.gemm import fp8 as fp8_mod
from cublas_grouped.gemm import fp8_kernels
from cublas_grouped.testing_fp8 import (
    E4M3_MAX,
    MIN_SCALE,
    dequantize_ref,
    e4m3_decode,
    e4m3_encode,
    quantize_ref,
    tile_scales_ref,
)

E4M3 = ml_dtypes.float8_e4m3fn
ALL_CODES = np.arange(256, dtype=np.uint8)


# -- the model against ml_dtypes -------------------------------------------------


def test_decode_every_code():
    ref = ALL_CODES.view(E4M3).astype(np.float32)
    mine = e4m3_decode(ALL_CODES)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(mine), nan) and nan.sum() == 2  # 0x7F and 0xFF
    assert np.array_equal(mine[~nan].view(np.uint32), ref[~nan].view(np.uint32))  # -0 included
    assert mine[0x7E] == 448 and mine[0x01] == 2.0**-9 and mine[0x08] == 2.0**-6


def _compare_encode(x: np.ndarray) -> None:
    """Our saturating encoder against ml_dtypes' (which gives NaN past 464)."""
    x = np.asarray(x, dtype=np.float32)
    mine = e4m3_encode(x)
    with np.errstate(invalid="ignore", over="ignore"):
        theirs = x.astype(E4M3)
    t_nan = np.isnan(theirs.astype(np.float32))
    same = ~t_nan | np.isnan(x)
    bad = np.flatnonzero(mine[same] != theirs.view(np.uint8)[same])
    assert not bad.size, f"{bad.size} differ, e.g. {x[same][bad[:5]]}: {mine[same][bad[:5]]}"
    overflow = t_nan & ~np.isnan(x)
    # Where ml_dtypes overflows to NaN, the encoder saturates to +-448.
    assert np.all(mine[overflow] == np.where(np.signbit(x[overflow]), 0xFE, 0x7E))
    assert np.all(np.abs(x[overflow]) > 448)
    nan = np.isnan(x)
    assert np.all(mine[nan] == np.where(np.signbit(x[nan]), 0xFF, 0x7F))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_encode_every_16_bit_value(dtype):
    _compare_encode(np.arange(1 << 16, dtype=np.uint16).view(dtype).astype(np.float32))


def test_encode_dense_float32_sweep():
    # Every float32 exponent from 2^-30 to 2^10, with mantissas whose low bits
    # sit around the rounding point of e4m3's 3 kept bits (and of subnormals).
    exps = np.arange(97, 138, dtype=np.uint32)
    high = np.arange(1 << 8, dtype=np.uint32) << 15
    low = np.array([0, 1, 0x3FFF, 0x4000, 0x4001, 0x7FFF], dtype=np.uint32)
    man = (high[:, None] | low[None, :]).ravel()
    bits = (exps[:, None] << 23 | man[None, :]).ravel()
    x = bits.view(np.float32)
    _compare_encode(np.concatenate([x, -x]))


def test_encode_ties_and_neighbours():
    # Midpoints between consecutive finite e4m3 values (exact in float32) and the
    # float32 numbers right beside them: ties go to the even code.
    finite = np.unique(np.abs(e4m3_decode(ALL_CODES)[np.isfinite(e4m3_decode(ALL_CODES))]).astype(np.float64))
    mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)
    x = np.concatenate([mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    _compare_encode(np.concatenate([x, -x]))
    codes = e4m3_encode(mids)
    assert np.all(codes % 2 == 0)  # every tie lands on an even mantissa


def test_encode_random_bits_and_specials():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    _compare_encode(x)
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 448, 464, 464.0001, 480, 1e30, 2.0**-10], np.float32
    )
    codes = e4m3_encode(special)
    assert list(codes) == [0x00, 0x80, 0x7E, 0xFE, 0x7F, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x00]


# -- tile scales -------------------------------------------------------------------


def test_scales_are_amax_over_448_per_tile_with_partial_edges():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 300, 200)).astype(np.float32)
    x[0, 256:, 128:] = 0  # a whole partial edge tile of zeros
    x[1, 5, 7] = np.nan  # ignored by amax
    x[1, 6, 7] = np.inf
    scales = tile_scales_ref(x, 128, 128)
    assert scales.shape == (2, 3, 2)
    mag = np.where(np.isfinite(x), np.abs(x), 0)
    for b in range(2):
        for i in range(3):
            for j in range(2):
                amax = mag[b, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].max()
                want = np.float32(1) if amax == 0 else max(np.float32(amax) / np.float32(448), MIN_SCALE)
                assert scales[b, i, j] == want, (b, i, j)
    assert scales[0, 2, 1] == 1


def test_quantize_round_trip_error_bound():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 130, 257)) * np.exp(rng.uniform(-8, 8, (3, 1, 257)))).astype(np.float32)
    codes, scales = quantize_ref(x, 128, 128)
    back = dequantize_ref(codes, scales, 128, 128)
    # 3 mantissa bits: half an ulp is 2^-4 relative for normals; subnormals
    # (below 2^-6 of the scale) lose at most half of 2^-9 scale.
    full = np.repeat(np.repeat(scales, 128, 1), 128, 2)[:, :130, :257]
    bound = np.maximum(np.abs(x) * 2.0**-4, full * 2.0**-10)
    assert np.all(np.abs(back - x) <= bound * 1.0001)
    assert np.abs(codes.view(E4M3).astype(np.float32)).max() <= E4M3_MAX


def test_row_scales_one_per_128_columns():
    x = np.arange(3 * 300, dtype=np.float32).reshape(3, 300)
    codes, scales = quantize_ref(x, 1, 128)
    assert codes.shape == (3, 300) and scales.shape == (3, 3)
    assert scales[2, 2] == np.float32(899) / np.float32(448)
    assert codes[0, 0] == 0 and scales[0, 0] == np.float32(127) / np.float32(448)


# -- the kernel and its launcher ------------------------------------------------


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
def test_kernel_compiles_with_integer_conversions(arch):
    pytest.importorskip("cuda.core")
    from cublas_grouped.runtime import nvrtc

    obj = nvrtc.compile_source("fp8", arch, fp8_kernels.DEFINES)
    assert bytes(obj.code)[:4] == b"\x7fELF"


def test_format_facts_agree_between_model_and_kernel_source():
    # fp8.cuh: the format and the rule, shared by every kernel that writes e4m3.
    src = (nvrtc_kernel_dir() / "fp8.cuh").read_text()
    assert "#define E4M3_MAX 448.0f" in src and E4M3_MAX == 448.0
    assert "0x43E00000u" in src and np.float32(448).view(np.uint32) == 0x43E00000
    assert "0x3C800000u" in src and np.float32(2.0**-6).view(np.uint32) == 0x3C800000
    # The hardware conversion only inside e4m3_code, from SM 8.9 on, NaN kept on
    # the integer routine (whose sign the hardware drops), and inside
    # e4m3x2_code, for two values that are not NaN (the row quantizer's
    # quotients of finite values): the same bits on every GPU (the GPU tests
    # compare the kernels' codes with the model's).
    assert src.count("cvt.rn.satfinite") == 3  # the comment and the two asm
    body = src[src.index("unsigned char e4m3_code(float f)") :]
    body = body[: body.index("\n}\n")]
    assert "__CUDA_ARCH__ >= 890" in body and "if (f != f) return float_to_e4m3(f);" in body
    pair = src[src.index("unsigned int e4m3x2_code(float a, float b)") :]
    pair = pair[: pair.index("\n}\n")]
    assert "__CUDA_ARCH__ >= 890" in pair and "float_to_e4m3(a)" in pair and "float_to_e4m3(b)" in pair
    assert src.count("e4m3x2_code(") == 5  # its definition and the four calls of the finite quotients
    assert (
        "cvt.rn.satfinite"
        not in src[: src.index("unsigned char e4m3_code(float f)")].split("end of conversions")[0]
    )
    # One copy: the kernels that write e4m3 (fp8.cu, and the activation and
    # the gather that quantize their own output) include it, none has its own.
    for path in sorted(nvrtc_kernel_dir().glob("*.cu")):
        text = path.read_text()
        assert "cvt.rn.satfinite" not in text and "E4M3_MAX" not in text, path.name
    for name in ("fp8.cu", "activation.cu", "dispatch.cu"):
        assert '#include "fp8.cuh"' in (nvrtc_kernel_dir() / name).read_text(), name


def nvrtc_kernel_dir():
    from cublas_grouped.runtime.nvrtc import kernel_dir

    return kernel_dir()


# -- FP8ExpertWeights on fake arrays ---------------------------------------------


def _fp8(fake, shape=(4, 256, 384), scaling="block128", trans_b=False, scales=None, **kw):
    e, r, c = shape
    tr, tc = fp8_mod._tile(scaling, trans_b, r, c)
    scales = scales or (e, -(-r // tr), -(-c // tc))
    return cg.FP8ExpertWeights(fake(shape, np.uint8), fake(scales, np.float32), scaling, trans_b, **kw)


def test_fp8_weights_shapes_and_memory(fake):
    w = _fp8(fake, (4, 300, 130), source_nbytes=4 * 300 * 130 * 2)
    assert (w.num_experts, w.in_features, w.out_features, w.tile) == (4, 300, 130, (128, 128))
    assert w.nbytes == 4 * 300 * 130 + 4 * 3 * 2 * 4
    assert "0.50" in w.memory_report() or "0.5" in w.memory_report()
    t = _fp8(fake, (4, 130, 300), trans_b=True)
    assert (t.in_features, t.out_features) == (300, 130)
    ch = _fp8(fake, (4, 300, 130), scaling="channel")
    assert ch.tile == (300, 1) and view_shape(ch.scales) == (4, 1, 130)
    cht = _fp8(fake, (4, 130, 300), scaling="channel", trans_b=True)
    assert cht.tile == (1, 300) and view_shape(cht.scales) == (4, 130, 1)
    assert w == w and w != t and len({w, t, w}) == 2  # compared by identity, hashable


def view_shape(a):
    return tuple(a.shape)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"scaling": "block64"}, ValueError, "scaling must be one of"),
        ({"scales": (4, 2, 2)}, ValueError, r"scales must be .* shape \(4, 2, 3\)"),
    ],
)
def test_fp8_weights_refuse_bad_parts(fake, kwargs, error, match):
    with pytest.raises(error, match=match):
        _fp8(fake, **kwargs)


def test_fp8_weights_refuse_wrong_values_dtype_and_devices(fake):
    with pytest.raises(ValueError, match="uint8 array"):
        cg.FP8ExpertWeights(fake((2, 128, 128), np.int8), fake((2, 1, 1), np.float32))
    with pytest.raises(ValueError, match="scales must be"):
        cg.FP8ExpertWeights(fake((2, 128, 128), np.uint8), fake((2, 1, 1), np.float16))
    with pytest.raises(ValueError, match="share a device"):
        cg.FP8ExpertWeights(fake((2, 128, 128), np.uint8), fake((2, 1, 1), np.float32, device=1))


def test_quantize_arguments(fake):
    with pytest.raises(ValueError, match="scaling must be one of"):
        cg.quantize_fp8(fake((2, 8, 8), np.float16), scaling="tensor")
    with pytest.raises(ValueError, match="3-D"):
        cg.quantize_fp8(fake((8, 8), np.float16))
    with pytest.raises(TypeError, match="w must be one of"):
        cg.quantize_fp8(fake((2, 8, 8), np.int32))
    with pytest.raises(ValueError, match="2-D"):
        cg.quantize_rows_fp8(fake((2, 8, 8), np.float16))
    with pytest.raises(TypeError, match="x must be one of"):
        cg.quantize_rows_fp8(fake((8, 8), np.uint8))
    with pytest.raises(TypeError, match="NumPy array in host memory"):
        cg.quantize_fp8(np.zeros((2, 8, 8), np.float32))


# -- entry points refuse bad FP8 calls before GPU work ----------------------------


BF16 = ml_dtypes.bfloat16


def test_gmm_fp8_argument_errors(fake):
    b = _fp8(fake, (3, 256, 384))
    a = fake((10, 256), BF16)
    with pytest.raises(ValueError, match="trans_a=True"):
        cg.gmm(a, b, [5, 5, 0], trans_a=True)
    with pytest.raises(ValueError, match=r"b are FP8 weights in the \[E, K, N\] layout .*pass trans_b=False"):
        cg.gmm(a, b, [5, 5, 0], trans_b=True)
    with pytest.raises(ValueError, match="K mismatch"):
        cg.gmm(fake((10, 128), BF16), b, [5, 5, 0])
    with pytest.raises(TypeError, match=r"a \(multiplied by FP8 weights b\) must be one of"):
        cg.gmm(fake((10, 256), np.int8), b, [5, 5, 0])
    with pytest.raises(ValueError, match="group_sizes"):
        cg.gmm(a, b, [5, 5])
    with pytest.raises(ValueError, match="out"):
        cg.gmm(a, b, [5, 5, 0], out=fake((10, 383), BF16))
    with pytest.raises(ValueError, match=r"group_sizes must be a 1-D integer array of 3; got int32 \(2,\)"):
        cg.gmm(a, b, fake((2,), np.int32))
    with pytest.raises(ValueError, match="group_sizes must be a 1-D integer array"):
        cg.gmm(a, b, fake((3,), np.float32))
    with pytest.raises(ValueError, match="PADDED_STRIDED needs the MoE layer's padded rows"):
        cg.gmm(a, b, [5, 5, 0], algorithm="padded_strided")


def _layer(fake, trans_b=False, e=4, h=256, i=128):
    w1 = _fp8(fake, (e, 2 * i, h) if trans_b else (e, h, 2 * i), trans_b=trans_b)
    w2 = _fp8(fake, (e, h, i) if trans_b else (e, i, h), trans_b=trans_b)
    return w1, w2


def test_moe_forward_fp8_argument_errors(fake):
    w1, w2 = _layer(fake)
    x, ids = fake((8, 256), BF16), fake((8, 2), np.int32)
    with pytest.raises(ValueError, match=r"w1 are FP8 weights .*pass trans_b=False"):
        cg.moe_forward(x, ids, None, w1, w2, trans_b=True)
    with pytest.raises(ValueError, match="w1 has K=256 but its input has 128"):
        cg.moe_forward(fake((8, 128), BF16), ids, None, w1, w2)
    _, bad_w2 = _layer(fake, i=256)
    with pytest.raises(ValueError, match="w2 has K=256 but its input has 128"):
        cg.moe_forward(x, ids, None, w1, bad_w2)
    with pytest.raises(ValueError, match="w2 has 3 experts; expected 4"):
        cg.moe_forward(x, ids, None, w1, _layer(fake, e=3)[1])
    with pytest.raises(TypeError, match="topk_ids must be int32"):
        cg.moe_forward(x, fake((8, 2), np.int64), None, w1, w2)
    # A dense w2 of another dtype than x is refused as before.
    with pytest.raises(TypeError, match="w2 must have dtype bfloat16"):
        cg.moe_forward(x, ids, None, w1, fake((4, 128, 256), np.float16))


def test_fixed_capacity_fp8_argument_errors(fake):
    w1, w2 = _layer(fake, trans_b=True)
    with pytest.raises(ValueError, match=r"w1 are FP8 weights .*pass trans_b=True"):
        cg.FixedCapacityMoE(w1, w2, top_k=2, max_tokens=8)
    with pytest.raises(TypeError, match=r"x \(multiplied by FP8 weights w1\) must be one of"):
        cg.FixedCapacityMoE(w1, w2, top_k=2, max_tokens=8, trans_b=True, dtype=np.int8)
    with pytest.raises(ValueError, match="b1 must be a C-contiguous float16"):
        cg.FixedCapacityMoE(w1, w2, 2, 8, trans_b=True, dtype=np.float16, b1=fake((4, 256), BF16))
    with pytest.raises(ValueError, match="top_k must be an int"):
        cg.FixedCapacityMoE(w1, w2, top_k=5, max_tokens=8, trans_b=True)


def test_layer_shape_with_fp8_weights(fake):
    from cublas_grouped.moe.checks import layer_shape

    w1, w2 = _layer(fake, trans_b=True)
    shape = layer_shape(w1, w2, 2, trans_b=True)
    assert (shape.num_experts, shape.hidden, shape.inter, shape.width) == (4, 256, 128, 256)
    assert shape.dtype == np.dtype(BF16)
    assert layer_shape(w1, w2, 2, trans_b=True, dtype=np.float16).dtype == np.float16


def test_expert_weights_and_mlp_take_fp8(fake):
    w1, w2 = _layer(fake, trans_b=True)
    ew = cg.ExpertWeights(w1, trans_b=True)
    assert (ew.num_experts, ew.in_features, ew.out_features, ew.nbytes) == (4, 256, 256, w1.nbytes)
    with pytest.raises(ValueError, match="pass trans_b=True"):
        cg.ExpertWeights(w1)
    with pytest.raises(ValueError, match=r"bias must be a float array \[4, 256\]"):
        cg.ExpertWeights(w1, fake((4, 255), BF16), trans_b=True)
    mlp = cg.MoEMLP(fake((256, 4), BF16), w1, w2, top_k=2)
    assert mlp.w1.weight is w1 and mlp.w1.trans_b and mlp.w2.weight is w2
    with pytest.raises(ValueError, match="same layout"):
        cg.MoEMLP(fake((256, 4), BF16), w1, fake((4, 128, 256), BF16), top_k=2)


def test_weight_manager_quantize_modes(fake):
    from cublas_grouped.moe.modules import QUANTIZE_MODES

    assert QUANTIZE_MODES == ("fp8-block128", "fp8-channel")
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        cg.ExpertWeightManager.load([fake((8, 8), BF16)], quantize="fp8")
    with pytest.raises(ValueError, match="mode must be one of"):
        cg.ExpertWeightManager.quantize(cg.ExpertWeights(fake((1, 8, 8), BF16)), "int8")
    w1, _ = _layer(fake, trans_b=True)
    with pytest.raises(ValueError, match="FP8 already"):
        cg.ExpertWeightManager.quantize(cg.ExpertWeights(w1, trans_b=True))


# -- the kernel's conversion code itself, compiled for the host ---------------------

_HOST_PRELUDE = """
#include <cstdio>
#include <cstring>
#define __device__
#define __forceinline__ inline
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
"""
_HOST_MAIN = """
int main() {
    // Decode all 256 codes, then encode each float32 bit pattern read from stdin.
    for (unsigned int c = 0; c < 256; ++c) { float v = e4m3_to_float(c); std::fwrite(&v, 4, 1, stdout); }
    unsigned int u;
    while (std::fread(&u, 4, 1, stdin) == 1) {
        unsigned char q = float_to_e4m3(__uint_as_float(u));
        std::fwrite(&q, 1, 1, stdout);
    }
    return 0;
}
"""


def _hard_float32_inputs() -> np.ndarray:
    """Bits of float32 values around every rounding point: the dense sweep, every
    tie between e4m3 values and its neighbours, every bf16 and fp16 value, and
    random bit patterns."""
    exps = np.arange(97, 138, dtype=np.uint32)
    man = (
        np.arange(1 << 8, dtype=np.uint32)[:, None] << 15
        | np.array([0, 1, 0x3FFF, 0x4000, 0x4001, 0x7FFF], np.uint32)
    ).ravel()
    sweep = (exps[:, None] << 23 | man[None, :]).ravel().view(np.float32)
    finite = np.unique(np.abs(e4m3_decode(ALL_CODES)[np.isfinite(e4m3_decode(ALL_CODES))]).astype(np.float64))
    mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)
    ties = np.concatenate([mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    halves = np.arange(1 << 16, dtype=np.uint16)
    rand = np.random.default_rng(7).integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    parts = [
        sweep,
        ties,
        halves.view(ml_dtypes.bfloat16).astype(np.float32),
        halves.view(np.float16).astype(np.float32),
    ]
    values = np.concatenate([np.concatenate(parts), -np.concatenate(parts)])
    return np.concatenate([values.view(np.uint32), rand])


def test_kernel_conversions_compiled_for_the_host_match_the_model(tmp_path):
    """The .cu's own conversion functions (as host C++) against the model: all 256
    decodes, and the encodes of the inputs of :func:`_hard_float32_inputs`."""
    import shutil
    import subprocess

    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    src = (nvrtc_kernel_dir() / "fp8.cuh").read_text()
    start, end = src.index("// ---- conversions:"), src.index("// ---- end of conversions ----")
    (tmp_path / "twin.cpp").write_text(_HOST_PRELUDE + src[start:end] + _HOST_MAIN)
    subprocess.run([compiler, "-O1", "-o", str(tmp_path / "twin"), str(tmp_path / "twin.cpp")], check=True)
    bits = _hard_float32_inputs()
    raw = subprocess.run(
        [str(tmp_path / "twin")], input=bits.tobytes(), check=True, capture_output=True
    ).stdout
    decoded = np.frombuffer(raw[:1024], dtype=np.float32)
    model = e4m3_decode(ALL_CODES)
    assert np.array_equal(np.isnan(decoded), np.isnan(model))
    assert np.array_equal(decoded[~np.isnan(model)].view(np.uint32), model[~np.isnan(model)].view(np.uint32))
    encoded = np.frombuffer(raw[1024:], dtype=np.uint8)
    assert encoded.size == bits.size
    assert np.array_equal(encoded, e4m3_encode(bits.view(np.float32)))


def _ptx_entries(arch: str) -> dict[str, str]:
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    from cublas_grouped.runtime.nvrtc import load_source

    err, prog = nvrtc.nvrtcCreateProgram(load_source("fp8").encode(), b"fp8.cu", 0, [], [])
    macros = [f"-D{k}={v}".encode() for k, v in fp8_kernels.DEFINES.items()]
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", *macros]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    err, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(prog)
    parts = ptx.rstrip(b"\0").decode().split(".entry ")[1:]
    return {part.split("(", 1)[0]: part for part in parts}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_divides_exactly_and_dequantizes_with_vector_accesses(arch):
    entries = _ptx_entries(arch)
    for dtype in ("f32", "f16", "bf16"):
        quantize = entries[f"quantize_fp8_{dtype}"]
        # The model's bits assume IEEE division (amax / 448, x / scale): no approximate division, no flush to zero.
        assert "div.rn.f32" in quantize and "div.approx" not in quantize and "div.full" not in quantize
        assert ".ftz" not in quantize
        dequantize = entries[f"dequantize_fp8_{dtype}"]
        assert "ld.global.u32" in dequantize  # four codes per load
        assert ("st.global.v4.b32" if dtype == "f32" else "st.global.v2.b32") in dequantize
