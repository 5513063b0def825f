"""The benchmark's FP8 row of the first GEMM (``--fp8``): the same routed rows
through ``gmm`` with FP8 weights on our FP8 Hopper kernel, beside the 16-bit
methods of the same case.

What it times: ``gmm(rows, w1_fp8, counts, trans_b=True)`` on the case's
rows in SM90_GROUPED's layout, where ``w1_fp8`` is the case's ``w1``
transposed to the checkpoint layout ``[E, N1, H]`` and quantized with one
scale per 128 x 128 block (made once per case, outside the timing). Each call
includes quantizing the rows to e4m3 (one scale per row per 128 columns, on
the device): what a caller of ``gmm`` with bf16 activations pays. TFLOP/s
count the same useful FLOPs as the 16-bit rows; decode GB/s count the active
experts' FP8 bytes (values and scales). bfloat16 cases on SM 9.0 only; the
others record why not.

The ``fp8-rows`` row (:func:`gemm1_fp8_rows`) times the FP8 kernel alone on
the same rows quantized once beforehand: what the FP8 layer's first GEMM
runs, whose gather writes e4m3 rows and their scales, so that no call
quantizes them again. Both rows are printed; neither stands for the other.
"""

from __future__ import annotations

from .gpu import describe_error
from .section import Timed
from .workloads import kernel_unavailable

__all__ = ["FP8_METHOD", "FP8_ROWS_METHOD", "FP8_TOLERANCE", "gemm1_fp8", "gemm1_fp8_rows"]

FP8_METHOD = "fp8"
FP8_ROWS_METHOD = "fp8-rows"
# Against the float32 product of the unquantized bf16 rows and weights: e4m3
# rounds both operands (3 mantissa bits: ~2-4% relative on a product).
FP8_TOLERANCE = 0.08
# Experts transposed and quantized at a time (DeepSeek-V3's bf16 w1 is 15 GB:
# a whole transposed copy would not fit beside it).
EXPERTS_PER_CHUNK = 8


def _quantized_w1(cg, cp, w1):
    """``w1`` [E, H, N1] as block128 FP8 weights in the [E, N1, H] layout."""
    e, h, n = w1.shape
    values = cp.empty((e, n, h), dtype=cp.uint8)
    scales = cp.empty((e, -(-n // 128), -(-h // 128)), dtype=cp.float32)
    for e0 in range(0, e, EXPERTS_PER_CHUNK):
        e1 = min(e0 + EXPERTS_PER_CHUNK, e)
        part = cg.quantize_fp8(cp.ascontiguousarray(w1[e0:e1].transpose(0, 2, 1)), trans_b=True)
        values[e0:e1], scales[e0:e1] = part.values, part.scales
    return cg.FP8ExpertWeights(values, scales, "block128", True, w1.nbytes)


def gemm1_fp8(runner, xs, w1, flops: int, note: str | None, quantized: bool = False) -> Timed | object:
    """Set up the FP8 row of ``runner``'s case (a :class:`Timed`), or the
    :class:`Result` that says why it does not run. ``quantized``: the
    ``fp8-rows`` row instead (:func:`gemm1_fp8_rows`)."""
    method = FP8_ROWS_METHOD if quantized else FP8_METHOD
    c = runner.case
    why = kernel_unavailable(FP8_METHOD, tuple(runner.api.device_info().sm), c.dtype)
    if why is None and c.dtype != "bfloat16":
        why = f"skipped: {FP8_METHOD} takes bfloat16 activations, not {c.dtype}"
    if why:
        return runner.result("gemm1", method, error=why)
    # bf16 rows and outputs per set, and (fp8-rows) the rows' e4m3 codes too.
    per_pair = (2 + int(quantized)) * c.hidden + 2 * c.n1
    skip = runner.fits(c.experts * c.hidden * c.n1 + len(xs) * c.pairs * per_pair)
    if skip:
        return runner.result("gemm1", method, error=skip)
    try:
        import cublas_grouped as cg

        cp = runner.cp
        wq = _quantized_w1(cg, cp, w1)
        inps = [
            runner.api.prepare_input(
                x, (runner.wts, runner.ids), c.experts, algorithm="sm90_grouped", gemm_n=c.n1
            )
            for x in xs
        ]
        outs = [cp.empty((inp.rows.shape[0], c.n1), dtype=inp.rows.dtype) for inp in inps]
        if quantized:
            # The call the FP8 layer's step makes (prepared launches: the
            # schedule's offsets kernel, then the GEMM), so that decode sizes
            # time the GPU's work, not the checks of an unprepared call.
            from ...gemm.backends.hopper_fp8 import grouped_rows_fp8
            from ...runtime.device import stream_resources

            rows_q = [cg.quantize_rows_fp8(inp.rows) for inp in inps]
            res = stream_resources(cp.cuda.Device().id, None)

            def fn(i: int) -> None:
                (a_q, a_s), m = rows_q[i], rows_q[i][0].shape[0]
                ptrs = (a_q.data.ptr, a_s.data.ptr, outs[i].data.ptr)
                grouped_rows_fp8(res, wq, m, ptrs, inps[i].tokens_per_expert)

        else:

            def fn(i: int) -> None:
                runner.api.gmm(inps[i].rows, wq, inps[i].tokens_per_expert, trans_b=True, out=outs[i])

        fn(0)
        check = _check(cp, inps[0], w1, outs[0])
    except Exception as exc:
        return runner.result("gemm1", method, error=f"setup: {describe_error(exc)}")
    active = int((runner.counts > 0).sum())
    fp8_bytes = active * (wq.nbytes // c.experts)
    how = "rows quantized beforehand" if quantized else "x quantized per call"
    notes = "; ".join(n for n in (note, how, check) if n)
    finish = lambda t: runner.measured("gemm1", method, t, flops, fp8_bytes, algorithm="sm90_fp8", note=notes)
    held = wq.nbytes + sum(inp.rows.nbytes + out.nbytes for inp, out in zip(inps, outs))
    if quantized:
        held += sum(q.nbytes + s.nbytes for q, s in rows_q)
    return Timed(method, fn, len(inps), finish, held)


def gemm1_fp8_rows(runner, xs, w1, flops: int, note: str | None) -> Timed | object:
    """The ``fp8-rows`` row: the FP8 kernel on the case's rows quantized once
    beforehand (e4m3 codes and one scale per row per 128 columns, as the FP8
    layer's gather writes them), so each timed call is the kernel alone."""
    return gemm1_fp8(runner, xs, w1, flops, note, quantized=True)


def _check(cp, inp, w1, out) -> str:
    """The busiest expert's first rows against float32 of the unquantized
    operands: a note with the relative error (CHECK FAILED past the tolerance)."""
    counts = inp.counts_host
    e = int(counts.argmax())
    m = int(min(counts[e], 64))
    start = int(inp.layout.offsets(counts)[e])
    ref = inp.rows[start : start + m].astype(cp.float32) @ w1[e].astype(cp.float32)
    got = out[start : start + m].astype(cp.float32)
    err = float(cp.linalg.norm(got - ref) / max(float(cp.linalg.norm(ref)), 1e-30))
    label = "rel.err" if err <= FP8_TOLERANCE else "CHECK FAILED rel.err"
    return f"{label} {err:.2g} vs bf16 operands"
