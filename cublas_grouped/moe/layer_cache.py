"""Checked calls of ``moe_forward``: a repeated call skips its argument checks
(and, with the same per-expert counts, the dispatch's choices: :func:`dispatch_decision`).

Each decode step calls the layer with the same shapes, dtypes, devices,
options and stream; its checks (tokens, routing, weights, biases, options)
then come out the same every time. They are kept per thread under a key of
exactly what they read (:func:`layer_key`): every array's shape, byte
strides, dtype and device, every option with its type (``True == 1`` must not
let a bad option through), the executor and the resolved stream. Only a call
that passed its checks is stored, so a bad call raises as before. No check
reads an address or a value in GPU memory, so neither is keyed.

Not cached (the checks run every time): arrays other than CuPy arrays (torch,
DLPack, FP8 weights, which are dequantized per call anyway), other stream
objects, ``return_context``/``recompute``, and the deprecated ``sync_free``
(its warning is given on every call).
"""

from __future__ import annotations

import threading

from ..gemm.call_cache import choice_state
from ..runtime.arrays import cupy_array_type

__all__ = ["layer_key", "lookup", "store", "clear", "dispatch_decision", "MAX_CACHED_LAYERS"]

# Checked calls kept per thread (a model's layers share a few shapes per batch size).
MAX_CACHED_LAYERS = 512
_local = threading.local()


def _optional(x, nd):
    if x is None:
        return None
    if type(x) is not nd:
        raise TypeError  # not cacheable: the caller gives up
    return (x.shape, x.strides, x.dtype, x.data.device_id)  # data.device_id: .device builds a Device


def layer_key(x, ids, weights, w1, w2, b1, b2, options: tuple, executor, stream, dropped_pairs):
    """The key of one ``moe_forward`` call, or None when it is not cacheable.

    ``options``: the call's scalar options (activation, gated, trans_b,
    algorithm, fixed_capacity), keyed with their types."""
    nd = cupy_array_type()
    if type(x) is not nd or type(ids) is not nd or type(w1) is not nd or type(w2) is not nd:
        return None
    try:
        arrays = (
            (x.shape, x.strides, x.dtype, x.data.device_id),
            (ids.shape, ids.strides, ids.dtype, ids.data.device_id),
            None if weights is None else _optional(weights, nd),
            (w1.shape, w1.strides, w1.dtype, w1.data.device_id),
            (w2.shape, w2.strides, w2.dtype, w2.data.device_id),
            None if b1 is None else _optional(b1, nd),
            None if b2 is None else _optional(b2, nd),
            None if dropped_pairs is None else _optional(dropped_pairs, nd),
        )
        if stream is None:
            import cupy

            handle = cupy.cuda.get_current_stream(x.data.device_id).ptr
        elif type(stream) is int and stream >= 0:
            handle = stream
        else:
            return None
        key = (arrays, options, tuple(map(type, options)), executor, handle)
        hash(key)
    except TypeError:
        return None
    return key


def lookup(key):
    """What the checked call with ``key`` found (see ``moe_forward``), or None."""
    calls = getattr(_local, "calls", None)
    return None if key is None or calls is None else calls.get(key)


def store(key, checked) -> None:
    """Keep ``checked`` under ``key`` (nothing when the call had no key)."""
    if key is None:
        return
    calls = getattr(_local, "calls", None)
    if calls is None:
        calls = _local.calls = {}
    if len(calls) >= MAX_CACHED_LAYERS:
        calls.clear()
    calls[key] = checked


def clear() -> None:
    """Forget this thread's checked calls and dispatch decisions (tests)."""
    _local.calls = {}
    _local.decisions = {}


def dispatch_decision(
    executor, algorithm, counts_host, n: int, k: int, dtype, second_gemm, device_id, decide
):
    """``decide()`` (the dispatch's algorithms, row layout and host offsets for
    these per-expert counts), remembered per thread for exactly these inputs:
    the executor (its config compared by identity), the ``algorithm`` argument,
    the counts' values, the GEMM shapes and dtype, the device, and AUTO's
    tuning state (``gemm.call_cache.choice_state``, taken before deciding, so a
    measurement made while deciding is seen by the next call)."""
    key = (executor, algorithm, counts_host.tobytes(), n, k, dtype, second_gemm, device_id)
    decisions = getattr(_local, "decisions", None)
    if decisions is None:
        decisions = _local.decisions = {}
    state = choice_state()
    try:
        found = decisions.get(key)
    except TypeError:  # an unhashable argument: decide every time
        return decide()
    if found is not None and found[0] is executor.config and found[1] == state:
        return found[2]
    value = decide()
    if len(decisions) >= MAX_CACHED_LAYERS:
        decisions.clear()
    decisions[key] = (executor.config, state, value)
    return value
