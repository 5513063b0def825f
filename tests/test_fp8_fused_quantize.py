"""The FP8 step's fused quantization on the CPU (NVRTC only, no GPU): the
placement, the gather and the activation kernel that write e4m3 codes and
scales themselves (dispatch.cu's ``place_one_block_fp8`` and
``gather_rows_fp8``, activation.cu's ``expert_activation_fp8``, all on
fp8.cuh's rule): they build for sm_90 and
sm_90a, their launchers' signatures are the kernels' parameters, their PTX has
the quantizer's vector accesses, exact divisions and the hardware conversion,
the plain kernels stay free of it, and the launchers pass the buffers given.
tests/test_fp8_fused_quantize_gpu.py checks the bits on a GPU."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_kernels_compile import elf_function_symbols
from test_overlapped_launches import _entries, _ptx

from cublas_grouped.moe import kernels as K

DTYPES = ("bf16", "f16", "f32")
# (source, fused kernel, its launcher's signature, the plain kernel, its signature)
FUSED = [
    ("dispatch", "place_one_block_fp8", K._PLACE_ONE_BLOCK_FP8, "place_one_block", K._PLACE_ONE_BLOCK),
    ("dispatch", "gather_rows_fp8", K._GATHER_ROWS_FP8, "gather_rows", K._GATHER_ROWS),
    (
        "dispatch",
        "gather_rows_fp8_by_token",
        K._GATHER_ROWS_FP8_BY_TOKEN,
        "gather_rows_by_token",
        K._GATHER_ROWS_BY_TOKEN,
    ),
    ("activation", "expert_activation_fp8", K._ACTIVATION_FP8, "expert_activation", K._ACTIVATION),
]


@pytest.fixture(scope="module")
def ptx():
    """Each source's PTX entries, by architecture."""
    pytest.importorskip("cuda.bindings")
    return {
        (source, arch): _entries(_ptx(source, arch, K.DEFINES[source]))
        for source in ("dispatch", "activation")
        for arch in ("sm_80", "sm_90")
    }


@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
@pytest.mark.parametrize("source, fused", [(f[0], f[1]) for f in FUSED])
def test_fused_kernels_build_and_are_exported(source, fused, arch):
    """The step compiles the row kernels for the device's sm_90; the FP8 GEMM's
    file is built for sm_90a: both build, every element type exported."""
    pytest.importorskip("cuda.core")
    from cublas_grouped.runtime import nvrtc

    symbols = elf_function_symbols(bytes(nvrtc.compile_source(source, arch, K.DEFINES[source]).code))
    assert {f"{fused}_{d}" for d in DTYPES} <= symbols


@pytest.mark.parametrize("source, fused, signature, plain, plain_signature", FUSED)
def test_launcher_signatures_are_the_kernels_parameters(
    ptx, source, fused, signature, plain, plain_signature
):
    """Each launcher packs its arguments by a struct signature ("q": 8 bytes,
    "i": 4): it must match the kernel's parameter list, width for width (a
    wrong one shifts every later argument on the GPU)."""
    widths = {".u64": "q", ".u32": "i", ".s32": "i"}
    for name, want in ((fused, signature), (plain, plain_signature)):
        for dtype in DTYPES:
            lines = ptx[(source, "sm_90")][f"{name}_{dtype}"]
            params = [line for line in lines if line.lstrip().startswith(".param")]
            got = "".join(widths[re.search(r"\.param (\.[a-z]\d+)", line).group(1)] for line in params)
            assert got == want, (name, dtype, got, want)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source, fused", [(f[0], f[1]) for f in FUSED])
def test_fused_kernels_quantize_as_the_row_quantizer_does(ptx, source, fused, arch):
    """16-byte loads and 8-byte code stores on the vector path, byte stores on
    the scalar one, fp32 scales stored, IEEE division (amax / 448 and x /
    scale, as the NumPy twin assumes), and e4m3_code's hardware conversion
    from SM 8.9 on (the integer routine before)."""
    entries = ptx[(source, arch)]
    for dtype in DTYPES:
        body = "\n".join(entries[f"{fused}_{dtype}"])
        assert re.search(r"ld\.global(\.nc)?\.v4\.[bfu]32", body), (fused, dtype, "no 16-byte load")
        assert "st.global.v2.b32" in body and "st.global.u8" in body, (fused, dtype)
        assert "st.global.f32" in body, (fused, dtype, "no scale stored")
        divisions = [line for line in body.splitlines() if "div." in line]
        assert any("div.rn.f32" in d for d in divisions), (fused, dtype)
        assert not [d for d in divisions if "approx" in d or "full" in d or "ftz" in d], (fused, dtype)
        assert ("cvt.rn.satfinite.e4m3x2.f32" in body) == (arch == "sm_90"), (fused, dtype, arch)


@pytest.mark.parametrize("source, plain", [(f[0], f[3]) for f in FUSED])
def test_the_plain_kernels_carry_no_quantizer(ptx, source, plain):
    """The entry points share one body (dispatch.cu) or sit beside it
    (activation.cu): the plain kernels compile to no e4m3 conversion and no
    code store, so the 16-bit step's kernels are what they were."""
    for dtype in DTYPES:
        body = "\n".join(ptx[(source, "sm_90")][f"{plain}_{dtype}"])
        assert "cvt.rn.satfinite" not in body and "st.global.u8" not in body, (plain, dtype)


# -- the launchers ----------------------------------------------------------------


class _Arr:
    """A stand-in device array: shape, dtype and an address."""

    def __init__(self, shape, ptr, dtype=np.float32):
        self.shape, self.size, self.dtype = tuple(shape), int(np.prod(shape)), np.dtype(dtype)
        self.data = type("Data", (), {"ptr": ptr})()


@pytest.fixture
def launched(monkeypatch):
    calls = []
    monkeypatch.setattr(K, "_found", {})
    monkeypatch.setattr(K._kernels, "get_kernel", lambda file, name, arch, *, defines: (file, name, arch))
    monkeypatch.setattr(
        K._kernels,
        "launch_signed",
        lambda stream, kernel, grid, block, sig, args, shmem=0: calls.append(
            (kernel, grid, block, sig, args, shmem)
        ),
    )
    return calls


@pytest.mark.parametrize("tokens, k, grid", [(16, 8, 128), (1, 1, 1), (128, 8, 256)])
def test_place_one_block_fp8_gets_the_codes_and_scales(launched, tokens, k, grid):
    """``quantized`` picks place_one_block_fp8: the rows' codes and scales in
    place of the rows (those given are ignored), the gather's grid as for the
    bf16 rows (a block per row, at most PLACE_MAX_GRID), everything else as
    place_one_block gets it."""
    import ml_dtypes

    e, hidden = 128, 2048
    ids, x = _Arr((tokens, k), 0x100, np.int32), _Arr((tokens, hidden), 0x200, ml_dtypes.bfloat16)
    codes, scales = _Arr((tokens * k, hidden), 0x300, np.uint8), _Arr((tokens * k, 16), 0x400)
    rows = _Arr((tokens * k, hidden), 0x500, ml_dtypes.bfloat16)
    common = (ids, e, None, x, 128, _Arr((e,), 0x600), (1, 2, 3, 4), _Arr((9,), 0x700), _Arr((9,), 0x800))
    K.place_one_block(7, "sm_90", *common, dropped=_Arr((1,), 0x900), rows=rows, quantized=(codes, scales))
    K.place_one_block(7, "sm_90", *common, dropped=_Arr((1,), 0x900), rows=rows)
    (kernel, g, block, sig, args, shmem), plain = launched
    assert kernel == ("dispatch", "place_one_block_fp8_bf16", "sm_90")
    assert plain[0] == ("dispatch", "place_one_block_bf16", "sm_90")
    assert sig == K._PLACE_ONE_BLOCK_FP8 and len(args) == len(sig)
    assert args[-2:] == (0x300, 0x400) and plain[4][-1] == 0x500
    assert args[:-2] == plain[4][:-1], "every other argument as place_one_block's"
    assert (g, block, shmem) == (grid, K.DISPATCH_THREADS, plain[5]) and plain[1] == grid


def test_expert_activation_fp8_gets_the_codes_and_scales(launched):
    """The activation's launcher: expert_activation's arguments with the codes
    and scales for ``out``, a block of ROW_THREADS (whole warps) per row."""
    import ml_dtypes

    rows, inter = 128, 768
    h = _Arr((rows, 2 * inter), 0x100, ml_dtypes.bfloat16)
    codes, scales = _Arr((rows, inter), 0x300, np.uint8), _Arr((rows, 6), 0x400)
    act = _Arr((rows, inter), 0x500, ml_dtypes.bfloat16)
    r2p, ids, bias = _Arr((rows,), 0x600, np.int32), _Arr((16, 8), 0x700, np.int32), _Arr((8, 1536), 0x800)
    K.expert_activation_fp8(
        7, "sm_90", h, inter, 1, K.ACTIVATIONS["silu"], bias, r2p, ids, (codes, scales), 128
    )
    K.expert_activation(7, "sm_90", h, inter, 1, K.ACTIVATIONS["silu"], bias, r2p, ids, act, 128)
    (kernel, grid, block, sig, args, _), plain = launched
    assert kernel == ("activation", "expert_activation_fp8_bf16", "sm_90")
    assert sig == K._ACTIVATION_FP8 and len(args) == len(sig)
    assert args[:-2] == plain[4][:-1] and args[-2:] == (0x300, 0x400)
    assert (grid, block) == (rows, K.ROW_THREADS) and K.ROW_THREADS % 32 == 0


@pytest.mark.parametrize("rows", [1, 4096, 131_072])
def test_gather_rows_fp8_gets_the_codes_and_scales(launched, monkeypatch, rows):
    """In row order (GATHER_BY_TOKEN off), ``quantized`` picks
    gather_rows_fp8: gather_rows' arguments with the codes and scales in
    place of the rows (``out`` unused, None here), as many rows as the codes
    have, the same grid (a block of ROW_THREADS per row, at most MAX_GRID,
    striding on) and block."""
    import ml_dtypes

    hidden = 7168
    x, r2p = _Arr((rows // 8 + 1, hidden), 0x200, ml_dtypes.bfloat16), _Arr((rows,), 0x600, np.int32)
    p2r = _Arr((rows,), 0x700, np.int32)
    codes, scales = _Arr((rows, hidden), 0x300, np.uint8), _Arr((rows, 56), 0x400)
    monkeypatch.setattr(K, "GATHER_BY_TOKEN", False)
    K.gather_rows(7, "sm_90", x, p2r, r2p, 8, None, (codes, scales))
    K.gather_rows(7, "sm_90", x, p2r, r2p, 8, _Arr((rows, hidden), 0x500, ml_dtypes.bfloat16))
    (kernel, grid, block, sig, args, _), plain = launched
    assert kernel == ("dispatch", "gather_rows_fp8_bf16", "sm_90")
    assert plain[0] == ("dispatch", "gather_rows_bf16", "sm_90")
    assert sig == K._GATHER_ROWS_FP8 and len(args) == len(sig)
    assert args[:-2] == plain[4][:-1] and args[-2:] == (0x300, 0x400) and plain[4][-1] == 0x500
    assert args[4] == rows and (grid, block) == (plain[1], plain[2]) == (min(rows, K.MAX_GRID), K.ROW_THREADS)


@pytest.mark.parametrize(
    "tokens, k, rows, hidden, dtype, grid",
    [
        (1, 1, 1, 2048, "bfloat16", 1),  # 256 chunks: one work item of 256 per token
        (4096, 8, 32768, 7168, "bfloat16", 4096 * 4),  # 896 chunks: four work items per token
        (16384, 8, 131072, 7168, "bfloat16", K.MAX_GRID),  # 65,536 items: one over the cap
        (40000, 8, 320000, 7168, "bfloat16", K.MAX_GRID),  # 160,000 items: the grid's cap, striding on
        (300, 6, 2000, 100, "float32", 300),  # 25 chunks (or 100 elements): one item
        (5, 2, 0, 4096, "float16", 10),  # no rows: the tokens' items still launch (their rows all -1)
    ],
)
def test_gather_rows_by_token_launch(launched, tokens, k, rows, hidden, dtype, grid):
    """The 16-bit gather by default: gather_rows_by_token with (x, H,
    pair_to_row, row_to_pair, k, T, rows, out), T from pair_to_row's length,
    a block of ROW_THREADS, one per (token, GATHER_UNITS * ROW_THREADS
    16-byte chunks of its row), at most MAX_GRID."""
    import ml_dtypes

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x = _Arr((tokens, hidden), 0x200, dt)
    p2r, r2p, out = (
        _Arr((tokens * k,), 0x300, np.int32),
        _Arr((rows,), 0x400, np.int32),
        _Arr((rows, hidden), 0x500, dt),
    )
    assert K.GATHER_BY_TOKEN
    K.gather_rows(7, "sm_90", x, p2r, r2p, k, out)
    ((kernel, g, block, sig, args, shmem),) = launched
    suffix = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}[dtype]
    assert kernel == ("dispatch", f"gather_rows_by_token_{suffix}", "sm_90")
    assert sig == K._GATHER_ROWS_BY_TOKEN and len(args) == len(sig)
    assert args == (0x200, hidden, 0x300, 0x400, k, tokens, rows, 0x500)
    assert (g, block, shmem) == (grid, K.ROW_THREADS, 0)


@pytest.mark.parametrize("tokens, grid", [(1, 1), (4096, 4096), (70_000, K.MAX_GRID)])
def test_gather_rows_fp8_by_token_launch(launched, tokens, grid):
    """With ``quantized``, the default gather is gather_rows_fp8_by_token:
    the by-token arguments with the codes and scales in place of the rows
    (``out`` unused), a block of ROW_THREADS per token, at most MAX_GRID."""
    import ml_dtypes

    k, hidden, rows = 8, 7168, tokens * 8
    x = _Arr((tokens, hidden), 0x200, ml_dtypes.bfloat16)
    p2r, r2p = _Arr((tokens * k,), 0x300, np.int32), _Arr((rows,), 0x400, np.int32)
    codes, scales = _Arr((rows, hidden), 0x500, np.uint8), _Arr((rows, 56), 0x600)
    K.gather_rows(7, "sm_90", x, p2r, r2p, k, None, (codes, scales))
    ((kernel, g, block, sig, args, shmem),) = launched
    assert kernel == ("dispatch", "gather_rows_fp8_by_token_bf16", "sm_90")
    assert sig == K._GATHER_ROWS_FP8_BY_TOKEN and len(args) == len(sig)
    assert args == (0x200, hidden, 0x300, 0x400, k, tokens, rows, 0x500, 0x600)
    assert (g, block, shmem) == (grid, K.ROW_THREADS, 0)
