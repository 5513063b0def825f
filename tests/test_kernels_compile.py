"""Compile every kernels/*.cu with NVRTC (no GPU needed) and check the entry points.

The Python loader looks kernels up by plain name, so each file must export
exactly-named extern "C" functions. We find them in the cubin's ELF symbol
table (loading the cubin would need a driver). Local includes are inlined the
same way the loader does it, since NVRTC runs without include paths.

Every file compiles with the defines its launcher passes (the launchers'
constants are the only copy); without one of them it must not compile.
"""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import pytest

cuda_core = pytest.importorskip("cuda.core")
Program = cuda_core.Program
ProgramOptions = cuda_core.ProgramOptions

from cublas_grouped.gemm import fp8_kernels as _fp8_kernels  # noqa: E402
from cublas_grouped.gemm import pointers as _pointers  # noqa: E402
from cublas_grouped.gemm.backends import hopper as _hopper  # noqa: E402
from cublas_grouped.gemm.backends import hopper_fp8 as _hopper_fp8  # noqa: E402
from cublas_grouped.moe import backward_kernels as _backward_kernels  # noqa: E402
from cublas_grouped.moe import kernels as _moe_kernels  # noqa: E402
from cublas_grouped.runtime import nvrtc  # noqa: E402

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
# What each launcher compiles its file with.
DEFINES = {
    **_moe_kernels.DEFINES,
    **_backward_kernels.DEFINES,
    "pointers": _pointers.DEFINES,
    "grouped_gemm_sm90": _hopper.DEFINES,
    "grouped_gemm_fp8_sm90": _hopper_fp8.DEFINES,
    "fp8": _fp8_kernels.DEFINES,
}
ARCHES = ("sm_80", "sm_90")
# Files that only build for one architecture (wgmma and TMA need sm_90a).
ARCHES_OF = {"grouped_gemm_sm90.cu": (_hopper.ARCH,), "grouped_gemm_fp8_sm90.cu": (_hopper_fp8.ARCH,)}
DTYPES = ("f32", "f16", "bf16")


def _typed(*names: str) -> set[str]:
    return {f"{n}_{d}" for n in names for d in DTYPES}


EXPECTED = {
    "routing.cu": _typed("route_topk"),
    "dispatch.cu": {"expert_block_histogram", "expert_column_scan", "assign_rows"}
    | _typed("gather_rows", "gather_rows_by_token", "gather_rows_fp8", "gather_rows_fp8_by_token")
    | _typed("place_one_block", "place_one_block_fp8"),
    "pointers.cu": {"build_pointers"},
    "activation.cu": _typed("expert_activation", "expert_activation_fp8"),
    "combine.cu": _typed("combine_rows", "scatter_rows"),
    "moe_backward.cu": _typed("expert_activation_backward", "expert_column_sums"),
    "fp8.cu": _typed("quantize_fp8", "quantize_rows_fp8", "dequantize_fp8"),
    "grouped_gemm_sm90.cu": {
        "grouped_tile_offsets",
        "grouped_tile_offsets_i64",
        "grouped_gemm_nt_bf16",
        "grouped_gemm_nt_f16",
        "grouped_gemm_nn_bf16",
        "grouped_gemm_nn_f16",
    },
    "grouped_gemm_fp8_sm90.cu": {"grouped_gemm_fp8_nt_bf16"},
}

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)
_ANY_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include\b.*$", re.MULTILINE)


def inline_includes(path: Path, seen: frozenset = frozenset()) -> str:
    """Replace each `#include "local.cuh"` line by that file's (inlined) text."""
    if path.name in seen:
        raise AssertionError(f"include cycle through {path.name}")

    def repl(m: re.Match) -> str:
        return inline_includes(path.parent / m.group(1), seen | {path.name})

    return _INCLUDE.sub(repl, path.read_text())


def elf_function_symbols(blob: bytes) -> set[str]:
    """Names of the global function symbols in an ELF64 little-endian file."""
    assert blob[:4] == b"\x7fELF", "not an ELF file"
    assert blob[4] == 2 and blob[5] == 1, "expected ELF64 little-endian"
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", blob, 0x3A)
    sections = []
    for i in range(shnum):
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, ...
        sh = struct.unpack_from("<IIQQQQII", blob, shoff + i * shentsize)
        sections.append(sh)
    names = set()
    for _, sh_type, _, _, off, size, link, _ in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        str_off = sections[link][4]
        for pos in range(off, off + size, 24):
            st_name, st_info = struct.unpack_from("<IB", blob, pos)
            binding, kind = st_info >> 4, st_info & 0xF
            if kind == 2 and binding == 1:  # STT_FUNC, STB_GLOBAL
                end = blob.index(b"\0", str_off + st_name)
                names.add(blob[str_off + st_name : end].decode())
    return names


# Headers: common.cuh everywhere, sm90.cuh (Hopper PTX wrappers) in sm_90a
# sources, sm90_cluster.cuh (CTA pairs) in the FP8 GEMM, fp8.cuh (the e4m3
# format and scale rule) where kernels write FP8.
HEADERS = ("common.cuh", "sm90.cuh", "sm90_cluster.cuh", "fp8.cuh")


def test_every_source_is_covered():
    assert sorted(p.name for p in KERNEL_DIR.glob("*.cu")) == sorted(EXPECTED)
    assert sorted(f"{name}.cu" for name in DEFINES) == sorted(EXPECTED)
    assert sorted(p.name for p in KERNEL_DIR.glob("*.cuh")) == sorted(HEADERS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_only_local_common_include(name):
    # Local headers only (HEADERS).
    allowed = {f'#include "{header}"' for header in HEADERS}
    for path in (KERNEL_DIR / name, *(KERNEL_DIR / header for header in HEADERS)):
        for line in _ANY_INCLUDE.findall(path.read_text()):
            assert line.strip() in allowed, f"{path.name}: {line.strip()}"
    assert not _ANY_INCLUDE.findall(inline_includes(KERNEL_DIR / name))


@pytest.mark.parametrize(
    "name,arch", [(name, arch) for name in sorted(EXPECTED) for arch in ARCHES_OF.get(name, ARCHES)]
)
def test_compiles_and_exports(name, arch):
    src = inline_includes(KERNEL_DIR / name)
    log = io.StringIO()
    macros = [(k, str(v)) for k, v in DEFINES[name.removesuffix(".cu")].items()] or None
    prog = Program(src, code_type="c++", options=ProgramOptions(arch=arch, std="c++17", define_macro=macros))
    obj = prog.compile("cubin", logs=log)
    text = log.getvalue()
    assert "warning" not in text.lower(), text
    symbols = elf_function_symbols(bytes(obj.code))
    missing = EXPECTED[name] - symbols
    assert not missing, f"{name} ({arch}) lacks {sorted(missing)}; has {sorted(symbols)}"
    # No stray C++-mangled kernels: everything exported is an expected name.
    assert not [s for s in symbols if s.startswith("_Z") and "impl" in s]


def test_shared_constants_have_no_default_in_the_sources():
    # A default in the source could silently disagree with the launcher.
    for name, defines in DEFINES.items():
        text = inline_includes(KERNEL_DIR / f"{name}.cu")
        for macro in defines:
            assert not re.search(rf"^[ \t]*#[ \t]*define[ \t]+{macro}\b", text, re.MULTILINE), (name, macro)
            assert macro in text, f"{name}.cu never uses {macro}"


@pytest.mark.parametrize(
    "name,missing", [(name, macro) for name, defines in sorted(DEFINES.items()) for macro in defines]
)
def test_a_missing_define_stops_the_compile_and_is_named(name, missing):
    defines = {k: v for k, v in DEFINES[name].items() if k != missing}
    with pytest.raises(
        nvrtc.KernelCompileError, match=rf"(?s)kernels/{name}\.cu for sm_90 .*#error.*{missing}"
    ):
        nvrtc.compile_source(name, "sm_90", defines)


@pytest.mark.parametrize(
    "name,defines,message",
    [
        ("dispatch", {"DISPATCH_THREADS": 100}, "a multiple of 32"),
        ("dispatch", {"PAIRS_PER_BLOCK": 1000}, "divide PAIRS_PER_BLOCK"),
        ("dispatch", {"GATHER_UNITS": 0}, "GATHER_UNITS must be 1 .. 16"),
        ("dispatch", {"GATHER_UNITS": 17}, "GATHER_UNITS must be 1 .. 16"),
        ("routing", {"ROUTE_THREADS": 2048}, "a multiple of 32 up to 1024"),
        ("routing", {"SCORE_SIGMOID": 0}, "differ"),
        ("pointers", {"POINTER_THREADS": 48}, "a multiple of 32 up to 1024"),
        ("activation", {"ACT_RELU": 0}, "the activation codes must differ"),
        ("moe_backward", {"ACT_RELU": 0}, "the activation codes must differ"),
        ("moe_backward", {"COLSUM_SLICES": 64}, "a block of 1 to 1024 threads"),
        ("fp8", {"FP8_THREADS": 48}, "a multiple of 32 up to 1024"),
        ("fp8", {"QROWS_PAIRS": 0}, "QROWS_PAIRS"),
        ("fp8", {"QROWS_PAIRS": 9}, "QROWS_PAIRS"),
        ("grouped_gemm_sm90", {"SM90_BLOCK_N": 192}, "SM90_BLOCK_N=256 or 128"),
        ("grouped_gemm_sm90", {"SM90_TILE_THREADS": 1000}, "a multiple of 32, at most 1024"),
        ("grouped_gemm_sm90", {"SM90_SMALL_A_ROWS": 65}, "SM90_SMALL_A_ROWS must be 0 .. SM90_BLOCK_M / 2"),
        ("grouped_gemm_sm90", {"SM90_SMALL_A_ROWS": -1}, "SM90_SMALL_A_ROWS must be 0 .. SM90_BLOCK_M / 2"),
        ("grouped_gemm_fp8_sm90", {"FP8_SMALL_A_ROWS": 65}, "FP8_SMALL_A_ROWS must be 0 .. FP8_BLOCK_M / 2"),
        ("grouped_gemm_fp8_sm90", {"FP8_BLOCK_N": 256}, "wgmma m64n128k32"),
        ("grouped_gemm_fp8_sm90", {"FP8_BLOCK_K": 64}, "128-deep K stages"),
        ("grouped_gemm_fp8_sm90", {"FP8_STAGES": 7}, "the ring at most 204 KiB"),
        ("grouped_gemm_fp8_sm90", {"FP8_STAGES": 1}, "FP8_STAGES must be at least 2"),
        ("grouped_gemm_fp8_sm90", {"FP8_BLOCK_N": 192, "FP8_STAGES": 6}, "the ring at most 204 KiB"),
        ("grouped_gemm_fp8_sm90", {"FP8_BLOCK_N": 192, "FP8_STAGES": 5, "FP8_THIN": 1}, "no thin tiles"),
        (
            "grouped_gemm_fp8_sm90",
            {"FP8_BLOCK_N": 192, "FP8_STAGES": 5, "FP8_CLUSTER": 2, "FP8_A_BOX_ROWS": 16},
            "runs one CTA per tile",
        ),
    ],
)
def test_inconsistent_defines_do_not_compile(name, defines, message):
    with pytest.raises(nvrtc.KernelCompileError, match=message):
        nvrtc.compile_source(name, "sm_90", {**DEFINES[name], **defines})


@pytest.mark.parametrize(
    "missing",
    [
        "FP8_OVERLAP",
        "FP8_A_BOX_ROWS",
        "FP8_THIN",
        "FP8_CLUSTER",
        "FP8_LOADERS",
        "FP8_FOLD_ROWS",
        "FP8_SMALL_A_ROWS",
    ],
)
def test_the_fp8_kernel_needs_its_defines(missing):
    defines = {k: v for k, v in DEFINES["grouped_gemm_fp8_sm90"].items() if k != missing}
    with pytest.raises(
        nvrtc.KernelCompileError, match="FP8_FOLD_ROWS and FP8_SMALL_A_ROWS from its launcher"
    ):
        nvrtc.compile_source("grouped_gemm_fp8_sm90", "sm_90", defines)


@pytest.mark.parametrize(
    "rows, thin, match",
    [
        (12, 0, "FP8_A_BOX_ROWS must be a multiple of 8"),
        (256, 0, "FP8_A_BOX_ROWS must be a multiple of 8"),
        (128, 1, "thin tiles .* at most 64"),
    ],
)
def test_the_fp8_kernel_refuses_a_box_it_cannot_swizzle(rows, thin, match):
    defines = {**DEFINES["grouped_gemm_fp8_sm90"], "FP8_A_BOX_ROWS": rows, "FP8_THIN": thin, "FP8_CLUSTER": 1}
    with pytest.raises(nvrtc.KernelCompileError, match=match):
        nvrtc.compile_source("grouped_gemm_fp8_sm90", "sm_90a", defines)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"FP8_CLUSTER": 3}, "FP8_CLUSTER must be 1"),
        (
            {"FP8_CLUSTER": 2, "FP8_LOADERS": 1, "FP8_THIN": 1, "FP8_STAGES": 5},
            "FP8_CLUSTER 2 takes no FP8_THIN",
        ),
        ({"FP8_CLUSTER": 2, "FP8_LOADERS": 1, "FP8_A_BOX_ROWS": 64}, "FP8_A_BOX_ROWS at most 32"),
        ({"FP8_LOADERS": 3}, "FP8_LOADERS must be 1 or 2"),
    ],
)
def test_the_fp8_kernel_refuses_pairs_it_cannot_split(change, match):
    """CTA pairs split a's stage (64 rows, or every other small box) and
    do not run thin tiles."""
    with pytest.raises(nvrtc.KernelCompileError, match=match):
        nvrtc.compile_source(
            "grouped_gemm_fp8_sm90", "sm_90a", {**DEFINES["grouped_gemm_fp8_sm90"], **change}
        )


def test_defines_key_both_caches(tmp_path, monkeypatch):
    from cublas_grouped.runtime.kernel_cache import KernelCache

    monkeypatch.setattr(nvrtc, "_compiled", {})
    monkeypatch.setattr(nvrtc, "_disk_cache", KernelCache(tmp_path))
    monkeypatch.setattr(nvrtc, "_disk_cache_ready", True)
    base = DEFINES["dispatch"]
    first = nvrtc.compile_source("dispatch", "sm_90", base)
    # Same defines in another order and another mapping: the same program.
    assert nvrtc.compile_source("dispatch", "sm_90", dict(reversed(list(base.items())))) is first
    other = nvrtc.compile_source("dispatch", "sm_90", {**base, "DISPATCH_THREADS": 128})
    assert other is not first and bytes(other.code) != bytes(first.code)
    entries = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(entries) == 2
    # A new process (empty memory cache) finds both on disk, each under its own defines.
    monkeypatch.setattr(nvrtc, "_compiled", {})
    assert bytes(nvrtc.compile_source("dispatch", "sm_90", base).code) == bytes(first.code)
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 2


@pytest.mark.parametrize(
    "defines,error,message",
    [
        ({"A": True}, TypeError, "define A must be an int; got bool"),
        ({"A": 1.0}, TypeError, "define A must be an int; got float"),
        ({"1A": 1}, ValueError, "define name must be a C identifier; got '1A'"),
    ],
)
def test_define_values_are_checked(defines, error, message):
    with pytest.raises(error, match=re.escape(message)):
        nvrtc.define_items(defines)
    assert nvrtc.define_items({"B": 2, "A": 1}) == (("A", 1), ("B", 2))
    assert nvrtc.define_items(None) == ()


@pytest.mark.parametrize(
    "name,kernels",
    [
        (
            "dispatch.cu",
            ["gather_rows_bf16", "gather_rows_f32", "gather_rows_by_token_bf16", "gather_rows_by_token_f32"],
        ),
        ("combine.cu", ["combine_rows_bf16", "scatter_rows_f16"]),
        ("activation.cu", ["expert_activation_bf16", "expert_activation_f32"]),
        ("moe_backward.cu", ["expert_activation_backward_bf16", "expert_activation_backward_f32"]),
    ],
)
def test_row_kernels_use_128bit_accesses(name, kernels):
    """The memory-bound row kernels must have a 16-byte vector path."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    src = inline_includes(KERNEL_DIR / name).encode()
    err, prog = nvrtc.nvrtcCreateProgram(src, name.encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    macros = [f"-D{k}={v}".encode() for k, v in DEFINES[name.removesuffix(".cu")].items()]
    opts = [b"--gpu-architecture=sm_90", b"-std=c++17", *macros]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    err, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    (err,) = nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(prog)
    ptx = ptx.rstrip(b"\0").decode()
    for kernel in kernels:
        start = ptx.index(f".entry {kernel}(")
        end = ptx.find(".entry", start + 1)
        body = ptx[start : end if end > 0 else len(ptx)]
        # 16 bytes as four 32-bit or two 64-bit lanes (both one LDG.E.128 in SASS)
        assert re.search(r"ld\.global(\.nc)?\.(v4\.[bfsu]32|v2\.[bfsu]64)", body), (
            f"{kernel}: no 128-bit load"
        )
        assert re.search(r"st\.global\.v4\.", body), f"{kernel}: no 128-bit store"
