"""Top-k routing: router logits to each token's experts and weights, on the GPU."""

from __future__ import annotations

import numpy as np

from ..runtime.arrays import as_cupy, cuda_dtype, view
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
