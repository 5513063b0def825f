"""Helpers for CPU tests of tuning tables and AUTO's measurements: isolated tuning
folders, and table files written by hand."""

from __future__ import annotations

import json


def isolate_tuning(tmp_path, monkeypatch):
    """An empty user tuning folder (``CUBLAS_GROUPED_TUNING_DIR``) and an empty
    shipped folder, measuring off (``CUBLAS_GROUPED_AUTOTUNE=0``), and no cached
    tables or measurements. Returns ``(user_dir, shipped_dir)``; the caller's
    ``monkeypatch`` undoes it all."""
    from cublas_grouped.gemm import autotune as _autotune
    from cublas_grouped.gemm import select as _select
    from cublas_grouped.gemm import tables as _tables

    user, shipped = tmp_path / "user", tmp_path / "shipped"
    user.mkdir()
    shipped.mkdir()
    monkeypatch.setenv("CUBLAS_GROUPED_TUNING_DIR", str(user))
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    monkeypatch.setattr(_tables, "SHIPPED_TUNING_DIR", shipped)
    _select.reset_tuning_cache()
    _autotune.reset_measurements()
    return user, shipped


def entry(
    n=1536, k=2048, times=None, *, experts=128, active=128, mean_rows=256, max_rows=280, dtype="bfloat16"
):
    """One table entry (bfloat16, 128 even experts by default)."""
    return {
        "dtype": dtype,
        "num_experts": experts,
        "active_experts": active,
        "mean_rows": mean_rows,
        "max_rows": max_rows,
        "n": n,
        "k": k,
        "times_ms": times or {"cublas_grouped": 1.0, "sequential": 2.0},
    }


def write_table(folder, name, gpu, cublas_version, entries, sm=None):
    """Write a table file by hand (``sm=None`` leaves the field out, as old tables did)."""
    doc = {"gpu": gpu, "cublas_version": cublas_version, "entries": entries}
    if sm is not None:
        doc["sm"] = list(sm)
    path = folder / name
    path.write_text(json.dumps(doc))
    return path
