"""Top-k routing: router logits to each token's experts and weights, on the GPU.

A repeated call (same logits shape, strides, dtype and device, same options
and stream; CuPy logits only) skips the checks: they are kept per thread
under a key of exactly those (see :func:`_route_key`), as the plan cache of
``gmm`` does (``gemm/call_cache.py``); a call that fails its checks stores nothing.
"""

from __future__ import annotations

import threading

import numpy as np

from ..runtime.arrays import as_cupy, cuda_dtype, cupy_array_type, view
from ..runtime.device import stream_resources
from . import kernels as K
from .checks import MAX_EXPERTS, device_of, kernel_arch

__all__ = ["SCORINGS", "route"]

# The scoring codes routing.cu is compiled with (one copy, in kernels.py).
SCORINGS = K.SCORINGS


def route(router_logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = True, stream=None):
    """Top-k routing on the GPU.

    Parameters
    ----------
    router_logits : GPU array [T, E], float32/float16/bfloat16
    top_k : int, 1 <= top_k <= E <= 1024
    scoring : "softmax" (over all E logits) or "sigmoid" (per logit)
    renormalize : divide the k selected scores by their sum

    Returns
    -------
    (topk_weights float32 [T, k], topk_ids int32 [T, k]), best first; ties go
    to the lower expert id.
    """
    key = _route_key(router_logits, top_k, scoring, renormalize, stream)
    calls = getattr(_local, "calls", None)
    checked = None if key is None or calls is None else calls.get(key)
    if checked is not None:
        return _route_checked(checked, router_logits, stream is None)
    logits = view(router_logits, "router_logits")
    if logits.ndim != 2:
        raise ValueError(f"router_logits must be 2-D [T, E]; got shape {logits.shape}")
    cuda_dtype(logits.dtype, "router_logits")
    if not logits.is_c_contiguous():
        raise ValueError("router_logits must be C-contiguous")
    tokens, experts = logits.shape
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"router_logits must have 1 to {MAX_EXPERTS} experts; got {experts}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be an int in [1, {experts}]; got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {sorted(SCORINGS)}; got {scoring!r}")
    import cupy

    res = stream_resources(device_of(logits), stream)
    if key is not None:
        if calls is None:
            calls = _local.calls = {}
        if len(calls) >= MAX_CACHED_ROUTES:
            calls.clear()
        calls[key] = (res, kernel_arch(res), int(top_k), SCORINGS[scoring], int(bool(renormalize)))
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        weights = cupy.empty((tokens, top_k), dtype=cupy.float32)
        ids = cupy.empty((tokens, top_k), dtype=cupy.int32)
        if tokens:
            K.route_topk(
                res.launch_stream,
                kernel_arch(res),
                as_cupy(logits),
                int(top_k),
                SCORINGS[scoring],
                int(bool(renormalize)),
                weights,
                ids,
            )
    return weights, ids


# Checked calls kept per thread (a model's routers share a few shapes).
MAX_CACHED_ROUTES = 256
_local = threading.local()


def _route_key(logits, top_k, scoring, renormalize, stream):
    """The key of a cacheable call (CuPy logits; None, or an int stream), else None.
    Types are part of it where a value check depends on them (``True == 1``)."""
    if type(logits) is not cupy_array_type() or type(scoring) is not str:
        return None
    if stream is None:
        import cupy

        handle = cupy.cuda.get_current_stream(logits.device.id).ptr
    elif type(stream) is int and stream >= 0:
        handle = stream
    else:
        return None
    try:
        key = (logits.shape, logits.strides, logits.dtype, logits.device.id, top_k, type(top_k), scoring,
               renormalize, type(renormalize), handle)  # fmt: skip
        hash(key)
    except TypeError:
        return None
    return key


def _route_checked(checked, logits, current: bool):
    """``route`` of CuPy ``logits`` whose call passed the checks before: ``checked``
    holds (stream resources, architecture, top_k, scoring code, renormalize)."""
    import cupy

    res, arch, top_k, scoring, renormalize = checked
    tokens = logits.shape[0]
    if current and cupy.cuda.runtime.getDevice() == res.device_id:
        # The caller's current device and stream already: nothing to switch.
        weights = cupy.ndarray((tokens, top_k), cupy.float32)
        ids = cupy.ndarray((tokens, top_k), cupy.int32)
        if tokens:
            K.route_topk(res.stream, arch, logits, top_k, scoring, renormalize, weights, ids)
        return weights, ids
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        weights = cupy.ndarray((tokens, top_k), cupy.float32)
        ids = cupy.ndarray((tokens, top_k), cupy.int32)
        if tokens:
            K.route_topk(res.stream, arch, logits, top_k, scoring, renormalize, weights, ids)
    return weights, ids
