"""The FP8 step's launches prepared: what :func:`.fp8_step.fp8_kernel_step`
queues with a timer, packed once per buffers, T and weights, then replayed
(as :class:`.kernel_step.StepLaunches` replays the 16-bit step's).

Every argument but the addresses of x, ids, the routing weights, out and
the dropped counter is fixed by the layer's buffers (:class:`ChunkBuffers`,
:class:`FP8Rows`), T and the weights, so each launch is a
:class:`~cublas_grouped.runtime.launch.FixedLaunch` whose slots take those
five. Under :func:`.kernel_step.overlapped` (the 16-bit step's
``OVERLAP_LAUNCHES`` and ``OVERLAP_MAX_PAIRS``, read when a step is
prepared) each launch is a programmatic dependent launch: every kernel the
FP8 step runs (the placement, the row quantizer, the FP8 and 16-bit GEMMs,
the activation kernels, the combine, the offsets kernel) waits on the device
for the kernel before it ends (``griddepcontrol.wait``) before touching
memory (tests/test_overlapped_launches.py reads their PTX for that).
"""

from __future__ import annotations

from ..gemm import fp8_kernels as _q
from ..gemm.backends import hopper, hopper_fp8
from ..gemm.fp8 import is_fp8
from . import kernels as K
from .checks import LayerShape, kernel_arch
from .chunk_capacity import ChunkBuffers
from .kernel_step import overlapped, places_in_one_launch
from .placement_launches import placement_launches

__all__ = ["FP8StepLaunches", "fp8_step_launches"]


def _ptr(array) -> int:
    return 0 if array is None else array.data.ptr


class FP8StepLaunches:
    """The launches of one FP8 step, arguments packed once: calling it queues
    the step for new inputs (x, ids, weights, out, dropped given by address),
    one driver call per launch. ``overlap``: each launch a programmatic
    dependent launch."""

    def __init__(self, placement, quantize, gemms, activation, combine, gemm_outs, overlap: bool = False):
        launches = (*placement, *quantize, *gemms, activation, combine)
        if overlap:
            launches = tuple(None if f is None else f.launch_overlapped for f in launches)
        self.place, self.histogram, self.column_scan, self.scan, self.assign, self.gather = launches[:6]
        self.quantize1, self.quantize2, self.gemm1, self.gemm2, self.activation, self.combine = launches[6:]
        self.gemm1_out, self.gemm2_out = gemm_outs

    def __call__(self, stream: int, x: int, ids: int, weights: int, out: int, dropped: int) -> None:
        """Queue the step on the raw stream handle ``stream``."""
        if self.place is not None:  # the placement in one launch (places_in_one_launch)
            self.place(stream, ids, x, dropped)
        else:
            self.histogram(stream, ids)
            if self.column_scan is not None:
                self.column_scan(stream)
            if self.scan is not None:  # None: the histogram launch wrote the schedule
                self.scan(stream)
            self.assign(stream, ids, dropped)  # no routing weights: the combine weighs
            self.gather(stream, x)
        if self.quantize1 is not None:  # GEMM 1's rows, where the placement did not quantize them
            self.quantize1(stream)
        self.gemm1(stream, self.gemm1_out)
        self.activation(stream, ids)
        if self.quantize2 is not None:
            self.quantize2(stream)
        self.gemm2(stream, self.gemm2_out)  # tile counter 1: no second offsets launch
        self.combine(stream, weights, ids, out)


def fp8_step_launches(
    res, shape: LayerShape, buf: ChunkBuffers, rows8, x, ids, weights, params, out, dropped, fused
) -> FP8StepLaunches:
    """The launches :func:`.fp8_step.fp8_kernel_step` makes with a timer,
    prepared: the same kernels with the same arguments, in the same order
    (x, ids, ``weights``, ``out`` and ``dropped`` only say where their slots
    go; each call writes its own). ``rows8``: the step's :class:`.fp8_step.FP8Rows`; ``fused``: whether the
    placement (GEMM 1's) and the activation (GEMM 2's) write the e4m3 rows
    themselves (``fp8_step``'s choice, :data:`.fp8_step.FUSE_QUANTIZE`)."""
    w1, w2, b1, b2 = params
    arch = kernel_arch(res)
    tokens, k = ids.shape
    e, pairs = shape.num_experts, tokens * k
    pair_to_row, row_to_pair = buf.pair_to_row[:pairs], buf.row_to_pair[:pairs]
    x_rows, h, act, y = buf.rows[:pairs], buf.h[:pairs], buf.act[:pairs], buf.y[:pairs]
    x8 = (rows8.x_q[:pairs], rows8.x_s[:pairs])
    act8 = (rows8.act_q[:pairs], rows8.act_s[:pairs])
    prep = K.Prepare()
    base = buf.schedule.data.ptr
    if places_in_one_launch(e, pairs):
        prep.slots = (0, 6, 17)  # ids, x, dropped (no routing weights: row_weights is not written)
        place = K.place_one_block(
            prep, arch, ids, e, None, x, hopper.BLOCK_M, buf.counts, hopper.schedule_addresses(base, e),
            pair_to_row, row_to_pair, dropped=dropped, rows=None if fused[0] else x_rows,
            quantized=x8 if fused[0] else None,
        )  # fmt: skip
        placement = (place, None, None, None, None, None)
    else:
        placement = (
            None,
            *placement_launches(
                prep,
                arch,
                buf,
                x,
                ids,
                None,
                dropped,
                e,
                False,
                weigh=False,
                quantized=x8 if fused[0] else None,
            ),
        )
    quantize = tuple(
        _q.prepared_quantize_rows(
            arch, a.data.ptr, pairs, a.shape[1], a8[1].data.ptr, a8[0].data.ptr, a.dtype
        )
        if is_fp8(w) and not done
        else None
        for w, a, a8, done in ((w1, x_rows, x8, fused[0]), (w2, act, act8, fused[1]))
    )
    gemms = (
        _gemm(res, shape, w1, x_rows, x8, pairs, shape.width, shape.hidden, base, 0),
        _gemm(res, shape, w2, act, act8, pairs, shape.hidden, shape.inter, base, 1),
    )
    prep.slots = (7,)  # ids
    activation = (K.expert_activation_fp8 if fused[1] else K.expert_activation)(
        prep, arch, h, shape.inter, int(shape.gated), K.ACTIVATIONS[shape.activation], b1,
        row_to_pair, ids, act8 if fused[1] else act, shape.gate_up_block,
    )  # fmt: skip
    prep.slots = (3, 4, 8)  # weights, ids, out
    combine = K.combine_rows(prep, arch, y, pair_to_row, weights, ids, b2, tokens, k, out)
    outs = (h.data.ptr, y.data.ptr)
    return FP8StepLaunches(placement, quantize, gemms, activation, combine, outs, overlap=overlapped(pairs))


def _gemm(res, shape, w, a, a8, pairs: int, n: int, k: int, base: int, counter: int):
    """One expert GEMM of the step, prepared (slot: its output): the FP8
    kernel on the e4m3 rows ``a8`` for FP8 weights, the 16-bit kernel on
    ``a`` for 16-bit ones, both over the schedule at ``base`` taking tiles
    from tile counter ``counter`` (the placement's offsets launch zeroed both)."""
    if is_fp8(w):
        return hopper_fp8.prepared_fp8_gemm(
            res.device_id, w, pairs, (a8[0].data.ptr, a8[1].data.ptr), base, counter
        )
    problem = (shape.num_experts, pairs, n, k, shape.trans_b, shape.dtype)
    tile_bound = hopper.max_tiles(pairs, shape.num_experts)
    return hopper.prepared_gemm(
        res.device_id, problem, (a.data.ptr, w.data.ptr), base, tile_bound, counter=counter
    )
