"""The fixed-capacity layer step with FP8 expert weights on our FP8 Hopper kernel (SM 9.0).

The 16-bit kernel step (:mod:`.kernel_step`) with each GEMM whose weights
are :class:`~cublas_grouped.FP8ExpertWeights` run on the FP8 kernel
(``kernels/grouped_gemm_fp8_sm90.cu``) instead of on a dequantized copy:

    counts, offsets, rows placed, gather (as the 16-bit step)
    -> quantize_rows_fp8(rows) -> FP8 GEMM 1 -> activation kernel
    -> quantize_rows_fp8(act) -> FP8 GEMM 2 -> combine

with both quantizations inside the kernel before them
(:data:`FUSE_QUANTIZE`): the activation kernel writes GEMM 2's codes and
scales itself, and the gather those of GEMM 1 (``place_one_block_fp8`` at
decode, where one launch places the rows; ``gather_rows_fp8`` above).

Both GEMMs read the per-expert counts on the device over the same
grouped-contiguous T*k rows and the same schedule buffer (the FP8 kernel
walks the 16-bit kernel's 128-row tiles), and the activations are quantized
on the device (one e4m3 scale per row per 128 columns) into buffers the
layer owns (:class:`FP8Rows`): nothing is allocated, nothing copied to the
host, every launch's size depends on T alone, so a CUDA graph captures it.

The activation between the GEMMs (``act(gate) * up``) stays the separate
activation kernel: the FP8 kernel has no gated epilogue (the 16-bit one
does), and GEMM 2 reads the activation quantized anyway (written so by the
activation kernel).
A weight that is not FP8 (one of the two) runs on the 16-bit kernel.

Who takes it (:func:`fp8_step_unsupported`): bfloat16 tokens, FP8 weights in
the checkpoint layout the kernel reads (``trans_b=True``, ``"block128"``, K a
multiple of 16, N of 8, 16-byte aligned values), the executor's algorithm
AUTO or SM90_GROUPED, an SM 9.0 GPU. Unlike the 16-bit layers, few-expert
decode steps take it too under AUTO: the chunked alternative would
dequantize every expert's weights at every step. Anything else keeps the
dequantizing fallback (a dense 16-bit copy of the weights, refilled per step).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from threading import get_ident

import numpy as np

from ..gemm.backends import hopper, hopper_fp8
from ..gemm.backends.hopper_variants import choice_key
from ..gemm.config import Algorithm
from ..gemm.fp8 import BLOCK, is_fp8, quantize_rows_fp8
from ..runtime.arrays import BFLOAT16, as_cupy, view
from . import kernels as K
from . import placement_launches
from .checks import LayerShape, kernel_arch
from .chunk_capacity import ChunkBuffers
from .dispatch import mark_stage
from .fp8_step_launches import fp8_step_launches
from .kernel_step import MAX_PREPARED_STEPS, overlapped, place_rows, places_in_one_launch

__all__ = [
    "FUSE_QUANTIZE",
    "FP8Rows",
    "fp8_step_unsupported",
    "has_fp8",
    "fp8_kernel_step",
    "cached_fp8_rows",
    "layer_weight_nbytes",
]

# Each FP8 GEMM's rows quantized by the kernel that writes them, not by a
# quantize_rows_fp8 launch of their own: GEMM 2's by the activation kernel
# (expert_activation_fp8, any step size), GEMM 1's by the gather
# (place_one_block_fp8 where one launch places the rows, at decode;
# gather_rows_fp8 after the placement's other launches, since 2026-11-27
# evening: docs/benchmarks.md). The same codes and scales bit for
# bit, so the same outputs. At Qwen3-30B-A3B decode (H200, ncu) each quantize
# launch took about 6 us; the layer's graph replays (H200, 2026-11-27, the
# same FP8 GEMM both ways) went from 48.8 to 42.3 us at T=1, 133.1 to 124.8 at
# T=16 and 190.5 to 181.6 at T=64. False: the separate launches (the GPU test
# that compares both). Read at each step; a layer's CUDA graphs keep what
# they captured.
FUSE_QUANTIZE = True


def has_fp8(w1, w2) -> bool:
    """Whether either weight is :class:`~cublas_grouped.FP8ExpertWeights`."""
    return is_fp8(w1) or is_fp8(w2)


def fp8_step_unsupported(sm, algorithm, shape: LayerShape, w1, w2) -> str | None:
    """Why the FP8 step cannot run this layer (None when it can): ``sm`` the
    GPU's (major, minor), ``algorithm`` the executor's. From sizes, formats
    and weight addresses only: no GPU work. The reason names the weight."""
    if not has_fp8(w1, w2):
        return "neither w1 nor w2 is FP8ExpertWeights"
    if Algorithm(algorithm) not in (Algorithm.AUTO, Algorithm.SM90_GROUPED):
        return f"the executor's algorithm is {Algorithm(algorithm).value!r}, not auto or sm90_grouped"
    if np.dtype(shape.dtype) != BFLOAT16:
        return f"the FP8 kernel takes bfloat16 tokens; the layer's dtype is {np.dtype(shape.dtype).name}"
    gemms = ((w1, "w1", shape.width, shape.hidden), (w2, "w2", shape.hidden, shape.inter))
    for w, name, n, k in gemms:
        if is_fp8(w):
            reason = hopper_fp8.unsupported(sm, w, shape.dtype) or hopper_fp8.misaligned(
                view(w.values, f"{name}.values").ptr
            )
        else:
            reason = hopper.unsupported_shape(sm, shape.dtype, n, k)
            if reason is None and view(w, name).ptr % hopper.ALIGNMENT:
                reason = f"needs {hopper.ALIGNMENT}-byte aligned weights"
        if reason is not None:
            return f"{name}: {reason}"
    return None


@dataclass
class FP8Rows:
    """The quantized activations of an FP8 step: the gathered rows ``x`` and
    the activation ``act``, as e4m3 codes with one float32 scale per row per
    128 columns, for ``rows`` rows (T*k of the largest step)."""

    x_q: object  # uint8 [rows, H]
    x_s: object  # float32 [rows, ceil(H / 128)]
    act_q: object  # uint8 [rows, I]
    act_s: object  # float32 [rows, ceil(I / 128)]

    @classmethod
    def allocate(cls, shape: LayerShape, rows: int) -> FP8Rows:
        """Allocate on the current device."""
        import cupy

        def pair(cols):
            return (
                cupy.empty((rows, cols), dtype=cupy.uint8),
                cupy.empty((rows, -(-cols // BLOCK)), dtype=cupy.float32),
            )

        return cls(*pair(shape.hidden), *pair(shape.inter))

    @property
    def rows(self) -> int:
        return self.x_q.shape[0]

    @property
    def nbytes(self) -> int:
        """GPU memory of the four arrays."""
        return sum(getattr(self, f.name).nbytes for f in fields(self))


def cached_fp8_rows(res, shape: LayerShape, rows: int) -> FP8Rows:
    """:class:`FP8Rows` kept on the stream's resources for
    ``moe_forward(fixed_capacity=True)``, one set per layer shape, grown (to a
    power of two) when a step needs more rows, as the chunk buffers are."""
    key = ("fp8-rows", shape)
    cached = res.buffers.get(key)
    if cached is None or cached.rows < rows:
        cached = FP8Rows.allocate(shape, 1 << (rows - 1).bit_length())
        res.buffers[key] = cached
    return cached


def _gemm(res, shape, buf, w, a, a8, out, n: int, k: int, *, counter: int, quantized: bool = False) -> None:
    """One expert GEMM over ``out``'s rows on the device counts (the
    schedule :func:`.kernel_step.place_rows` made, taking its tiles from
    tile counter ``counter``): FP8 weights run the FP8 kernel on ``a8``
    (codes, scales: ``a`` quantized into them here, unless ``quantized``
    says the kernel before did it); 16-bit ones run the 16-bit kernel on
    ``a``."""
    pairs = out.shape[0]
    if is_fp8(w):
        if not quantized:
            quantize_rows_fp8(a, out=a8, stream=res.stream)
        ptrs = (a8[0].data.ptr, a8[1].data.ptr, out.data.ptr)
        hopper_fp8.grouped_rows_fp8(
            res, w, pairs, ptrs, buf.counts, scanned=True, storage=buf.schedule, counter=counter
        )
    else:
        problem = (shape.num_experts, pairs, n, k, shape.trans_b, shape.dtype)
        ptrs = (a.data.ptr, w.data.ptr, out.data.ptr)
        hopper.grouped_rows(
            res, problem, ptrs, buf.counts, scanned=True, storage=buf.schedule, counter=counter
        )


def fp8_kernel_step(
    res,
    shape: LayerShape,
    buf: ChunkBuffers,
    rows8: FP8Rows,
    x,
    ids,
    weights,
    params,
    out,
    dropped,
    timer=None,
) -> None:
    """One layer step with FP8 weights on ``res``'s stream (the module's
    docstring says what runs). ``params`` = (w1, w2, b1, b2): FP8ExpertWeights
    or CuPy arrays (biases may be None), as :func:`fp8_step_unsupported`
    accepted; ``rows8`` and ``buf`` hold at least T*k rows (the caller
    checked ``buf``); ``dropped``, ``timer``: as in :func:`.kernel_step`.

    Without a ``timer``, the launches are those of
    :func:`.fp8_step_launches.fp8_step_launches`, prepared once per buffers,
    T, weights and kernel choice (:func:`_prepared_key`), then replayed, each
    overlapped with the one before where :func:`.kernel_step.overlapped` says
    so (the 16-bit step's rule)."""
    w1, w2, b1, b2 = params
    if rows8.rows < ids.shape[0] * ids.shape[1]:
        raise RuntimeError(f"a step of {ids.shape[0]} tokens needs {ids.size} FP8 rows; {rows8.rows} held")
    tokens, k = ids.shape
    pairs = tokens * k
    # Which GEMM's rows the kernel before it quantizes (FUSE_QUANTIZE): GEMM
    # 1's wherever w1 is FP8 (the placement in one launch, place_one_block_fp8,
    # or the gather after the four, gather_rows_fp8), which then writes no
    # bf16 rows; GEMM 2's wherever w2 is FP8.
    fused1 = FUSE_QUANTIZE and is_fp8(w1)
    fused2 = FUSE_QUANTIZE and is_fp8(w2)
    if timer is None:
        key = _prepared_key(shape, rows8, ids, params, (fused1, fused2))
        step = buf.launches.get(key)
        if step is None:
            if len(buf.launches) >= MAX_PREPARED_STEPS:
                buf.launches.clear()
            step = buf.launches[key] = fp8_step_launches(
                res, shape, buf, rows8, x, ids, weights, params, out, dropped, (fused1, fused2)
            )
        step(res.stream, x.data.ptr, ids.data.ptr, _ptr(weights), out.data.ptr, _ptr(dropped))
        return
    arch, stream = kernel_arch(res), res.launch_stream
    x8 = (rows8.x_q[:pairs], rows8.x_s[:pairs])
    act8 = (rows8.act_q[:pairs], rows8.act_s[:pairs])
    pair_to_row, row_to_pair = place_rows(
        res, shape, buf, x, ids, dropped, timer, quantized=x8 if fused1 else None
    )
    x_rows, h, act, y = buf.rows[:pairs], buf.h[:pairs], buf.act[:pairs], buf.y[:pairs]
    # A 16-bit w1 packed in gate/up blocks runs the plain 16-bit kernel here and
    # the activation kernel reads the blocks (FP8 w1 is never packed: layer_shape).
    # Both GEMMs reuse the schedule place_rows made: GEMM 1 takes its tiles from
    # tile counter 0, GEMM 2 from counter 1 (both zeroed by that offsets launch).
    _gemm(res, shape, buf, w1, x_rows, x8, h, shape.width, shape.hidden, counter=0, quantized=fused1)
    mark_stage(timer, "gemm1", res.cupy_stream)
    activation = K.expert_activation_fp8 if fused2 else K.expert_activation
    activation(
        stream, arch, h, shape.inter, int(shape.gated), K.ACTIVATIONS[shape.activation], b1,
        row_to_pair, ids, act8 if fused2 else act, shape.gate_up_block,
    )  # fmt: skip
    mark_stage(timer, "activation", res.cupy_stream)
    _gemm(res, shape, buf, w2, act, act8, y, shape.hidden, shape.inter, counter=1, quantized=fused2)
    mark_stage(timer, "gemm2", res.cupy_stream)
    K.combine_rows(stream, arch, y, pair_to_row, weights, ids, b2, tokens, k, out)
    mark_stage(timer, "combine", res.cupy_stream)


def _ptr(array) -> int:
    return 0 if array is None else array.data.ptr


def _addresses(w) -> tuple[int, int] | int:
    """What a prepared launch holds of a weight: FP8 values' and scales'
    addresses (in the B tensor map and an argument), or the 16-bit array's."""
    if is_fp8(w):
        return as_cupy(w.values, "values").data.ptr, as_cupy(w.scales, "scales").data.ptr
    return w.data.ptr


def _prepared_key(shape: LayerShape, rows8: FP8Rows, ids, params, fused) -> tuple:
    """The key of an FP8 step's prepared launches in its buffers'
    ``launches`` (beside the 16-bit steps': the first entry tells them
    apart): T and k, every address a launch holds (weights, biases, the
    quantized rows), the thread (a step's slots are written before each
    launch), the overlap, the placement and the fused quantization, and what
    picks each GEMM's kernel, as the prepared GEMMs key it
    (``hopper_fp8.launch_choice``: tile shape, defines, grid limit, L2
    promotion; ``hopper``'s defines, schedule and grid limit for a 16-bit
    weight): a probe that changes one between steps gets new launches."""
    w1, w2, b1, b2 = params
    e, pairs = shape.num_experts, ids.size
    return (
        "fp8",
        ids.shape,
        _addresses(w1),
        _addresses(w2),
        _ptr(b1),
        _ptr(b2),
        rows8.x_q.data.ptr,
        rows8.x_s.data.ptr,
        rows8.act_q.data.ptr,
        rows8.act_s.data.ptr,
        get_ident(),
        overlapped(pairs),
        places_in_one_launch(e, pairs),
        placement_launches.HISTOGRAM_SCHEDULE,
        fused,
        hopper_fp8.launch_choice(pairs, e),
        (hopper.SOURCE, hopper.SCHEDULE, hopper.GRID_LIMIT, choice_key(hopper.DEFINES)),
    )


def layer_weight_nbytes(w1, w2) -> int:
    """GPU bytes of a layer's two weights as stored (FP8: values and scales)."""
    return sum(w.nbytes if is_fp8(w) else as_cupy(w, "weights").nbytes for w in (w1, w2))
