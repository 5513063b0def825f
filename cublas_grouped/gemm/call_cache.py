"""The plan cache of eager grouped-GEMM calls: a repeated call skips its checks and choices.

A decode loop calls ``gmm`` with the same shapes, dtypes, device, stream and
group sizes step after step; the checks, the plan and AUTO's choice come out
the same every time, and on a slow host they cost far more than the GPU work
of a tiny problem. :meth:`GroupedGemmExecutor.execute` therefore looks each
call up here first, by a key built from the raw arguments
(:func:`call_key`), and runs what a checked call with that key decided
(:class:`CachedCall`). Only a call that passed every check is stored, so an
invalid call never hits: it runs the full checks and raises as before.

What is keyed (everything the checks, the plan and the choice read):

- ``a``, ``b``, ``out``: shape, byte strides, dtype, device, and the address
  modulo 16 (element alignment, and the 16-byte alignment that decides between
  pointer-array algorithms, SEQUENTIAL and our Hopper kernel);
- host ``group_sizes`` (a NumPy array): dtype, shape and every value;
- device ``group_sizes``: type, shape, strides, dtype, device; where the call
  copies them to the host, their values key a second entry after the copy;
- ``trans_a``, ``trans_b``, the ``algorithm`` argument, the executor (its
  ``config`` is compared by identity on each hit), the resolved stream handle;
- for AUTO, the tuning state (:func:`choice_state`: a measurement or a
  ``reset_tuning_cache`` since, ``CUBLAS_GROUPED_AUTOTUNE``,
  ``CUBLAS_GROUPED_TUNING_DIR`` and ``CUBLAS_GROUPED_CHECK_DEVICE_SIZES``),
  compared on each hit.

Not keyed, and why: the full addresses (no check reads more than their
alignment; each call's own addresses are used), device-resident sizes that
stay on the device (never read on the host, as without the cache), and
anything that is not a CuPy array or NumPy sizes (lists, torch tensors,
DLPack objects, other stream objects: those calls take the checked path every
time). The device's capabilities and cuBLAS's version do not change within a
process. Entries are per thread (the stream resources they run on are), at
most :data:`MAX_CACHED_CALLS` of them, and hold no reference to any array.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from ..runtime.arrays import cupy_array_type
from ..runtime.device import resolve_stream
from . import autotune as _autotune
from . import select as _select
from .backends.hopper_sizes import CHECK_ENV as _CHECK_SIZES_ENV
from .config import Algorithm
from .plan import GemmPlan

__all__ = [
    "CachedCall",
    "call_key",
    "choice_state",
    "lookup",
    "store",
    "clear",
    "cached_count",
    "MAX_CACHED_CALLS",
    "EMPTY",
    "ZERO",
    "SKIP",
    "RUN",
    "COPY_SIZES",
]

# Entries kept per thread; past this the cache starts over (a model's layers and
# batch shapes need a few dozen).
MAX_CACHED_CALLS = 1024

# What a cached call does once its output exists.
EMPTY = "empty"  # nothing to write (M, N or the trans_a output is empty)
ZERO = "zero"  # K = 0: the output is zeros
SKIP = "skip"  # no group has rows (trans_a: their outputs are zeroed)
RUN = "run"  # run the plan with the algorithm
COPY_SIZES = "copy sizes"  # device sizes: copy them, then look up the entry of their values

_local = threading.local()
# os.environ's own dict (bytes keys on POSIX): read directly, an unset variable
# costs one dictionary lookup instead of os.environ.get's encoding and KeyError.
_ENVIRON = getattr(os.environ, "_data", None)
_AUTOTUNE_ENV, _TUNING_DIR_ENV = "CUBLAS_GROUPED_AUTOTUNE", "CUBLAS_GROUPED_TUNING_DIR"
if isinstance(_ENVIRON, dict) and all(isinstance(k, bytes) for k in list(_ENVIRON)[:1]):
    _ENV_KEYS = (_AUTOTUNE_ENV.encode(), _TUNING_DIR_ENV.encode(), _CHECK_SIZES_ENV.encode())
else:  # another platform's environ: the public way
    _ENVIRON, _ENV_KEYS = os.environ, (_AUTOTUNE_ENV, _TUNING_DIR_ENV, _CHECK_SIZES_ENV)


@dataclass(eq=False)
class CachedCall:
    """What a checked call decided, for the calls with its key.

    Attributes
    ----------
    config : the executor's config when stored (a hit needs the same object)
    action : EMPTY, ZERO, SKIP, RUN or COPY_SIZES
    plan : the call's plan (host sizes included)
    algorithm : the concrete algorithm, after AUTO and the fallbacks
    dtype, device_id, out_shape : of the operands and the result
    zero_groups : trans_a with empty groups: their outputs are zeroed after the GEMMs
    device_sizes : the back end gets the device-resident sizes (SM90_GROUPED reads
        them; after a copy, the cuBLAS pointer kernel builds from them)
    auto_state : :func:`choice_state` before AUTO chose, or None for a fixed algorithm
    prepared : a back end's prepared call (``PreparedGrouped``), or None
    """

    config: object
    action: str
    plan: GemmPlan | None = None
    algorithm: Algorithm | None = None
    dtype: np.dtype | None = None
    device_id: int = 0
    out_shape: tuple = ()
    zero_groups: bool = False
    device_sizes: bool = False
    auto_state: tuple | None = None
    prepared: object = None


def choice_state() -> tuple:
    """What AUTO's choice depends on besides the call's shapes and sizes: new
    measurements, tuning-cache resets and three environment variables (the
    tuning ones, and whether device sizes are to be checked)."""
    env = _ENVIRON
    return (
        _autotune._generation,
        _select._resets,
        env.get(_ENV_KEYS[0]),
        env.get(_ENV_KEYS[1]),
        env.get(_ENV_KEYS[2]),
    )


def _array_key(x) -> tuple:
    return (x.shape, x.strides, x.dtype, x.data.ptr & 15, x.data.device_id)


def call_key(executor, a, b, group_sizes, trans_a, trans_b, out, stream, algorithm):
    """``(key, stream handle)`` of one ``execute`` call, or ``(None, None)`` when
    the call is not cacheable (see the module notes). Never raises for bad
    arguments: those are the checked path's to report."""
    nd = _ndarray or _cupy_type()
    if type(a) is not nd or type(b) is not nd:
        return None, None
    try:
        if out is None:
            out_key = None
        elif type(out) is nd:
            out_key = _array_key(out)
        else:
            return None, None
        kind = type(group_sizes)
        if kind is np.ndarray:
            sizes_key = (group_sizes.dtype.str, group_sizes.shape, group_sizes.tobytes())
        elif kind is nd:
            sizes_key = (nd, *_array_key(group_sizes))
        else:
            return None, None
        # Inline rather than _array_key: two calls fewer on every call.
        device = a.data.device_id
        a_key = (a.shape, a.strides, a.dtype, a.data.ptr & 15, device)
        b_key = (b.shape, b.strides, b.dtype, b.data.ptr & 15, b.data.device_id)
        if stream is None:
            import cupy

            handle = cupy.cuda.get_current_stream(device).ptr
        elif type(stream) is int and stream >= 0:
            handle = stream
        else:
            handle = resolve_stream(stream, device)
    except Exception:  # an odd argument: the checked path says what is wrong with it
        return None, None
    return (executor, algorithm, trans_a, trans_b, a_key, b_key, out_key, sizes_key, handle), handle


_ndarray = None


def _cupy_type():
    global _ndarray
    _ndarray = cupy_array_type()
    return _ndarray


def lookup(key: tuple, config) -> CachedCall | None:
    """The entry stored under ``key`` if it is still valid for an executor with ``config``."""
    calls = getattr(_local, "calls", None)
    if calls is None:
        return None
    try:
        entry = calls.get(key)
    except TypeError:  # an unhashable argument (trans_a, say): the checked path runs
        return None
    if entry is None or entry.config is not config:
        return None
    if entry.auto_state is not None and entry.auto_state != choice_state():
        return None
    return entry


def store(key: tuple | None, entry: CachedCall) -> None:
    """Keep ``entry`` under ``key`` (nothing when the call had no key)."""
    if key is None:
        return
    calls = getattr(_local, "calls", None)
    if calls is None:
        calls = _local.calls = {}
    if len(calls) >= MAX_CACHED_CALLS:
        calls.clear()
    try:
        calls[key] = entry
    except TypeError:  # unhashable: such calls are never cached
        pass


def clear() -> None:
    """Forget this thread's entries (tests; never needed for correctness)."""
    _local.calls = {}


def cached_count() -> int:
    """Entries this thread holds."""
    return len(getattr(_local, "calls", None) or ())
