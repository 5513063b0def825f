"""The benchmark's rows of the sync-free layer (fused at prefill, the
fixed-capacity step at decode) and the torch block they are compared with.

- ``fused`` (layer section, SM 9.0): ``moe_forward`` as a user calls it by
  default, with ``w1`` packed by :func:`cublas_grouped.pack_gate_up`
  (``w1_layout="gate_up_blocked"``), so that the activation runs in GEMM
  1's epilogue and the [rows, 2I] product is never stored. Eager: nothing in
  the call waits for the GPU (since 2026-11-27; before, each call waited for
  its count of ids outside [0, E), and its time held the host's next call). Its stage split is a "split" row of the
  same name, and at prefill a "graph" row times the same layer with
  ``fixed_capacity=True`` replayed from CUDA graphs (GPU time only, nothing
  copied to the host), round-robin with the layer section's methods.
- ``torch-block`` (layer section, every GPU torch runs on): the same math as
  a torch user writes it in eager mode, on the same rows and weights: sort
  the (token, expert) pairs by expert, gather the rows, ``torch._grouped_mm``,
  SiLU(gate) * up, ``torch._grouped_mm``, then each token's k rows weighted
  and summed in a fixed order (no atomics, like ours). The sort and the group
  offsets run on the GPU without a host copy. Its output is checked against
  ``moe_forward``'s.
- ``fixed-capacity`` graph (decode): the :class:`FixedCapacityMoE` step
  replayed from CUDA graphs, beside its weight-bandwidth floor; at decode the
  ``fused`` graph row is the same step with ``w1`` packed.

All count the layer's useful FLOPs. The packed ``w1`` is made once per model
(:func:`.gpu.packed_w1`, kept beside ``w1``: 2 bytes x E x H x 2I more on the GPU).
"""

from __future__ import annotations

from .gpu import describe_error, torch_on_cupy_stream
from .section import Timed
from .workloads import kernel_unavailable, layer_flops

__all__ = [
    "FIXED_CAPACITY",
    "FUSED_METHOD",
    "FUSED_GRAPH_SETUP",
    "TORCH_BLOCK_METHOD",
    "CHECK_TOLERANCE",
    "fused_unavailable",
    "layer_fused",
    "layer_torch_block",
    "fused_graph",
    "fixed_capacity_graph",
]

# The method label of the fixed-capacity layer: eager in the layer section, a CUDA graph in "graph".
FIXED_CAPACITY = "fixed-capacity"
FUSED_METHOD = "fused"
# The layer section's name for the prefill graph of the fused layer (its row: "graph", FUSED_METHOD).
FUSED_GRAPH_SETUP = "fused-graph"
TORCH_BLOCK_METHOD = "torch-block"
# The torch block and the fused layer against moe_forward: bf16 with fp32
# accumulation, each with its own rounding points (torch rounds the weighted
# rows before their sum; the fused epilogue rounds act, not h).
CHECK_TOLERANCE = 3e-2


def fused_unavailable(runner) -> str | None:
    """Why the fused rows do not run for ``runner``'s case ("skipped: ..."), or None."""
    c = runner.case
    why = kernel_unavailable(FUSED_METHOD, tuple(runner.api.device_info().sm), c.dtype)
    if why is None and not (c.gated and c.inter % 128 == 0):
        why = f"skipped: {FUSED_METHOD} packs a gated w1 in blocks of 128 columns (I = {c.inter})"
    return why


def layer_fused(runner, xs, w1, w1p, w2s, nbytes: int, note: str | None) -> Timed:
    """The fused eager layer of ``runner``'s case, set up to be timed with the
    layer section (its first output checked against the unpacked layer's)."""
    c = runner.case
    fwd = runner.api.moe_forward
    fn = lambda i: fwd(  # noqa: E731
        xs[i], runner.ids, runner.wts, w1p, w2s[i % len(w2s)], w1_layout="gate_up_blocked"
    )
    check = _cross_check(runner, xs[0], w1, w2s[0], fn(0))
    notes = "; ".join(n for n in (note, check) if n)
    finish = lambda t: runner.measured(  # noqa: E731
        "layer", FUSED_METHOD, t, layer_flops(c), nbytes, algorithm="sm90_grouped", note=notes
    )
    return Timed(FUSED_METHOD, fn, len(xs), finish, 0)


def fixed_capacity_graph(runner, xs, w1, w2, nbytes: int, method: str = FIXED_CAPACITY):
    """Decode: the :class:`FixedCapacityMoE` step replayed from CUDA graphs,
    with its share of the weight-bandwidth floor (w1 + w2 of the active
    experts); ``method`` :data:`FUSED_METHOD`: ``w1`` packed (the activation in
    GEMM 1's epilogue)."""
    c = runner.case
    layout = "gate_up_blocked" if method == FUSED_METHOD else "gate_up"
    layer = runner.api.FixedCapacityMoE(
        w1, w2, c.top_k, c.tokens, gated=c.gated, activation="silu", w1_layout=layout
    )
    t = runner.time_graphs(lambda x: layer.forward(x, runner.ids, runner.wts), xs)
    floor_ms = nbytes / (runner.args.hbm_gbs * 1e9) * 1e3
    note = f"floor {floor_ms:.3f} ms = {100 * floor_ms / t['median']:.0f}% of it"
    r = runner.measured("graph", method, t, layer_flops(c), nbytes, note=note)
    r.extra.update(floor_ms=floor_ms, floor_ratio=floor_ms / t["median"])
    return r


def fused_graph(runner, xs, w1p, w2, nbytes: int) -> Timed:
    """The fused layer with ``fixed_capacity=True``, captured once per input set
    (prefill: what a server capturing its layers gets), its replays set up to
    be timed with the layer section, round-robin with the eager layers on the
    current stream. Timed alone after them (before 2026-11-27), the replays
    met a GPU at its power limit: an H200 held at 700 W under a back-to-back
    DeepSeek-V3 layer drops its SM clock from 1980 MHz to about 1400, and
    the same step took 6.5 ms cold and 7.5 ms hot, eager or replayed alike
    (docs/kernel-notes.md, "Power-limited clocks"). Its result is the graph
    section's row."""
    fwd = runner.api.moe_forward
    call = lambda x: fwd(  # noqa: E731
        x, runner.ids, runner.wts, w1p, w2, w1_layout="gate_up_blocked", fixed_capacity=True
    )
    graphs, _ = runner.capture_graphs(call, xs)
    cp = runner.cp
    fn = lambda i: graphs[i].launch(cp.cuda.get_current_stream())  # noqa: E731
    flops = layer_flops(runner.case)
    note = "fixed_capacity=True; timed with the layer section"
    finish = lambda t: runner.measured("graph", FUSED_METHOD, t, flops, nbytes, note=note)  # noqa: E731
    return Timed(FUSED_GRAPH_SETUP, fn, len(xs), finish, 0)


def torch_block(torch, x, ids, weights, w1, w2, bounds, inter: int):
    """One eager torch MoE block (the module docstring): x [T, H], ids [T, k]
    int32, weights [T, k] in x's dtype, w1 [E, H, 2I], w2 [E, I, H], bounds
    ``arange(1, E + 1)`` int32."""
    tokens, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.searchsorted(flat[order], bounds).to(torch.int32)  # each expert's end row
    rows = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    h = torch._grouped_mm(rows, w1, offs=offs)
    act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    y = torch._grouped_mm(act, w2, offs=offs)
    per_pair = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, choice) order
    return (per_pair.view(tokens, k, -1) * weights.unsqueeze(-1)).sum(dim=1)


def layer_torch_block(runner, xs, w1, w2, nbytes: int, note: str | None):
    """The torch block of ``runner``'s case (a :class:`Timed`), or the Result saying why not."""
    cp, c = runner.cp, runner.case
    try:
        import torch
    except Exception as exc:
        return runner.result(
            "layer", TORCH_BLOCK_METHOD, error=f"n/a: torch not importable ({describe_error(exc)})"
        )
    if not hasattr(torch, "_grouped_mm"):
        return runner.result(
            "layer", TORCH_BLOCK_METHOD, error=f"n/a: torch {torch.__version__} has no _grouped_mm"
        )
    if not c.gated:
        return runner.result(
            "layer", TORCH_BLOCK_METHOD, error="n/a: the torch block is written for gated layers"
        )
    # Live per call: gathered rows, h, act, y and its reordered copy.
    skip = runner.fits(c.pairs * (2 * c.hidden + c.n1 + c.inter + c.hidden) * c.itemsize)
    if skip:
        return runner.result("layer", TORCH_BLOCK_METHOD, error=skip)
    on_stream = torch_on_cupy_stream(torch, cp)
    tx = [torch.from_dlpack(x) for x in xs]
    ids = torch.from_dlpack(runner.ids)
    weights = torch.from_dlpack(runner.wts).to(tx[0].dtype)
    b1, b2 = torch.from_dlpack(w1), torch.from_dlpack(w2)
    bounds = torch.arange(1, c.experts + 1, dtype=ids.dtype, device=ids.device)
    with on_stream():
        try:
            out0 = torch_block(torch, tx[0], ids, weights, b1, b2, bounds, c.inter)
        except Exception as exc:
            return runner.result("layer", TORCH_BLOCK_METHOD, error=f"n/a: {describe_error(exc)}")
        check = _cross_check(runner, xs[0], w1, w2, cp.from_dlpack(out0.detach()))
        del out0

    def fn(i: int) -> None:
        with on_stream():
            torch_block(torch, tx[i], ids, weights, b1, b2, bounds, c.inter)

    notes = "; ".join(n for n in (note, f"torch {torch.__version__}", check) if n)
    finish = lambda t: runner.measured(  # noqa: E731
        "layer", TORCH_BLOCK_METHOD, t, layer_flops(c), nbytes, note=notes
    )
    return Timed(TORCH_BLOCK_METHOD, fn, len(xs), finish, 0)


def _cross_check(runner, x, w1, w2, theirs) -> str:
    """``theirs`` (the torch block's or the fused layer's output for ``x``) against
    ``moe_forward`` with the unpacked ``w1``: a note with the relative error
    (CHECK FAILED past :data:`CHECK_TOLERANCE`)."""
    cp = runner.cp
    try:
        ours = runner.api.moe_forward(x, runner.ids, runner.wts, w1, w2).astype(cp.float32)
        diff = theirs.astype(cp.float32) - ours
        err = float(cp.linalg.norm(diff) / max(float(cp.linalg.norm(ours)), 1e-30))
    except Exception as exc:
        return f"unchecked ({describe_error(exc)})"
    label = "rel.err" if err <= CHECK_TOLERANCE else "CHECK FAILED rel.err"
    return f"{label} {err:.2g} vs moe_forward"
