"""cuBLAS binding: the library loads, every symbol resolves, errors are named (CPU)."""

from __future__ import annotations

import ctypes

import pytest

from cublas_grouped.runtime import cublas as _cublas
from cublas_grouped.runtime.cublas import CublasError


def test_library_loads_and_every_symbol_resolves():
    lib = _cublas.load()
    for name in _cublas.REQUIRED_SYMBOLS:
        fn = getattr(lib, name)
        assert fn.restype is ctypes.c_int, name
        assert fn.argtypes, name
    assert _cublas.library_path().split("/")[-1].startswith("libcublas")


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
    monkeypatch.setattr(_cublas, "_missing", frozenset({_cublas.GROUPED_SYMBOL}))
    with pytest.raises(_cublas.CublasUnavailableError, match=r"needs cuBLAS >= 12.5; .* is version \d+"):
        _cublas.gemm_grouped_batched_ex(*([0] * 20))
