"""Compile every kernels/*.cu with NVRTC (no GPU needed) and check the entry points.

The Python loader looks kernels up by plain name, so each file must export
exactly-named extern "C" functions. We find them in the cubin's ELF symbol
table (loading the cubin would need a driver). Local includes are inlined the
same way the loader does it, since NVRTC runs without include paths.
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

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
ARCHES = ("sm_80", "sm_90")
DTYPES = ("f32", "f16", "bf16")


def _typed(*names: str) -> set[str]:
    return {f"{n}_{d}" for n in names for d in DTYPES}


EXPECTED = {
    "routing.cu": _typed("route_topk"),
    "dispatch.cu": {"expert_block_histogram", "expert_column_scan", "assign_rows"} | _typed("gather_rows"),
    "pointers.cu": {"build_pointers"},
    "activation.cu": _typed("expert_activation"),
    "combine.cu": _typed("combine_rows", "scatter_rows"),
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


def test_every_source_is_covered():
    assert sorted(p.name for p in KERNEL_DIR.glob("*.cu")) == sorted(EXPECTED)
    assert (KERNEL_DIR / "common.cuh").is_file()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_only_local_common_include(name):
    for path in (KERNEL_DIR / name, KERNEL_DIR / "common.cuh"):
        for line in _ANY_INCLUDE.findall(path.read_text()):
            assert line.strip() == '#include "common.cuh"', f"{path.name}: {line.strip()}"
    assert not _ANY_INCLUDE.findall(inline_includes(KERNEL_DIR / name))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_compiles_and_exports(name, arch):
    src = inline_includes(KERNEL_DIR / name)
    log = io.StringIO()
    prog = Program(src, code_type="c++", options=ProgramOptions(arch=arch, std="c++17"))
    obj = prog.compile("cubin", logs=log)
    text = log.getvalue()
    assert "warning" not in text.lower(), text
    symbols = elf_function_symbols(bytes(obj.code))
    missing = EXPECTED[name] - symbols
    assert not missing, f"{name} ({arch}) lacks {sorted(missing)}; has {sorted(symbols)}"
    # No stray C++-mangled kernels: everything exported is an expected name.
    assert not [s for s in symbols if s.startswith("_Z") and "impl" in s]


def test_dispatch_constants_documented():
    # The Python side reads these values; the header comment and the code
    # must agree.
    text = (KERNEL_DIR / "dispatch.cu").read_text()
    assert re.search(r"^#define DISPATCH_THREADS 256$", text, re.MULTILINE)
    assert re.search(r"^#define PAIRS_PER_BLOCK 1024$", text, re.MULTILINE)
    assert "#define DISPATCH_THREADS 256" in text.split("#include")[0]
    assert "#define PAIRS_PER_BLOCK 1024" in text.split("#include")[0]


@pytest.mark.parametrize(
    "name,kernels",
    [
        ("dispatch.cu", ["gather_rows_bf16", "gather_rows_f32"]),
        ("combine.cu", ["combine_rows_bf16", "scatter_rows_f16"]),
        ("activation.cu", ["expert_activation_bf16", "expert_activation_f32"]),
    ],
)
def test_row_kernels_use_128bit_accesses(name, kernels):
    """The memory-bound row kernels must have a 16-byte vector path."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    src = inline_includes(KERNEL_DIR / name).encode()
    err, prog = nvrtc.nvrtcCreateProgram(src, name.encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    opts = [b"--gpu-architecture=sm_90", b"-std=c++17"]
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
        assert re.search(r"ld\.global(\.nc)?\.v4\.", body), f"{kernel}: no 128-bit load"
        assert re.search(r"st\.global\.v4\.", body), f"{kernel}: no 128-bit store"
