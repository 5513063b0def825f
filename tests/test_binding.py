"""cuBLAS binding: the library loads, the prototype table matches it, errors are named (CPU)."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from cublas_grouped.runtime import cublas as _cublas
from cublas_grouped.runtime.cublas import CublasError


def test_library_loads_and_every_symbol_resolves():
    _cublas.load()
    version = _cublas.version()
    for name, proto in _cublas.PROTOTYPES.items():
        assert _cublas.has_symbol(name) == (version >= proto.since), name
        if _cublas.has_symbol(name):
            fn = _cublas._functions[name]
            assert fn.restype is proto.restype is ctypes.c_int, name
            assert tuple(fn.argtypes) == proto.argtypes, name
    assert set(_cublas.REQUIRED_SYMBOLS) == {n for n, p in _cublas.PROTOTYPES.items() if p.since == 0}
    assert _cublas.library_path().split("/")[-1].startswith("libcublas")


def _header_prototypes() -> tuple[dict[str, list[str]], int]:
    """Parameter declarations of every function in the cuBLAS header that
    ships with the loaded library, and the header's version."""
    pathfinder = pytest.importorskip("cuda.pathfinder")
    find = getattr(pathfinder, "find_nvidia_header_directory", None)
    folder = find("cublas") if find is not None else None
    if folder is None or not (Path(folder) / "cublas_api.h").is_file():
        pytest.skip("no cublas_api.h next to the loaded libcublas")
    text = (Path(folder) / "cublas_api.h").read_text()
    decls = {
        name: [" ".join(p.split()) for p in params.split(",")]
        for name, params in re.findall(r"CUBLASWINAPI\s+(\w+)\s*\(([^)]*)\)\s*;", text)
    }
    major, minor = (
        int(re.search(rf"#define CUBLAS_VER_{w} (\d+)", text).group(1)) for w in ("MAJOR", "MINOR")
    )
    return decls, major * 10000 + minor * 100


def _c_kind(decl: str) -> str:
    """How a C parameter declaration passes through ctypes."""
    if "*" in decl or "[]" in decl or decl.split()[0] in ("cublasHandle_t", "cudaStream_t"):
        return "pointer"
    if "long long" in decl or "int64_t" in decl:
        return "int64"
    return "size_t" if decl.startswith("size_t") else "int"


_CTYPE_KIND = {
    ctypes.c_void_p: "pointer",
    ctypes.c_int: "int",
    ctypes.c_int64: "int64",
    ctypes.c_size_t: "size_t",
}


def test_prototype_table_matches_the_cublas_header():
    # Every entry: same parameter count, names and kinds (pointer, 32-bit int,
    # 64-bit int, size_t) as the header of the library on this machine.
    decls, header_version = _header_prototypes()
    for name, proto in _cublas.PROTOTYPES.items():
        if header_version < proto.since:
            assert name not in decls, name
            continue
        params = decls[name]
        assert len(params) == len(proto.argtypes), f"{name}: header has {len(params)} parameters"
        names = tuple(re.sub(r"\[\]$", "", p.split()[-1]).lstrip("*") for p in params)
        assert names == proto.names, name
        kinds = tuple(_CTYPE_KIND.get(t, "pointer") for t in proto.argtypes)
        assert kinds == tuple(_c_kind(p) for p in params), name


def test_missing_required_symbol_names_function_and_version():
    real = ctypes.CDLL(_cublas.library_path())

    class Older:
        def __getattr__(self, name):
            if name.startswith("cublasGemmStridedBatchedEx"):
                raise AttributeError(name)
            return getattr(real, name)

    with pytest.raises(
        _cublas.CublasUnavailableError,
        match=r"libcublas.*\(version \d+\.\d+\.\d+\) lacks cublasGemmStridedBatchedEx, which",
    ):
        _cublas._bind(Older(), "/old/libcublas.so")


def test_grouped_entry_point_matches_version():
    version = _cublas.version()
    assert version >= 110000
    has_grouped = _cublas.has_symbol(_cublas.GROUPED_SYMBOL)
    assert has_grouped == (version >= _cublas.GROUPED_GEMM_MIN_VERSION)


def test_version_parts_agree():
    version = _cublas.version()
    assert version // 10000 == _cublas.get_property(0)
    assert (version // 100) % 100 == _cublas.get_property(1)


def test_error_names_status_and_function():
    err = CublasError(7, "cublasGemmEx")
    assert err.status == 7
    assert err.status_name == "CUBLAS_STATUS_INVALID_VALUE"
    assert str(err) == "cublasGemmEx failed: CUBLAS_STATUS_INVALID_VALUE (7)"
    assert isinstance(err, RuntimeError)
    assert "UNKNOWN_99" in str(CublasError(99, "x"))


def test_failing_call_raises_named_error_without_gpu():
    # cublasGetProperty with an invalid property type fails in the library
    # itself, no GPU needed: the status must come back as CublasError.
    with pytest.raises(CublasError, match="cublasGetProperty failed: CUBLAS_STATUS_INVALID_VALUE"):
        _cublas.get_property(42)


def test_missing_grouped_symbol_is_reported_by_version(monkeypatch):
    _cublas.load()
    monkeypatch.setattr(_cublas, "_missing", frozenset({_cublas.GROUPED_SYMBOL}))
    with pytest.raises(_cublas.CublasUnavailableError, match=r"needs cuBLAS >= 12.5; .* is version \d+"):
        _cublas.gemm_grouped_batched_ex(*([0] * 20))
