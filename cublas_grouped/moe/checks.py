"""Argument checks of the MoE layer, and the device, kernel architecture and
executor a call runs with.

Every check here runs before any GPU work and raises ``ValueError`` or
``TypeError`` naming the argument. :func:`layer_shape` turns the weights of a
layer into one :class:`LayerShape`, which the dynamic layer
(:func:`cublas_grouped.moe_forward`) and the fixed-capacity layer
(:class:`cublas_grouped.FixedCapacityMoE`) both build and read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gemm.backends.hopper import GATE_UP_BLOCK
from ..gemm.config import Algorithm, ComputePrecision
from ..gemm.executor import GroupedGemmExecutor
from ..gemm.fp8 import check_fp8_operand, is_fp8
from ..gemm.gmm import shared_executor
from ..runtime import device as _device
from ..runtime.arrays import ArrayView, cuda_dtype, view
from ..runtime.nvrtc import arch_for
from .kernels import ACTIVATIONS

__all__ = [
    "MAX_EXPERTS",
    "W1_LAYOUTS",
    "MAX_PAIRS",
    "LayerShape",
    "layer_shape",
    "check_layer_args",
    "check_tokens",
    "check_routing",
    "check_weights",
    "device_of",
    "kernel_arch",
    "executor_or_shared",
]

MAX_EXPERTS = 1024
# How a gated layer's w1 orders its 2I output columns: "gate_up", the gate
# then the up projection; "gate_up_blocked", interleaved in blocks of
# GATE_UP_BLOCK (pack_gate_up), which lets the Hopper kernel apply the
# activation before anything is stored.
W1_LAYOUTS = ("gate_up", "gate_up_blocked")
# Pairs (T*k) and expert-ordered rows are int32 indices in the kernels.
MAX_PAIRS = 2**31


@dataclass(frozen=True)
class LayerShape:
    """Shape and options of an expert layer, checked against its weights.

    Attributes
    ----------
    num_experts, hidden, inter : int
        E, H and I: ``w1`` is ``[E, H, 2I]`` when gated (else ``[E, H, I]``),
        ``w2`` is ``[E, I, H]``.
    width : int
        The first GEMM's output width: ``2 * inter`` when gated, else ``inter``.
    top_k : int
        Experts per token.
    gated : bool
    activation : str
    trans_b : bool
        The weights are in the ``nn.Linear`` layout (``[E, N, K]``).
    dtype : numpy.dtype
        Of the tokens and every weight and bias.
    gate_up_block : int
        0: ``w1``'s gate columns, then its up columns; B > 0: packed in blocks
        of B (:func:`cublas_grouped.pack_gate_up`, ``w1_layout="gate_up_blocked"``).
    """

    num_experts: int
    hidden: int
    inter: int
    width: int
    top_k: int
    gated: bool
    activation: str
    trans_b: bool
    dtype: np.dtype
    gate_up_block: int = 0


def check_tokens(x) -> ArrayView:
    """``x`` as a 2-D C-contiguous ``[T, H]`` view of a supported dtype."""
    x_v = view(x, "x")
    if x_v.ndim != 2:
        raise ValueError(f"x must be 2-D [T, H]; got shape {x_v.shape}")
    if not x_v.is_c_contiguous():
        raise ValueError("x must be C-contiguous")
    cuda_dtype(x_v.dtype, "x")
    return x_v


def check_routing(topk_ids, topk_weights, num_tokens: int | None) -> tuple[ArrayView, ArrayView | None]:
    """Views of int32 ``topk_ids`` [T, k] and float32 ``topk_weights`` (or None).

    ``num_tokens``: the T that ``topk_ids`` must have, or None to accept any.
    """
    ids_v = view(topk_ids, "topk_ids")
    if ids_v.ndim != 2:
        raise ValueError(f"topk_ids must be 2-D [T, k]; got shape {ids_v.shape}")
    if ids_v.dtype != np.int32:
        raise TypeError(f"topk_ids must be int32; got {ids_v.dtype}")
    if not ids_v.is_c_contiguous():
        raise ValueError("topk_ids must be C-contiguous")
    if num_tokens is not None and ids_v.shape[0] != num_tokens:
        raise ValueError(f"topk_ids has {ids_v.shape[0]} rows but x has {num_tokens} tokens")
    if ids_v.shape[0] * ids_v.shape[1] >= MAX_PAIRS:
        raise ValueError(
            f"topk_ids has {ids_v.shape[0]} x {ids_v.shape[1]} = {ids_v.shape[0] * ids_v.shape[1]} "
            "(token, expert) pairs; the kernels index pairs and rows with int32, so T*k must stay below 2**31"
        )
    w_v = None
    if topk_weights is not None:
        w_v = view(topk_weights, "topk_weights")
        if w_v.shape != ids_v.shape:
            raise ValueError(f"topk_weights must have the shape of topk_ids {ids_v.shape}; got {w_v.shape}")
        if w_v.dtype != np.float32:
            raise TypeError(f"topk_weights must be float32; got {w_v.dtype}")
        if not w_v.is_c_contiguous():
            raise ValueError("topk_weights must be C-contiguous")
    return ids_v, w_v


def check_weights(w, name: str, num_experts: int | None, k: int, trans_b: bool, dtype) -> tuple[int, int]:
    """(E, N) of expert weights ``[E, K, N]`` (``[E, N, K]`` with ``trans_b``).

    ``num_experts``: the E they must have, or None to accept any. FP8 weights
    (dequantized to ``dtype`` when they run) must be in the ``trans_b`` layout.
    """
    if is_fp8(w):
        check_fp8_operand(w, name, trans_b, dtype, "x")
        e, kk, n = w.num_experts, w.in_features, w.out_features
    else:
        w_v = view(w, name)
        if w_v.ndim != 3:
            raise ValueError(f"{name} must be 3-D [E, K, N] ([E, N, K] with trans_b); got shape {w_v.shape}")
        if not w_v.is_c_contiguous():
            raise ValueError(f"{name} must be C-contiguous")
        if w_v.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype} like x; got {w_v.dtype}")
        e, kk, n = (w_v.shape[0], w_v.shape[2], w_v.shape[1]) if trans_b else w_v.shape
    if num_experts is not None and e != num_experts:
        raise ValueError(f"{name} has {e} experts; expected {num_experts}")
    if kk != k:
        raise ValueError(f"{name} has K={kk} but its input has {k} columns")
    return e, n


def layer_shape(
    w1,
    w2,
    top_k: int,
    *,
    b1=None,
    b2=None,
    activation: str = "silu",
    gated: bool = True,
    trans_b: bool = False,
    x: ArrayView | None = None,
    dtype=None,
    w1_layout: str = "gate_up",
) -> LayerShape:
    """Check a layer's weights, biases and options; return its :class:`LayerShape`.

    With ``x`` (a checked view of the tokens), H and the dtype are x's and the
    weights must match them; without it (a layer built before any tokens), they
    are ``w1``'s, or with FP8 ``w1``, ``dtype`` (default bfloat16): the
    activations' dtype. ``top_k`` is stored as given: callers check it.
    ``w1_layout``: one of :data:`W1_LAYOUTS`.
    """
    if w1_layout not in W1_LAYOUTS:
        raise ValueError(f"w1_layout must be one of {W1_LAYOUTS}; got {w1_layout!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {activation!r}")
    if x is not None:
        dtype, hidden = x.dtype, x.shape[1]
    elif is_fp8(w1):
        dtype, hidden = np.dtype(dtype or "bfloat16"), w1.in_features
    else:
        w1_v = view(w1, "w1")
        # A w1 that is not 3-D has no H: check_weights refuses it before H is read.
        dtype, hidden = w1_v.dtype, (w1_v.shape[2 if trans_b else 1] if w1_v.ndim == 3 else None)
    num_experts, width = check_weights(w1, "w1", None, hidden, trans_b, dtype)
    if gated and width % 2:
        raise ValueError(f"w1 must have an even output width (gate|up) when gated; got {width}")
    inter = width // 2 if gated else width
    _, h_out = check_weights(w2, "w2", num_experts, inter, trans_b, dtype)
    if h_out != hidden:
        raise ValueError(f"w2 must map back to hidden={hidden}; its output width is {h_out}")
    for bias, name, cols in ((b1, "b1", width), (b2, "b2", hidden)):
        if bias is not None:
            b_v = view(bias, name)
            if b_v.shape != (num_experts, cols) or b_v.dtype != dtype or not b_v.is_c_contiguous():
                raise ValueError(
                    f"{name} must be a C-contiguous {dtype} array of shape {(num_experts, cols)}; "
                    f"got {b_v.dtype} {b_v.shape}"
                )
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"at most {MAX_EXPERTS} experts are supported; w1 has {num_experts}")
    block = 0
    if w1_layout == "gate_up_blocked":
        block = GATE_UP_BLOCK
        if not gated or is_fp8(w1) or inter % block:
            raise ValueError(
                f"w1_layout='gate_up_blocked' needs a gated layer with 16-bit w1 and I a multiple of {block}; "
                f"got gated={gated}, I={inter}{', FP8 w1' if is_fp8(w1) else ''}"
            )
    return LayerShape(
        num_experts,
        hidden,
        inter,
        width,
        top_k,
        bool(gated),
        activation,
        bool(trans_b),
        np.dtype(dtype),
        block,
    )


def check_layer_args(
    x_v: ArrayView | None,
    topk_ids,
    topk_weights,
    w1,
    w2,
    b1,
    b2,
    activation,
    gated,
    trans_b,
    w1_layout="gate_up",
) -> LayerShape:
    """Check one call of the dynamic layer: the routing, then :func:`layer_shape`.

    ``x_v``: the tokens, already checked by :func:`check_tokens`, or None.
    """
    ids_v, _ = check_routing(topk_ids, topk_weights, x_v.shape[0] if x_v is not None else None)
    return layer_shape(
        w1,
        w2,
        ids_v.shape[1],
        b1=b1,
        b2=b2,
        activation=activation,
        gated=gated,
        trans_b=trans_b,
        x=x_v,
        w1_layout=w1_layout,
    )


def device_of(v: ArrayView) -> int:
    """The device ``v`` lives on, or CuPy's current device when it does not say."""
    if v.device is not None:
        return v.device
    # Looked up at call time, so that a faked device (tests) is the one seen.
    from ..runtime.device import current_device

    return current_device()


def kernel_arch(res) -> str:
    """The NVRTC architecture to compile kernels for on ``res``'s device."""
    # device_info looked up on the module at call time, as in device_of (a
    # faked device is the one seen), without an import statement per call.
    sm = _device.device_info(res.device_id).sm
    arch = _ARCHES.get(sm)
    if arch is None:
        arch = _ARCHES[sm] = arch_for(sm)
    return arch


_ARCHES: dict[tuple, str] = {}  # compute capability -> NVRTC architecture


def executor_or_shared(executor: GroupedGemmExecutor | None) -> GroupedGemmExecutor:
    """The caller's executor, or the one ``gmm`` shares (AUTO, full precision)."""
    if executor is None:
        return shared_executor(ComputePrecision.FP32, Algorithm.AUTO)
    return executor
