"""The benchmark's runner: the methods of each case, set up on the GPU and timed.

Per case: the first expert GEMM (every algorithm, AUTO, a dense GEMM of the
same FLOPs, ``torch._grouped_mm``), then the whole layer (every algorithm,
AUTO, the fused layer, a torch eager block and, for decode, the
fixed-capacity path), each section's methods set up side by side and timed
together (:mod:`.section`); then the routing kernel, the stage splits of
AUTO and the fused layer, and the sync-free layer replayed from CUDA graphs
(:mod:`.fused_layer`), each timed on its own. Every failure of one (case,
method) is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial

import numpy as np

from ...moe.checks import check_layer_args, check_tokens, executor_or_shared
from ...moe.dispatch import choose_algorithms
from ...moe.step_backend import fixed_capacity_backend
from ...runtime.timing import L2_BYTES, rotation_count
from .fp8 import FP8_METHOD, FP8_ROWS_METHOD, gemm1_fp8, gemm1_fp8_rows
from .fused_layer import (
    FIXED_CAPACITY,
    FUSED_GRAPH_SETUP,
    FUSED_METHOD,
    TORCH_BLOCK_METHOD,
    fixed_capacity_graph,
    fused_graph,
    fused_unavailable,
    layer_fused,
    layer_torch_block,
)
from .gpu import WeightCache, describe_error, free_pool, hold_stream, random_normal, torch_on_cupy_stream
from .report import Result, merge_passes
from .section import SectionRunner, Timed
from .split import SPLIT_HOLD_MS, time_split
from .workloads import (
    ALGORITHMS,
    KERNEL_ALGORITHMS,
    Case,
    case_seed,
    expert_counts,
    gemm1_flops,
    gemm1_weight_bytes,
    kernel_unavailable,
    layer_flops,
    layer_weight_bytes,
    layout_rows,
    make_routing,
)

__all__ = ["load_api", "CaseRunner", "run_all", "FIXED_CAPACITY", "ROUTE_HOLD_MS_PER_CALL"]

# The route row's hold grows with the timed calls: about a host route() call
# each (tens of microseconds on the GPU machines), so that all are queued
# before the hold ends.
ROUTE_HOLD_MS_PER_CALL = 0.1


def load_api() -> types.SimpleNamespace:
    """The library entry points the benchmark needs (an ``ImportError`` naming any that are missing)."""
    import cublas_grouped as cg

    names = (
        "Algorithm",
        "route",
        "prepare_input",
        "expert_gemm",
        "moe_forward",
        "StageTimer",
        "FixedCapacityMoE",
        "device_info",
        "gmm",
    )
    missing = [n for n in names if n not in cg.__all__]
    if missing:
        raise ImportError(f"cublas_grouped lacks {', '.join(missing)}")
    return types.SimpleNamespace(**{n: getattr(cg, n) for n in names})


class CaseRunner(SectionRunner):
    """Runs every method of one case on the GPU, turning each failure into a recorded error."""

    def __init__(self, case: Case, args: argparse.Namespace, api, weights: WeightCache):
        import cupy

        super().__init__(case, args, weights)
        self.cp = cupy
        self.api = api
        self.topk_weights_host, self.topk_ids_host = make_routing(case, args.seed, args.sigma)
        self.counts = expert_counts(self.topk_ids_host, case.experts)
        self.active = int(np.count_nonzero(self.counts))
        self.ids = cupy.asarray(self.topk_ids_host)
        self.wts = cupy.asarray(self.topk_weights_host)

    def _sets(self, per_set_bytes: int, weight_bytes: int) -> tuple[int, bool]:
        """Input sets to rotate, and whether the weights are copied per set too (only when small)."""
        sets = rotation_count(per_set_bytes, l2_bytes=L2_BYTES, budget_bytes=1 << 30)
        copy_weights = sets > 1 and weight_bytes * (sets - 1) <= (1 << 30)
        return sets, copy_weights

    def _inputs(self, sets: int):
        c = self.case
        return [
            random_normal((c.tokens, c.hidden), c.dtype, 1.0, case_seed(c.name, self.args.seed + s))
            for s in range(sets)
        ]

    def _check(self, inp, w, out) -> str | None:
        """Compare one expert's first rows with a float32 product; a note when it disagrees."""
        cp = self.cp
        try:
            counts = np.asarray(inp.counts_host)
            e = int(np.argmax(counts))
            m = int(min(counts[e], 64))
            if m == 0:
                return None
            start = int(inp.layout.offsets(counts)[e])
            a = inp.rows[start : start + m].astype(cp.float32)
            ref = a @ w[e].astype(cp.float32)
            got = out[start : start + m].astype(cp.float32)
            err = float(cp.linalg.norm(got - ref) / max(float(cp.linalg.norm(ref)), 1e-30))
        except Exception as exc:
            return f"unchecked ({describe_error(exc)})"
        tol = 1e-4 if self.case.dtype == "float32" else 3e-2
        return None if err <= tol else f"CHECK FAILED rel.err {err:.2g}"

    def cannot_run(self, method: str) -> str | None:
        """Why ``method`` (one of KERNEL_ALGORITHMS: the sm90 kernel) cannot run on this
        GPU and dtype, as a "skipped" error; None when it can."""
        return kernel_unavailable(method, tuple(self.api.device_info().sm), self.case.dtype)

    # -- first GEMM ----------------------------------------------------------------------------------------
    def run_gemm1(self) -> None:
        """The first expert GEMM: every algorithm, AUTO, a dense GEMM and torch, timed together."""
        c = self.case
        w1 = self.weights.get(c, "w1")
        per_set = (c.tokens * c.hidden + c.pairs * (c.hidden + c.n1)) * c.itemsize
        sets, copy_w = self._sets(per_set + gemm1_weight_bytes(c, self.active), w1.nbytes)
        xs = self._inputs(sets)
        w1s = [w1] + [w1.copy() for _ in range(sets - 1)] if copy_w else [w1]
        note = None if sets == 1 or copy_w else "weights not rotated"
        flops, nbytes = gemm1_flops(c), gemm1_weight_bytes(c, self.active)
        setups = [
            (m, lambda m=m: self._gemm1_algorithm(m, xs, w1s, flops, nbytes, note))
            for m in ALGORITHMS + KERNEL_ALGORITHMS + ("auto",)
        ]
        # The dense GEMM reads one [H, N1] matrix, not every active expert's.
        dense_bytes = c.hidden * c.n1 * c.itemsize
        setups.append(("dense", lambda: self._gemm1_dense(sets, w1, flops, dense_bytes)))
        if not self.args.no_torch:
            setups.append(("torch", lambda: self._gemm1_torch(xs, w1, flops, nbytes)))
        if getattr(self.args, "fp8", False):  # FP8 weights on the FP8 kernel (.fp8)
            setups.append((FP8_METHOD, lambda: gemm1_fp8(self, xs, w1, flops, note)))
            setups.append((FP8_ROWS_METHOD, lambda: gemm1_fp8_rows(self, xs, w1, flops, note)))
        held = sum(x.nbytes for x in xs) + sum(w.nbytes for w in w1s[1:])
        try:
            # w2 and the packed w1 are not needed here: the layer section makes them again if dropped.
            self.run_section("gemm1", setups, held=held, spare=("w2", "w1_packed"))
        finally:
            _free_torch_cache()

    def _gemm1_algorithm(self, method, xs, w1s, flops, nbytes, note) -> Timed | Result:
        c = self.case
        if method in KERNEL_ALGORITHMS and (why := self.cannot_run(method)):
            return self.result("gemm1", method, error=why)
        if method != "auto":
            skip = self.fits(layout_rows(method, self.counts) * (c.hidden + c.n1) * c.itemsize * len(xs))
            if skip:
                return self.result("gemm1", method, error=skip)
        inps = [
            self.api.prepare_input(x, (self.wts, self.ids), c.experts, algorithm=method, gemm_n=c.n1)
            for x in xs
        ]
        outs = [self.cp.empty((inp.rows.shape[0], c.n1), dtype=inp.rows.dtype) for inp in inps]
        fn = lambda i: self.api.expert_gemm(inps[i], w1s[i % len(w1s)], out=outs[i])
        fn(0)
        check = self._check(inps[0], w1s[0], outs[0])
        chosen = getattr(inps[0].algorithm, "value", str(inps[0].algorithm))
        fell_back = f"ran {chosen}" if method != "auto" and chosen != method else None
        notes = "; ".join(n for n in (note, fell_back, check) if n) or None
        rows = int(inps[0].rows.shape[0])
        finish = lambda t: self.measured(
            "gemm1", method, t, flops, nbytes, algorithm=chosen, note=notes, extra={"rows": rows}
        )
        held = sum(inp.rows.nbytes + out.nbytes for inp, out in zip(inps, outs))
        return Timed(method, fn, len(inps), finish, held)

    def _gemm1_dense(self, sets, w1, flops, nbytes) -> Timed | Result:
        cp, c = self.cp, self.case
        skip = self.fits(c.pairs * (c.hidden + c.n1) * c.itemsize * sets)
        if skip:
            return self.result("gemm1", "dense", error=skip)
        a = [
            random_normal((c.pairs, c.hidden), c.dtype, 1.0, case_seed(c.name, 1000 + s)) for s in range(sets)
        ]
        b = w1[0]
        outs = [cp.empty((c.pairs, c.n1), dtype=a[0].dtype) for _ in range(sets)]
        note = "cupy.matmul"
        fn = lambda i: cp.matmul(a[i], b, out=outs[i])
        try:
            fn(0)
        except Exception as exc:
            # Once, at setup: a CuPy without bf16 matmul still gets a dense ceiling, one cublasGemmEx.
            sizes = np.array([c.pairs], dtype=np.int64)
            b3 = w1[:1]
            fn = lambda i: self.api.gmm(a[i], b3, sizes, out=outs[i], algorithm="sequential")
            fn(0)
            note = f"one cublasGemmEx (cupy.matmul: {describe_error(exc)})"
        finish = lambda t: self.measured("gemm1", "dense", t, flops, nbytes, note=note)
        return Timed("dense", fn, sets, finish, sum(x.nbytes for x in a + outs))

    def _gemm1_torch(self, xs, w1, flops, nbytes) -> Timed | Result:
        cp, c = self.cp, self.case
        try:
            import torch
        except Exception as exc:
            return self.result("gemm1", "torch", error=f"n/a: torch not importable ({describe_error(exc)})")
        if not hasattr(torch, "_grouped_mm"):
            return self.result("gemm1", "torch", error=f"n/a: torch {torch.__version__} has no _grouped_mm")
        skip = self.fits(c.pairs * (c.hidden + c.n1) * c.itemsize * len(xs))
        if skip:
            return self.result("gemm1", "torch", error=skip)
        inps = [
            self.api.prepare_input(
                x, (self.wts, self.ids), c.experts, algorithm="cublas_grouped", gemm_n=c.n1
            )
            for x in xs
        ]
        if inps[0].rows.shape[0] != c.pairs:
            return self.result(
                "gemm1", "torch", error="n/a: prepare_input gave padded rows, torch needs them packed"
            )
        offs = torch.from_dlpack(cp.asarray(np.cumsum(self.counts).astype(np.int32)))
        mats = [torch.from_dlpack(inp.rows) for inp in inps]
        b = torch.from_dlpack(w1)
        held = sum(inp.rows.nbytes for inp in inps) + c.pairs * c.n1 * c.itemsize * len(xs)
        note = "row-major w1"
        on_stream = torch_on_cupy_stream(torch, cp)
        with on_stream():
            try:
                out0 = torch._grouped_mm(mats[0], b, offs=offs)
            except Exception as first:
                skip = self.fits(w1.nbytes)
                if skip:
                    return self.result(
                        "gemm1", "torch", error=f"n/a: {describe_error(first)}; column-major copy {skip}"
                    )
                # Once, at setup: some builds want mat_b column-major in its last two dims.
                b = b.transpose(-2, -1).contiguous().transpose(-2, -1)
                held += w1.nbytes
                try:
                    out0 = torch._grouped_mm(mats[0], b, offs=offs)
                except Exception as second:
                    return self.result("gemm1", "torch", error=f"n/a: {describe_error(second)}")
                note = f"column-major w1 copy (row-major: {describe_error(first)})"
            note += self._cross_check(inps[0], w1, out0)
            del out0

        def fn(i: int) -> None:
            with on_stream():
                torch._grouped_mm(mats[i], b, offs=offs)

        note = f"torch {torch.__version__}, {note}"
        finish = lambda t: self.measured("gemm1", "torch", t, flops, nbytes, note=note)
        return Timed("torch", fn, len(mats), finish, held)

    def _cross_check(self, inp, w1, torch_out) -> str:
        """torch and cublas_grouped multiply the same packed rows: their results must agree."""
        cp = self.cp
        try:
            ours = self.api.expert_gemm(inp, w1).astype(cp.float32)
            theirs = cp.from_dlpack(torch_out.detach()).astype(cp.float32)
            err = float(cp.linalg.norm(theirs - ours) / max(float(cp.linalg.norm(ours)), 1e-30))
        except Exception as exc:
            return f"; unchecked ({describe_error(exc)})"
        return f"; CHECK FAILED vs cublas_grouped: rel.err {err:.2g}" if err > 3e-2 else ""

    # -- whole layer ---------------------------------------------------------------------------------------
    def run_layer(self) -> None:
        """The whole layer per algorithm, AUTO and (decode) fixed capacity, timed together;
        then the routing kernel, AUTO's stage split and the fixed-capacity graph."""
        c = self.case
        w1 = self.weights.get(c, "w1")
        w2 = self.weights.get(c, "w2")
        nbytes = layer_weight_bytes(c, self.active)
        per_set = (2 * c.tokens * c.hidden + c.pairs * (2 * c.hidden + c.n1 + c.inter)) * c.itemsize
        sets, copy_w = self._sets(per_set + nbytes, w1.nbytes + w2.nbytes)
        xs = self._inputs(sets)
        w1s = [w1] + [w1.copy() for _ in range(sets - 1)] if copy_w else [w1]
        w2s = [w2] + [w2.copy() for _ in range(sets - 1)] if copy_w else [w2]
        note = None if sets == 1 or copy_w else "weights not rotated"
        methods = (
            ALGORITHMS + KERNEL_ALGORITHMS + ("auto",) + ((FIXED_CAPACITY,) if c.phase == "decode" else ())
        )
        setups = [(m, lambda m=m: self._layer(m, xs, w1s, w2s, nbytes, note)) for m in methods]
        packed = []  # w1 packed for GEMM 1's gated epilogue (.fused_layer), made by the fused row

        def fused() -> Timed | Result:
            why = fused_unavailable(self) or (
                None if self.weights.holds("w1_packed") else self.fits(w1.nbytes)
            )
            if why:
                return self.result("layer", FUSED_METHOD, error=why)
            packed.append(self.weights.get(c, "w1_packed"))
            return layer_fused(self, xs, w1, packed[0], w2s, nbytes, note)

        setups.append((FUSED_METHOD, fused))
        if c.phase == "prefill" and fused_unavailable(self) is None:
            # After the fused row's setup (which packs w1), timed round-robin with the eager layers.
            def graph() -> Timed | Result:
                if not packed:
                    return self.result("graph", FUSED_METHOD, error="skipped: the packed w1 did not fit")
                return fused_graph(self, xs, packed[0], w2, nbytes)

            setups.append((FUSED_GRAPH_SETUP, graph))
        if not self.args.no_torch:
            setups.append((TORCH_BLOCK_METHOD, lambda: layer_torch_block(self, xs, w1, w2, nbytes, note)))
        held = sum(x.nbytes for x in xs) + sum(w.nbytes for w in w1s[1:] + w2s[1:])
        try:
            self.run_section("layer", setups, held=held)
        finally:
            _free_torch_cache()
        route_ms: list[float | None] = [None]

        def route() -> Result:
            r = self._route(sets)
            route_ms[0] = r.ms
            return r

        self.guarded("route", "route", route)
        self.guarded("split", "auto", lambda: time_split(self, xs, w1s, w2s, route_ms[0]))
        if c.phase == "decode":
            self.guarded("graph", FIXED_CAPACITY, lambda: fixed_capacity_graph(self, xs, w1, w2, nbytes))
        if packed:  # the fused layer's split, then (decode) its FixedCapacityMoE graph
            self.guarded(
                "split", FUSED_METHOD, lambda: time_split(self, xs, packed, w2s, route_ms[0], FUSED_METHOD)
            )
            if c.phase == "decode":
                graph = partial(fixed_capacity_graph, method=FUSED_METHOD)
                self.guarded("graph", FUSED_METHOD, lambda: graph(self, xs, packed[0], w2, nbytes))

    def _layer(self, method, xs, w1s, w2s, nbytes, note) -> Timed | Result:
        c = self.case
        if method in KERNEL_ALGORITHMS and (why := self.cannot_run(method)):
            return self.result("layer", method, error=why)
        if method not in ("auto", FIXED_CAPACITY):
            rows = layout_rows(method, self.counts)
            skip = self.fits(rows * (2 * c.hidden + c.n1 + c.inter) * c.itemsize * len(xs))
            if skip:
                return self.result("layer", method, error=skip)
        fwd = self.api.moe_forward
        if method == FIXED_CAPACITY:  # moe_forward's no-host-copy decode path (eager, not captured)
            kw = {"fixed_capacity": True}
        else:
            kw = {"algorithm": method}
        fn = lambda i: fwd(xs[i], self.ids, self.wts, w1s[i % len(w1s)], w2s[i % len(w2s)], **kw)
        chosen = self._auto_label(xs[0], w1s[0], w2s[0]) if method == "auto" else None
        finish = lambda t: self.measured(
            "layer", method, t, layer_flops(c), nbytes, algorithm=chosen, note=note
        )
        # moe_forward's buffers live for one call: the pool hands them to the next method's call.
        return Timed(method, fn, len(xs), finish, 0)

    def _auto_label(self, x, w1, w2) -> str | None:
        """What AUTO's layer runs (a label only: the time stands): on SM 9.0 where
        our kernel takes the layer, its sync-free step ("sm90_grouped step"); else
        the cuBLAS pair AUTO chooses after its one sync ("x" or "x+y")."""
        c = self.case
        try:
            executor = executor_or_shared(None)
            sm = executor.info_for(self.cp.cuda.Device().id).sm
            shape = check_layer_args(
                check_tokens(x), self.ids, self.wts, w1, w2, None, None, "silu", c.gated, False
            )
            if fixed_capacity_backend(sm, executor, shape, w1, w2, c.tokens) == "sm90_grouped":
                return "sm90_grouped step"
            counts = np.asarray(self.counts, np.int64)
            pair = choose_algorithms(executor, "auto", counts, c.n1, c.hidden, c.dtype, (c.hidden, c.inter))
            return "+".join(dict.fromkeys(a.value for a in pair))
        except Exception:
            return None

    def _route(self, sets: int) -> Result:
        c = self.case
        logits = [
            random_normal((c.tokens, c.experts), "float32", 1.0, case_seed(c.name, 2000 + s))
            for s in range(sets)
        ]
        # Behind a hold, as the split's other stages are timed (.split): the
        # routing kernel's GPU time, not the pace at which the host calls route().
        hold = lambda: hold_stream(SPLIT_HOLD_MS + ROUTE_HOLD_MS_PER_CALL * self.args.repeat)  # noqa: E731
        t = self.time_one(lambda i: self.api.route(logits[i], c.top_k), sets, hold=hold)
        return self.measured("route", "route", t, None, None)


def _free_torch_cache() -> None:
    """Hand back what torch's own caching allocator holds (the torch rows'
    outputs and copies), so the next sections get the memory."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.cuda.empty_cache()


def _case_error(case: Case, section: str, message: str) -> Result:
    """A whole section of a case that could not run, and why."""
    return Result(case.name, case.model, case.tokens, case.routing, case.phase, section, "all", error=message)


def _routing_stats(runner: CaseRunner) -> dict:
    counts = runner.counts
    mean = counts.sum() / len(counts)
    return {
        "active_experts": runner.active,
        "max_rows": int(counts.max()),
        "mean_rows": float(mean),
        "max_over_mean": float(counts.max() / mean) if mean else 0.0,
    }


def run_all(cases: Sequence[Case], args: argparse.Namespace, api) -> tuple[list[Result], list[dict]]:
    """Run every case; one progress line per case on stderr. Returns the results and case stats."""
    results: list[Result] = []
    stats: list[dict] = []
    weights = WeightCache(args.seed)
    start = time.monotonic()
    limit_s = args.max_minutes * 60 if args.max_minutes and args.max_minutes > 0 else math.inf
    for index, case in enumerate(cases, 1):
        if time.monotonic() - start > limit_s:
            results.append(_case_error(case, "gemm1", f"skipped: --max-minutes {args.max_minutes:g} reached"))
            continue
        t0 = time.monotonic()
        try:
            runner = CaseRunner(case, args, api, weights)
        except Exception as exc:
            results.append(_case_error(case, "gemm1", f"setup: {describe_error(exc)}"))
            weights.clear()
            continue
        st = _routing_stats(runner)
        stats.append({**asdict(case), "name": case.name, **st})
        print(
            f"[{index}/{len(cases)}] {case.name}: E={case.experts} k={case.top_k} H={case.hidden} "
            f"I={case.inter} {case.dtype}, {st['active_experts']} active, busiest {st['max_rows']} rows "
            f"= {st['max_over_mean']:.1f}x mean ...",
            file=sys.stderr,
            end="",
            flush=True,
        )
        sections = [("gemm1", runner.run_gemm1), ("layer", runner.run_layer)]
        for index_pass, (section, body) in ((p, sec) for p in range(args.passes) for sec in sections):
            if section == "layer" and args.no_layer:
                continue
            runner.reverse = index_pass % 2 == 1
            try:
                body()
            except Exception as exc:  # setup of the section itself (weights, inputs)
                runner.results.append(_case_error(case, section, f"setup: {describe_error(exc)}"))
                weights.clear()
        errors = sum(1 for r in runner.results if r.error and not r.error.startswith(("skipped", "n/a")))
        print(
            f" {time.monotonic() - t0:.1f}s" + (f", {errors} errors" if errors else ""),
            file=sys.stderr,
            flush=True,
        )
        results.extend(merge_passes(runner.results))
        del runner
        free_pool()
    weights.clear()
    return results, stats
