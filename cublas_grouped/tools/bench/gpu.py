"""GPU helpers shared by the benchmark and the tuner, and the HBM bandwidth decode is judged by.

Is a GPU usable, random device arrays made without a large host copy, the
model's weights kept across its cases, the memory pool handed back, one-line
error texts; and the HBM bandwidth: ``--hbm-gbs``, a datasheet figure by GPU
name, or a device-to-device copy measured at start. CuPy is imported inside
the functions, so importing this module needs no GPU.
"""

from __future__ import annotations

import contextlib
import math
import re

import numpy as np

from ...runtime.oom import GpuOutOfMemoryError, is_out_of_memory, out_of_memory
from ...runtime.timing import time_ms
from .workloads import Case, case_seed

__all__ = [
    "no_gpu_reason",
    "describe_error",
    "random_normal",
    "free_pool",
    "WeightCache",
    "packed_w1",
    "torch_on_cupy_stream",
    "datasheet_hbm_gbs",
    "copy_gbs",
    "measure_copy_gbs",
    "resolve_hbm",
    "hbm_lines",
    "FALLBACK_HBM_GBS",
    "COPY_BYTES",
    "COPY_REPEAT",
    "hold_stream",
]

# HBM bandwidth by GPU name, GB/s from the datasheets: (name pattern, GB/s, part).
# %HBM is judged against these peaks; a GPU not listed is judged against a copy measured at start.
HBM_DATASHEET = (
    (re.compile(r"\bH100 80GB HBM3\b"), 3350.0, "H100 SXM"),
    (re.compile(r"\bH100 NVL\b"), 3900.0, "H100 NVL"),
    (re.compile(r"\bH100 PCIe\b"), 2000.0, "H100 PCIe"),
    (re.compile(r"(?<!G)H200\b"), 4800.0, "H200"),
)
# Used only when the GPU is unknown and the copy could not be measured.
FALLBACK_HBM_GBS = 3350.0
COPY_BYTES = 1 << 30
COPY_REPEAT = 5


def no_gpu_reason() -> str | None:
    """Why the benchmark cannot run here, or ``None`` when a CUDA GPU is usable."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    return None if count > 0 else "no CUDA device found"


def describe_error(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``: what a table cell or a progress line shows.

    Out of memory in the benchmark's own allocations (inputs, weights, rotation
    sets) reads like the library's own reports: bytes, device, CuPy's words."""
    if is_out_of_memory(exc) and not isinstance(exc, GpuOutOfMemoryError):
        exc = out_of_memory("the benchmark's buffers", exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _cupy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def random_normal(shape: tuple[int, ...], dtype: str, scale: float, seed: int):
    """Random normal GPU array * ``scale`` in ``dtype``.

    Made in slices of the first axis so the float32 staging never needs more
    than ~256 MB (w1 of DeepSeek-V3 is 15 GB). bfloat16 is rounded from
    float32 by integer ops (round to nearest even), so no CuPy cast to
    bfloat16 is needed.
    """
    import cupy

    bf16 = dtype == "bfloat16"
    raw = cupy.empty(shape, dtype=cupy.uint16 if bf16 else _cupy_dtype(dtype))
    flat = raw.reshape(shape[0], -1)
    row_bytes = max(1, flat.shape[1] * 4)
    step = max(1, (256 << 20) // row_bytes)
    rng = cupy.random.default_rng(seed)
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        block = rng.standard_normal((stop - start, flat.shape[1]), dtype=cupy.float32)
        block *= scale
        if bf16:
            bits = block.view(cupy.uint32)
            flat[start:stop] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cupy.uint16)
        else:
            flat[start:stop] = block.astype(raw.dtype)
        del block
    return raw.view(_cupy_dtype(dtype)) if bf16 else raw


def free_pool() -> None:
    """Hand CuPy's cached blocks back so the next case starts from a clean pool."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


def torch_on_cupy_stream(torch, cp):
    """A context factory running torch on CuPy's current stream, so the
    benchmark's CUDA events bracket torch's kernels too (the default stream,
    where torch runs anyway, needs no switch)."""
    ptr = cp.cuda.get_current_stream().ptr
    external = torch.cuda.ExternalStream(ptr) if ptr else None
    return lambda: torch.cuda.stream(external) if external else contextlib.nullcontext()


# Experts packed at a time by packed_w1 (DeepSeek-V3's w1 is 15 GB: a
# transposed temporary of the whole would not fit beside it and its copy).
EXPERTS_PER_PACK = 16


def packed_w1(w1):
    """``w1`` [E, H, 2I] with gate and up packed in blocks of 128 columns
    (:func:`cublas_grouped.pack_gate_up`), a few experts at a time."""
    import cupy

    import cublas_grouped as cg

    out = cupy.empty_like(w1)
    for e0 in range(0, w1.shape[0], EXPERTS_PER_PACK):
        e1 = min(e0 + EXPERTS_PER_PACK, w1.shape[0])
        out[e0:e1] = cg.pack_gate_up(w1[e0:e1])
    return out


class WeightCache:
    """The current model's ``w1``/``w2``, kept across its cases (regenerated when dropped)."""

    def __init__(self, seed: int):
        self._seed = seed
        self._key: tuple | None = None
        self._arrays: dict[str, object] = {}

    def get(self, case: Case, which: str):
        """``w1`` ``[E, H, N1]``, ``w2`` ``[E, I, H]`` or ``w1_packed`` (``w1`` with
        gate and up packed in blocks of 128 columns) of ``case``'s model, made on first use."""
        key = (case.model, case.experts, case.hidden, case.inter, case.dtype, case.gated)
        if key != self._key:
            self.clear()
            self._key = key
        if which == "w1_packed" and which not in self._arrays:
            self._arrays[which] = packed_w1(self.get(case, "w1"))
        if which not in self._arrays:
            seed = case_seed(f"{case.model}:{which}", self._seed)
            if which == "w1":
                self._arrays[which] = random_normal(
                    (case.experts, case.hidden, case.n1), case.dtype, 1.0 / math.sqrt(case.hidden), seed
                )
            else:
                self._arrays[which] = random_normal(
                    (case.experts, case.inter, case.hidden), case.dtype, 1.0 / math.sqrt(case.inter), seed
                )
        return self._arrays[which]

    def holds(self, which: str) -> bool:
        """Whether ``which`` is made now."""
        return which in self._arrays

    def nbytes(self) -> int:
        """Bytes of the weights held now."""
        return sum(a.nbytes for a in self._arrays.values())

    def drop(self, which: str) -> None:
        """Free one of the weights; :meth:`get` makes it again."""
        self._arrays.pop(which, None)
        free_pool()

    def clear(self) -> None:
        """Free every weight."""
        self._arrays.clear()
        self._key = None
        free_pool()


# -- HBM bandwidth -----------------------------------------------------------------------------------------


def datasheet_hbm_gbs(gpu_name: str) -> tuple[float, str] | None:
    """(GB/s, part) of a GPU whose HBM bandwidth is known by name, else None."""
    for pattern, value, part in HBM_DATASHEET:
        if pattern.search(gpu_name):
            return value, part
    return None


def copy_gbs(nbytes: int, ms: float) -> float:
    """Bandwidth of a device-to-device copy of ``nbytes`` that took ``ms``: every
    byte is read once and written once, so ``2 * nbytes`` cross the HBM interface."""
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_copy_gbs(nbytes: int = COPY_BYTES, repeat: int = COPY_REPEAT) -> float:
    """HBM bandwidth seen by one ``cudaMemcpyAsync`` of ``nbytes`` device to device:
    one untimed copy, then the median of ``repeat`` copies timed with CUDA events."""
    import cupy

    src = cupy.empty(nbytes, dtype=cupy.uint8)
    dst = cupy.empty(nbytes, dtype=cupy.uint8)
    src.fill(1)
    stream = cupy.cuda.get_current_stream()
    d2d = cupy.cuda.runtime.memcpyDeviceToDevice
    to, frm = dst.data.ptr, src.data.ptr
    t = time_ms(
        lambda i: cupy.cuda.runtime.memcpyAsync(to, frm, nbytes, d2d, stream.ptr), warmup=1, repeat=repeat
    )
    del src, dst
    free_pool()
    return copy_gbs(nbytes, t["median"])


def resolve_hbm(flag_gbs: float | None, gpu_name: str, measured_gbs: float | None) -> tuple[float, str]:
    """The HBM bandwidth %HBM and the decode floor use, and where it comes from.

    ``--hbm-gbs`` when given; else the datasheet figure of a GPU known by name;
    else the measured copy; else ``FALLBACK_HBM_GBS`` (said so).
    """
    if flag_gbs is not None:
        return float(flag_gbs), "--hbm-gbs"
    known = datasheet_hbm_gbs(gpu_name)
    if known is not None:
        return known[0], f"datasheet figure of the {known[1]}, known by the GPU name"
    if measured_gbs is not None:
        return measured_gbs, (
            f"measured: device-to-device copy of {COPY_BYTES >> 30} GiB, median of {COPY_REPEAT}, "
            "bytes read + written"
        )
    return FALLBACK_HBM_GBS, "assumed (H100 SXM): the GPU is not known by name and the copy was not measured"


def hbm_lines(
    gbs: float, source: str, measured_gbs: float | None, copy_error: str | None = None
) -> list[str]:
    """What the benchmark says about the bandwidth it judges decode by."""
    lines = [f"HBM bandwidth for %HBM and the decode floor: {gbs:.0f} GB/s ({source})"]
    if measured_gbs is not None:
        lines.append(
            f"measured device-to-device copy: {measured_gbs:.0f} GB/s = {100 * measured_gbs / gbs:.0f}% of {gbs:.0f}"
        )
    elif copy_error:
        lines.append(f"device-to-device copy not measured: {copy_error}")
    return lines


# A one-thread kernel that keeps its stream busy for a given time (the GPU's
# globaltimer, in ns), so that whatever the host queues behind it meanwhile
# then runs back to back: the stage split of a call that never waits for the
# GPU times the GPU's stages, not the host's pace of launching them.
_HOLD_SOURCE = r"""
extern "C" __global__ void hold_stream(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""
_hold_kernels: dict = {}  # id(the cupy module) -> its compiled kernel


def hold_stream(ms: float) -> None:
    """Queue ``ms`` milliseconds of one waiting GPU thread on CuPy's current stream."""
    import cupy

    kernel = _hold_kernels.get(id(cupy))
    if kernel is None:
        kernel = _hold_kernels[id(cupy)] = cupy.RawKernel(_HOLD_SOURCE, "hold_stream")
    kernel((1,), (1,), (np.uint64(int(ms * 1e6)),))
