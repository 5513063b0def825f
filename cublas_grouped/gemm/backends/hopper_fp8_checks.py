"""The FP8 Hopper back end's operand checks (:mod:`.hopper_fp8` runs them
before any GPU work): what the kernel takes, from the sizes and formats
alone (:func:`unsupported`), from the addresses (:func:`misaligned`), and
the whole call's arguments (:func:`check_operands`), each refusal naming
the argument."""

from __future__ import annotations

import numpy as np

from ...runtime.arrays import BFLOAT16, view
from ..fp8 import BLOCK as SCALE_BLOCK
from ..fp8 import is_fp8

__all__ = ["ALIGNMENT", "unsupported", "misaligned", "check_operands", "check"]


# TMA reads from 16-byte aligned addresses; the store writes 16-byte chunks.
ALIGNMENT = 16


def unsupported(sm: tuple[int, int], weights, dtype, *, trans_a: bool = False) -> str | None:
    """Why the FP8 kernel cannot multiply ``dtype`` activations by ``weights``
    on an SM ``sm`` GPU (None when it can). From the sizes and formats alone:
    no GPU work, no addresses (see :func:`misaligned` for those)."""
    if tuple(sm) != (9, 0):
        return f"needs an SM 9.0 GPU (Hopper); this one is SM {sm[0]}.{sm[1]}"
    if not is_fp8(weights):
        return "takes FP8ExpertWeights only"
    if trans_a:
        return "does not run the K-grouped product (trans_a)"
    if not weights.trans_b:
        return (
            "takes FP8 weights in the [E, N, K] layout (trans_b=True) only: FP8 wgmma reads K-major operands"
        )
    if weights.scaling != "block128":
        return f"takes 'block128' scaling only; got {weights.scaling!r}"
    if np.dtype(dtype) != BFLOAT16:
        return f"takes bfloat16 activations (and writes bfloat16); got {np.dtype(dtype).name}"
    k, n = weights.in_features, weights.out_features
    if k % 16 or n % 8:
        return f"needs K % 16 == 0 and N % 8 == 0 (16-byte rows of e4m3 and of bf16); got K={k}, N={n}"
    return None


def misaligned(*ptrs: int) -> str | None:
    """Why the kernel cannot take these addresses (None when it can): each of
    the e4m3 rows, the weights' values and ``out`` must start at a multiple of
    :data:`ALIGNMENT` bytes."""
    for ptr in ptrs:
        if int(ptr) % ALIGNMENT:
            return f"needs {ALIGNMENT}-byte aligned operands; got address {int(ptr):#x}"
    return None


def check(cond: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``cond``: the refusals name the argument."""
    if not cond:
        raise ValueError(message)


def check_operands(a_q, a_scales, weights, out, group_sizes) -> tuple[int, np.ndarray | None]:
    """Check the operands of :func:`grouped_fp8` before any GPU work; returns
    ``(M, host sizes or None)`` (None: ``group_sizes`` is on the device)."""
    from ...runtime.arrays import is_host_array

    check(is_fp8(weights), f"weights must be FP8ExpertWeights; got {type(weights).__name__}")
    check(weights.trans_b, "weights must be in the [E, N, K] layout (trans_b=True)")
    check(weights.scaling == "block128", f"weights must have 'block128' scaling; got {weights.scaling!r}")
    e, n, k = weights.shape
    a = view(a_q, "a_q")
    check(
        a.ndim == 2 and a.dtype == np.uint8 and a.is_c_contiguous() and a.shape[1] == k,
        f"a_q must be a C-contiguous uint8 array [M, {k}] of e4m3fn codes; got {a.dtype} {a.shape}",
    )
    m = a.shape[0]
    kb = -(-k // SCALE_BLOCK)
    s = view(a_scales, "a_scales")
    check(
        s.dtype == np.float32 and s.shape == (m, kb) and s.is_c_contiguous(),
        f"a_scales must be a C-contiguous float32 array [{m}, {kb}]; got {s.dtype} {s.shape}",
    )
    o = view(out, "out")
    check(
        o.dtype == BFLOAT16 and o.shape == (m, n) and o.is_c_contiguous(),
        f"out must be a C-contiguous bfloat16 array [{m}, {n}]; got {o.dtype} {o.shape}",
    )
    check(k % 16 == 0, f"K must be a multiple of 16 (16-byte rows of e4m3); got K={k}")
    check(n % 8 == 0, f"N must be a multiple of 8 (16-byte rows of bf16 out); got N={n}")
    devices = {
        d
        for d in (a.device, s.device, o.device, view(weights.values, "weights.values").device)
        if d is not None
    }
    check(len(devices) <= 1, f"a_q, a_scales, out and weights must share a device; got {sorted(devices)}")
    if is_host_array(group_sizes):
        sizes = np.asarray(group_sizes)
        check(
            sizes.ndim == 1 and sizes.shape[0] == e and (sizes.size == 0 or sizes.dtype.kind in "iu"),
            f"group_sizes must be {e} integers; got {sizes.dtype} {sizes.shape}",
        )
        sizes = sizes.astype(np.int64)
        check(bool((sizes >= 0).all()), "group_sizes must not be negative")
        check(int(sizes.sum()) == m, f"group_sizes must sum to M={m}; they sum to {int(sizes.sum())}")
        return m, sizes
    g = view(group_sizes, "group_sizes")
    check(
        g.ndim == 1 and g.shape[0] == e and g.dtype.kind in "iu",
        f"group_sizes must be a 1-D integer GPU array of {e}; got {g.dtype} {g.shape}",
    )
    return m, None
