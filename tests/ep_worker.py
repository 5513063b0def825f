"""Worker of tests/test_distributed_gpu.py, started on every GPU by the launcher.

``python -m cublas_grouped.launch --nproc R tests/ep_worker.py MODE OUT_DIR``

MODE ``cases``: every case below on all ranks; each rank writes
``OUT_DIR/rank<r>.json`` with one record per case (errors against the
single-GPU layer and float64, bitwise repeatability, traffic against the
NumPy plan, the messages of the refused calls, and the same layer with
``overlap_chunks`` 2 and 3 against one chunk). MODE ``stall``: rank 1 joins
and then stops taking part; rank 0's layer call must end in a
``CollectiveTimeoutError`` within the group's timeout.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

import cublas_grouped as cg
from cublas_grouped.distributed import (
    ChunkPlan,
    CollectiveTimeoutError,
    ExpertParallelMoE,
    FixedCapacityExpertParallelMoE,
    dispatch_model,
    init_process_group,
    placement,
    send_layout,
    send_order,
)
from cublas_grouped.distributed.plan import chunk_layout
from cublas_grouped.moe.checks import executor_or_shared, layer_shape
from cublas_grouped.moe.kernel_step import fixed_capacity_backend
from cublas_grouped.testing import moe_forward_ref, rel_error

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

# name: dtype, tokens per rank (a tuple: one count per rank, cycled), routing, E, k, H, I
CASES = {
    "fp32 uniform prefill": ("float32", (384,), "uniform", 16, 4, 256, 128),
    "bf16 uniform prefill": ("bfloat16", (1024,), "uniform", 32, 8, 512, 256),
    "bf16 skewed prefill": ("bfloat16", (512, 300), "skewed", 32, 8, 512, 256),
    "bf16 decode": ("bfloat16", (4, 1), "uniform", 32, 8, 512, 256),
    "fp32 decode one token": ("float32", (1,), "skewed", 16, 2, 128, 64),
    "bf16 all to the last rank": ("bfloat16", (64, 17), "last_rank", 16, 2, 256, 128),
    "fp32 a rank with no tokens": ("float32", (0, 7, 33), "uniform", 8, 2, 128, 64),
}


def _routing(rng, tokens, experts, k, kind, world):
    if kind == "last_rank":  # only the last rank's experts: every other rank receives nothing
        pool = np.arange(experts - experts // world, experts)
        p = None
    else:
        pool = np.arange(experts)
        p = None if kind == "uniform" else np.exp(-np.arange(experts) / 3.0)
        p = None if p is None else p / p.sum()
    ids = np.array([rng.choice(pool, size=k, replace=False, p=p) for _ in range(tokens)], np.int32)
    w = rng.random((tokens, k)).astype(np.float32)
    return ids.reshape(tokens, k), w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)


def _data(name, world):
    """The whole problem (every rank's tokens, all experts), the same on every rank."""
    dtype_name, counts, kind, experts, k, hidden, inter = CASES[name]
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    w1 = (rng.standard_normal((experts, hidden, 2 * inter)) * hidden**-0.5).astype(np.float32).astype(dtype)
    w2 = (rng.standard_normal((experts, inter, hidden)) * inter**-0.5).astype(np.float32).astype(dtype)
    per_rank = []
    for r in range(world):
        tokens = counts[r % len(counts)]
        x = rng.standard_normal((tokens, hidden)).astype(np.float32).astype(dtype)
        per_rank.append((x, *_routing(rng, tokens, experts, k, kind, world)))
    return w1, w2, per_rank, experts, k


def _on_the_kernel(group, w1, w2, chunks: list[ChunkPlan], total_rows: int) -> bool:
    """Whether every local expert call of this rank (one chunk and each overlap chunk)
    runs on the Hopper kernel under AUTO, which computes each row from that row and
    the weights alone: there the overlapped layer must give the same bits."""
    if total_rows == 0:
        return False
    executor = executor_or_shared(None)
    sm = executor.info_for(group.device_id).sm
    shape = layer_shape(w1, w2, 1)
    rows = [total_rows] + [p.rows[1] - p.rows[0] for p in chunks]
    return all(fixed_capacity_backend(sm, executor, shape, w1, w2, n) == "sm90_grouped" for n in rows if n)


def overlap_case(group, name, x, ids, w, w1_local, w2_local, experts, k, base, ref, ids_all):
    """``overlap_chunks`` 2 and 3 against one chunk, on this rank's part of the case.

    bf16: AUTO, as ``base``; same bits required where every call runs on the kernel.
    fp32: algorithm="sequential" on both sides (one cuBLAS GEMM per expert with the
    same rows whatever the chunk), same bits required.
    """
    import cupy

    fp32 = x.dtype == np.float32
    algorithm = "sequential" if fp32 else "auto"
    if fp32:
        one = ExpertParallelMoE(group, w1_local, w2_local, experts, k, algorithm=algorithm)
        base = cupy.asnumpy(one(x, ids, w))
    rank, world = group.rank, group.world_size
    epr = experts // world
    counts = [np.bincount(a.reshape(-1), minlength=experts).reshape(world, epr) for a in ids_all]
    send, recv = counts[rank], np.stack([c[rank] for c in counts])
    results = {}
    for chunks in (2, 3):
        layer = ExpertParallelMoE(
            group, w1_local, w2_local, experts, k, algorithm=algorithm, overlap_chunks=chunks
        )
        a = cupy.asnumpy(layer(x, ids, w))
        b = cupy.asnumpy(layer(x, ids, w))
        cupy.cuda.get_current_stream().synchronize()
        plans = chunk_layout(send, recv, chunks)
        results[str(chunks)] = {
            "same_bits": a.tobytes() == base.tobytes(),
            "bitwise_repeat": a.tobytes() == b.tobytes(),
            "err_ref": float(rel_error(a.astype(np.float64), ref)) if ref.size else 0.0,
            "nan": int(np.isnan(a.astype(np.float64)).sum()),
            "bits_required": fp32 or _on_the_kernel(group, w1_local, w2_local, plans, int(recv.sum())),
            "chunks": len(plans),
            "sm": list(executor_or_shared(None).info_for(group.device_id).sm),
        }
    return results


def run_case(group, name):
    import cupy

    rank, world = group.rank, group.world_size
    w1, w2, per_rank, experts, k = _data(name, world)
    epr = experts // world
    x_h, ids_h, w_h = per_rank[rank]
    x, ids, w = cupy.asarray(x_h), cupy.asarray(ids_h), cupy.asarray(w_h)
    layer = ExpertParallelMoE(
        group,
        cupy.asarray(w1[rank * epr : (rank + 1) * epr]),
        cupy.asarray(w2[rank * epr : (rank + 1) * epr]),
        experts,
        k,
    )
    outs = []
    for _ in range(2):
        out = layer(x, ids, w)
        cupy.cuda.get_current_stream().synchronize()
        outs.append(cupy.asnumpy(out))
    if x_h.shape[0]:
        single = cupy.asnumpy(cg.moe_forward(x, ids, w, cupy.asarray(w1), cupy.asarray(w2)))
    else:
        single = np.zeros(x_h.shape, x_h.dtype)
    ref = moe_forward_ref(x_h.astype(np.float64), ids_h, w_h, w1.astype(np.float64), w2.astype(np.float64))
    model = dispatch_model([p[1] for p in per_rank], experts)[rank]
    got = outs[0].astype(np.float64)
    try:
        overlap = overlap_case(
            group, name, x, ids, w, layer.w1, layer.w2, experts, k, outs[0], ref, [p[1] for p in per_rank]
        )
    except Exception:
        overlap = {"exception": traceback.format_exc()}
    return {
        "overlap": overlap,
        "tokens": int(x_h.shape[0]),
        "shape_ok": outs[0].shape == ref.shape and outs[0].dtype == x_h.dtype,
        "nan": int(np.isnan(got).sum()),
        "err_single": float(rel_error(got, single.astype(np.float64))) if ref.size else 0.0,
        "err_single_ref": float(rel_error(single.astype(np.float64), ref)) if ref.size else 0.0,
        "err_ref": float(rel_error(got, ref)) if ref.size else 0.0,
        "bitwise_repeat": outs[0].tobytes() == outs[1].tobytes(),
        "equals_single_bitwise": outs[0].tobytes() == single.tobytes(),
        "sent_ok": layer.last_traffic["sent"].tolist() == model.send_rows.tolist(),
        "received_ok": layer.last_traffic["received"].tolist() == model.recv_counts.sum(axis=1).tolist(),
        "received": layer.last_traffic["received"].tolist(),
    }


def _refused(fn):
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def error_cases(group):
    import cupy

    rank, world = group.rank, group.world_size
    experts, k, hidden, inter = 4 * world, 2, 64, 32
    rng = np.random.default_rng(7)
    w1 = cupy.asarray(rng.standard_normal((4, hidden, 2 * inter), dtype=np.float32))
    w2 = cupy.asarray(rng.standard_normal((4, inter, hidden), dtype=np.float32))
    x = cupy.asarray(rng.standard_normal((6, hidden), dtype=np.float32))
    ids = cupy.asarray(np.arange(12, dtype=np.int32).reshape(6, 2) % experts)
    layer = ExpertParallelMoE(group, w1, w2, experts, k)
    bad_ids = ids.copy()
    if rank == world - 1:
        bad_ids[3, 1] = experts  # one id out of range on the last rank only
    results = {"bad id": _refused(lambda: layer(x, bad_ids, None))}
    # Layers that disagree across ranks (top_k on rank 0 only), each consistent locally.
    k_here = 1 if rank == 0 else k
    other = ExpertParallelMoE(group, w1, w2, experts, k_here)
    results["mismatched k"] = _refused(lambda: other(x, ids[:, :k_here].copy(), None))
    # A call refused locally on rank 0 only: the others must raise too, not wait.
    wrong_x = cupy.asarray(rng.standard_normal((6, hidden + (rank == 0)), dtype=np.float32))
    results["refused on rank 0"] = _refused(lambda: layer(wrong_x, ids, None))
    # The group still works after the refused calls.
    out = layer(x, ids, None)
    ref = cg.moe_forward(x, ids, None, w1, w2) if world == 1 else None
    results["usable after"] = bool(out.shape == (6, hidden) and not cupy.isnan(out).any())
    if ref is not None:
        results["usable after"] &= bool(cupy.allclose(out, ref))
    # Routing on the layer: router logits give the same as route() then ids.
    logits = cupy.asarray(rng.standard_normal((6, experts), dtype=np.float32))
    weights, top = cg.route(logits, k)
    a, b = layer(x, router_logits=logits), layer(x, top, weights)
    results["router logits"] = bool(cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes())
    return results


def fixed_cases(group):
    """The fixed-capacity layer: no overflow (against one GPU), then overflow (NaN exactly where the plan says)."""
    import cupy

    rank, world = group.rank, group.world_size
    results = {}
    for name, capacity_of in (
        ("bf16 decode", lambda t, k: t * k),
        ("bf16 all to the last rank", lambda t, k: t * k // 2 + 8),
    ):
        w1, w2, per_rank, experts, k = _data(name, world)
        epr = experts // world
        max_tokens = max(p[0].shape[0] for p in per_rank)
        capacity = capacity_of(max_tokens, k)
        x_h, ids_h, w_h = per_rank[rank]
        x, ids, w = cupy.asarray(x_h), cupy.asarray(ids_h), cupy.asarray(w_h)
        local = slice(rank * epr, (rank + 1) * epr)
        layer = FixedCapacityExpertParallelMoE(
            group,
            cupy.asarray(w1[local]),
            cupy.asarray(w2[local]),
            experts,
            k,
            capacity=capacity,
            max_tokens=max_tokens,
        )
        outs = [cupy.asnumpy(layer(x, ids, w)) for _ in range(2)]
        ref = moe_forward_ref(
            x_h.astype(np.float64), ids_h, w_h, w1.astype(np.float64), w2.astype(np.float64)
        )
        # The plan: which of this rank's pairs find no slot (position >= C within their destination's block).
        order = send_order(ids_h, experts)
        where = placement(experts, world)
        rows, offsets = send_layout(np.bincount(ids_h.reshape(-1), minlength=experts), where)
        over = [order[offsets[d] + capacity : offsets[d + 1]] for d in range(world)]
        over = np.concatenate(over) if over else np.zeros(0, np.int64)
        nan_tokens = sorted(set((over // k).tolist()))
        got = outs[0].astype(np.float64)
        keep = np.setdiff1d(np.arange(x_h.shape[0]), nan_tokens)
        results[name] = {
            "bitwise_repeat": outs[0].tobytes() == outs[1].tobytes(),
            "overflow": layer.overflow_pairs(),
            "overflow_expected": int(sum(max(int(r) - capacity, 0) for r in rows)) * 2,  # two calls
            "nan_rows": np.flatnonzero(np.isnan(got).any(axis=1)).tolist(),
            "nan_rows_expected": nan_tokens,
            "err_ref_kept": float(rel_error(got[keep], ref[keep])) if keep.size else 0.0,
        }
    try:
        results["graph"] = graph_case(group)
    except Exception:
        results["graph"] = {"exception": traceback.format_exc()}
    return results


def graph_case(group):
    """The fixed-capacity layer captured in a CUDA graph on every rank, replayed with new inputs."""
    import cupy

    rank, world = group.rank, group.world_size
    w1, w2, per_rank, experts, k = _data("bf16 decode", world)
    epr = experts // world
    local = slice(rank * epr, (rank + 1) * epr)
    x_h, ids_h, w_h = per_rank[rank]
    tokens = x_h.shape[0]
    capacity = max(p[0].shape[0] for p in per_rank) * k  # the same on every rank: never overflows
    stream = cupy.cuda.Stream(non_blocking=True)
    w1_local, w2_local = cupy.asarray(w1[local]), cupy.asarray(w2[local])
    # The weights' copies were queued on the null stream, which a non-blocking stream does not wait for.
    stream.wait_event(cupy.cuda.get_current_stream().record())
    layer = FixedCapacityExpertParallelMoE(
        group, w1_local, w2_local, experts, k, capacity=capacity, max_tokens=8
    )
    rng = np.random.default_rng(100 + rank)
    with stream:
        x, ids, w = cupy.asarray(x_h), cupy.asarray(ids_h), cupy.asarray(w_h)
        eager = layer(x, ids, w).copy()  # the eager call before capture
        stream.begin_capture()
        out = layer(x, ids, w)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        first = cupy.asnumpy(out)
        # New inputs, refilled in place (the token count stays: every rank keeps its own).
        x2 = rng.standard_normal(x_h.shape).astype(np.float32).astype(x_h.dtype)
        ids2 = np.array([rng.choice(experts, size=k, replace=False) for _ in range(tokens)], np.int32)
        ids2 = ids2.reshape(tokens, k)
        cupy.copyto(x, cupy.asarray(x2))
        cupy.copyto(ids, cupy.asarray(ids2))
        graph.launch(stream)
        stream.synchronize()
        replay = cupy.asnumpy(out)
        again = cupy.asnumpy(layer(x, ids, w))  # eager, on the same inputs
        stream.synchronize()
    ref = moe_forward_ref(x2.astype(np.float64), ids2, w_h, w1.astype(np.float64), w2.astype(np.float64))
    return {
        "bitwise_repeat": first.tobytes() == cupy.asnumpy(eager).tobytes()
        and replay.tobytes() == again.tobytes(),
        "overflow": layer.overflow_pairs(),
        "overflow_expected": 0,
        "nan_rows": np.flatnonzero(np.isnan(replay.astype(np.float64)).any(axis=1)).tolist(),
        "nan_rows_expected": [],
        "err_ref_kept": float(rel_error(replay.astype(np.float64), ref)) if ref.size else 0.0,
    }


def main(mode: str, out_dir: str) -> int:
    if mode == "stall":
        group = init_process_group(timeout=120)
        group.timeout = 3.0  # from here on: the layer's waits
        if group.rank == 1:
            time.sleep(8)  # alive but gone from the group's point of view
            os._exit(0)
        import cupy

        x = cupy.zeros((4, 64), dtype=cupy.float32)
        w1, w2 = cupy.zeros((1, 64, 64), cupy.float32), cupy.zeros((1, 32, 64), cupy.float32)
        layer = ExpertParallelMoE(group, w1, w2, group.world_size, 1)
        start = time.monotonic()
        try:
            layer(x, cupy.zeros((4, 1), cupy.int32), None)
            message = "no error"
        except CollectiveTimeoutError as exc:
            message = f"CollectiveTimeoutError: {exc}"
        result = {"message": message, "seconds": time.monotonic() - start}
        Path(out_dir, f"rank{group.rank}.json").write_text(json.dumps(result))
        os._exit(0)
    group = init_process_group(timeout=120)
    results = {}
    for name in CASES:
        try:
            results[name] = run_case(group, name)
        except Exception:
            results[name] = {"exception": traceback.format_exc()}
    try:
        results["fixed"] = fixed_cases(group)
    except Exception:
        results["fixed"] = {"exception": traceback.format_exc()}
    try:
        results["errors"] = error_cases(group)
    except Exception:
        results["errors"] = {"exception": traceback.format_exc()}
    Path(out_dir, f"rank{group.rank}.json").write_text(json.dumps(results, indent=1))
    group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
