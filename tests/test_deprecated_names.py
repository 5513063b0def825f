"""Renamed public names keep working for one release, with a DeprecationWarning
that points at the caller's line (CPU, fake arrays)."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest

import cublas_grouped as cg

H, E, INTER = 16, 4, 8


class GpuWorkStarted(Exception):
    pass


class _NoGpuCupy(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise GpuWorkStarted(name)


@pytest.mark.parametrize(
    "old, new", [("StaticMoE", "FixedCapacityMoE"), ("GroupedGemmInput", "DispatchPlan")]
)
def test_old_class_names_are_the_new_classes(old, new):
    with pytest.warns(
        DeprecationWarning, match=f"cublas_grouped.{old} is deprecated; use cublas_grouped.{new}"
    ) as w:
        alias = getattr(cg, old)
    assert alias is getattr(cg, new)
    assert w[0].filename == __file__  # the warning names the caller's line, not the package's
    with pytest.warns(DeprecationWarning, match=old):
        exec(f"from cublas_grouped import {old} as imported", namespace := {})
    assert namespace["imported"] is getattr(cg, new)
    # Star imports bring only the new names (no warning on `import *`).
    assert new in cg.__all__ and old not in cg.__all__


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="module 'cublas_grouped' has no attribute 'NoSuchName'"):
        cg.NoSuchName  # noqa: B018


def test_static_moe_alias_checks_like_the_new_class(fake):
    w1, w2 = fake((E, H, 2 * INTER)), fake((E, INTER, H))
    with pytest.warns(DeprecationWarning):
        static_moe = cg.StaticMoE
    for cls in (static_moe, cg.FixedCapacityMoE):
        with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]; got 5"):
            cls(w1, w2, 5, max_tokens=8)


def _layer(fake, tokens):
    return fake((tokens, H)), fake((tokens, 2), np.int32), None, fake((E, H, 2 * INTER)), fake((E, INTER, H))


@pytest.mark.parametrize("old_value", [True, 1])
def test_sync_free_is_fixed_capacity(fake, old_value):
    from cublas_grouped.moe.fixed_capacity import MAX_FIXED_CAPACITY_TOKENS

    too_many = _layer(fake, MAX_FIXED_CAPACITY_TOKENS + 1)
    with pytest.warns(
        DeprecationWarning, match=r"moe_forward\(sync_free=...\) is deprecated; use fixed_capacity"
    ) as w:
        with pytest.raises(ValueError, match="fixed_capacity=True takes at most"):
            cg.moe_forward(*too_many, sync_free=old_value)
    assert w[0].filename == __file__
    with pytest.raises(ValueError, match="fixed_capacity=True takes at most"):
        cg.moe_forward(*too_many, fixed_capacity=True)


def test_sync_free_false_is_the_synchronizing_layer(fake):
    args = _layer(fake, 6)
    with pytest.warns(DeprecationWarning):
        with pytest.raises(ValueError, match="dropped_pairs applies only with fixed_capacity=True"):
            cg.moe_forward(*args, sync_free=False, dropped_pairs=fake((1,), np.uint64))


def test_sync_free_reaches_the_fixed_capacity_step(fake, monkeypatch):
    """Past the checks, sync_free=True takes the fixed-capacity path (which accepts
    dropped_pairs) up to its first GPU work, as fixed_capacity=True does."""
    monkeypatch.setitem(sys.modules, "cupy", _NoGpuCupy("cupy"))
    counter = fake((1,), np.uint64)
    with pytest.warns(DeprecationWarning):
        with pytest.raises(GpuWorkStarted):
            cg.moe_forward(*_layer(fake, 6), sync_free=True, dropped_pairs=counter)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new name does not warn
        with pytest.raises(GpuWorkStarted):
            cg.moe_forward(*_layer(fake, 6), fixed_capacity=True, dropped_pairs=counter)
