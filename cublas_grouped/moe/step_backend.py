"""Which GEMMs a fixed-capacity step runs: our Hopper kernel over
grouped-contiguous rows (:mod:`.kernel_step`) or the chunked cuBLAS calls
(:mod:`.fixed_capacity`), by the executor's algorithm, the GPU, the layer's
shape and the weights' alignment."""

from __future__ import annotations

from ..gemm.backends import hopper
from ..gemm.config import Algorithm
from ..runtime.arrays import cupy_array_type, view
from .checks import LayerShape

__all__ = ["CHUNKED_DECODE_MAX_EXPERTS", "CHUNKED_DECODE_MAX_TOKENS", "fixed_capacity_backend"]

# Prepared choices kept (then started over): one per GPU, shape and alignment.
MAX_CHOICES = 512

# Under AUTO, the smallest decode steps of layers with few experts keep the
# chunked calls. Measured on an H200 (docs/kernel-notes.md, "Mixtral decode
# on the kernel step", graph replays of whole steps, tools/layer_probe.py,
# 2026-11-27, with the kernel's thin tiles): Mixtral-8x7B at 1 token, chunked
# 196 us against the kernel's 250 (2 experts: GEMM 2's 32 column tiles keep
# 32 of 132 SMs busy); from 2 tokens the kernel is faster, 1.01-1.41x (2: 1.10,
# 3: 1.12, 4: 1.11-1.41, 16: 1.01, 32: 1.30, 64: 1.18; at 16 and 64 tokens
# 89-90% of the bandwidth floor, against 75-89% chunked). The
# H100 rule before (chunked up to 64 tokens) came from the kernel before
# v14 and its thin tiles. Larger steps take the kernel (T-row chunks would
# compute far more rows than the experts have).
CHUNKED_DECODE_MAX_EXPERTS = 8
CHUNKED_DECODE_MAX_TOKENS = 1


def fixed_capacity_backend(sm, executor, shape: LayerShape, w1, w2, tokens: int) -> str:
    """Which GEMMs a fixed-capacity step of ``tokens`` tokens runs:
    ``"sm90_grouped"`` (our Hopper kernel on grouped-contiguous rows, group
    sizes read on the device) or ``"chunked_batched"`` (cuBLAS over chunk
    problems).

    The kernel where the executor's algorithm is SM90_GROUPED, or AUTO outside
    the few-expert decode steps above, the GPU is SM 9.0 and both GEMMs fit it
    (bfloat16/float16, H, 2I or I and the widths multiples of 8, 16-byte
    aligned weights): it computes no tile past an expert's rows and reads each
    active expert's weights once per column tile, where the chunked calls
    compute every chunk any routing could need. Anything else (other GPUs,
    float32, a forced cuBLAS algorithm) keeps the chunked calls.
    """
    algorithm = executor.config.algorithm
    if algorithm not in (Algorithm.AUTO, Algorithm.SM90_GROUPED):
        return "chunked_batched"
    few_expert_decode = (
        shape.num_experts <= CHUNKED_DECODE_MAX_EXPERTS and tokens <= CHUNKED_DECODE_MAX_TOKENS
    )
    if algorithm is Algorithm.AUTO and few_expert_decode:
        return "chunked_batched"
    # The rest reads the GPU, the shape and the weights' alignment only:
    # remembered per exactly those (a dictionary lookup per call after the first).
    aligned = (_address(w1, "w1") % hopper.ALIGNMENT == 0, _address(w2, "w2") % hopper.ALIGNMENT == 0)
    key = (sm, shape, aligned)
    found = _kernel_fits.get(key)
    if found is None:
        gemms = ((shape.width, shape.hidden), (shape.hidden, shape.inter))
        fits = all(hopper.unsupported_shape(sm, shape.dtype, n, k) is None for n, k in gemms)
        if len(_kernel_fits) >= MAX_CHOICES:
            _kernel_fits.clear()
        found = _kernel_fits[key] = "sm90_grouped" if fits and all(aligned) else "chunked_batched"
    return found


_kernel_fits: dict = {}  # (sm, shape, weights aligned) -> fixed_capacity_backend's answer past the algorithm


def _address(w, name: str) -> int:
    if type(w) is cupy_array_type():
        return w.data.ptr  # every cached call: no view to build
    return view(w, name).ptr
