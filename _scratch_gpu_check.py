# TEMPORARY scratch GPU check (deleted after use). Not part of the library.
import importlib.util
import sys
from pathlib import Path

import cupy as cp
import ml_dtypes
import numpy as np

spec = importlib.util.spec_from_file_location("ref", "cublas_grouped/testing.py")
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

K = Path("kernels")
common = (K / "common.cuh").read_text()
mods = {}
for f in K.glob("*.cu"):
    mods[f.stem] = cp.RawModule(
        code=f.read_text().replace('#include "common.cuh"', common), options=("-std=c++17",)
    )
fails = []


def check(cond, msg):
    if not cond:
        fails.append(msg)
        print("FAIL", msg, flush=True)


i32, i64, u64 = np.int32, np.int64, np.uint64
rng = np.random.default_rng(0)
DT = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}


def to_dev(a_host, dt):
    h = np.asarray(a_host).astype(DT[dt])
    if dt == "bf16":
        return cp.asarray(h.view(np.uint16)), h.astype(np.float64)
    return cp.asarray(h), h.astype(np.float64)


def from_dev(d, dt):
    h = cp.asnumpy(d)
    if dt == "bf16":
        h = h.view(ml_dtypes.bfloat16)
    return h.astype(np.float64)


def empty(shape, dt):
    return cp.empty(shape, dtype=np.uint16 if dt == "bf16" else DT[dt])


NULL = u64(0)

# ---------------------------------------------------------------- routing
for dt in DT:
    for T, E, k, scoring, ren, tie in [
        (1000, 8, 2, 0, 1, False), (777, 64, 6, 0, 0, False), (513, 256, 8, 1, 1, False),
        (300, 1024, 8, 0, 1, False), (5, 1024, 1024, 0, 1, False), (1, 3, 3, 1, 0, False),
        (999, 128, 8, 0, 1, True), (100, 33, 33, 1, 1, True), (50, 1, 1, 0, 1, False),
    ]:
        logits = rng.integers(-2, 3, (T, E)).astype(np.float64) if tie else rng.standard_normal((T, E)) * 3
        d, host = to_dev(logits, dt)
        w = cp.zeros((T, k), np.float32)
        ids = cp.zeros((T, k), np.int32)
        mods["routing"].get_function("route_topk_" + dt)(
            ((T + 3) // 4,), (128,), (d, i32(T), i32(E), i32(k), i32(scoring), i32(ren), w, ids),
            shared_mem=4 * E * 4)
        rw, rids = ref.route_ref(host, k, "softmax" if scoring == 0 else "sigmoid", bool(ren))
        gi = cp.asnumpy(ids)
        nbad = int((gi != rids).any(axis=1).sum())
        check(nbad <= (0 if tie or E <= 64 else 2), f"route {dt} T{T} E{E} k{k} ids mismatch rows={nbad}")
        ok = (gi == rids).all(axis=1)
        err = np.abs(cp.asnumpy(w)[ok] - rw[ok]).max() if ok.any() else 0
        check(err < 2e-6, f"route {dt} T{T} E{E} k{k} weight err {err}")
print("routing done", flush=True)

# ---------------------------------------------------------------- dispatch + pointers
D = mods["dispatch"]
P = mods["pointers"]


def run_plan(ids_host, E, align):
    ids = cp.asarray(ids_host.reshape(-1).astype(np.int32))
    n = ids.size
    nb = max((n + 1023) // 1024, 1)
    bc = cp.full((nb, E), 12345, np.int32)
    counts = cp.zeros(E, np.int32)
    D.get_function("expert_block_histogram")((nb,), (256,), (ids, i32(n), i32(E), bc))
    hist = cp.asnumpy(bc).copy()
    D.get_function("expert_column_scan")((E,), (256,), (bc, i32(nb), i32(E), counts))
    ro = cp.zeros(E + 1, np.int32)
    dummy = cp.zeros(max(E, 1) * 4, np.uint64)
    P.get_function("build_pointers")((1,), (1024,), (
        counts, i32(E), i32(align), i32(0), i32(0), i32(0),
        u64(0), i64(0), i64(0), u64(0), i64(0), i64(0), u64(0), i64(0), i64(0), u64(0),
        dummy, dummy, dummy, ro))
    nrows = int(ro[-1].get())
    p2r = cp.full(n, -7, np.int32)
    r2p = cp.full(max(nrows, 1), -1, np.int32)
    D.get_function("assign_rows")((nb,), (256,), (ids, i32(n), i32(E), bc, ro, p2r, r2p),
                                  shared_mem=9 * E * 4)
    return hist, cp.asnumpy(counts), cp.asnumpy(ro), cp.asnumpy(p2r), cp.asnumpy(r2p)[:nrows]


for n, E, align, mode in [(1, 1, 1, "u"), (1000, 8, 1, "u"), (1024, 8, 8, "u"), (5000, 256, 1, "u"),
                          (70001, 1024, 16, "u"), (70001, 3000, 1, "u"), (40000, 64, 4, "one"),
                          (3000, 1024, 128, "skew"), (0, 4, 1, "u")]:
    if mode == "u":
        ids_h = rng.integers(0, E, n)
    elif mode == "one":
        ids_h = np.full(n, E - 1)
    else:
        ids_h = np.minimum(rng.geometric(0.3, n) - 1, E - 1)
    if E > 1365:
        D.get_function("assign_rows").max_dynamic_shared_size_bytes = 9 * E * 4
    hist, counts, ro, p2r, r2p = run_plan(ids_h, E, align)
    plan = ref.plan_ref(ids_h, E, align)
    check((counts == plan["counts"]).all(), f"counts n{n} E{E}")
    check((ro == plan["row_offsets"]).all(), f"row_offsets n{n} E{E}")
    check((p2r == plan["pair_to_row"]).all(), f"p2r n{n} E{E}")
    check((r2p == plan["row_to_pair"]).all(), f"r2p n{n} E{E}")
    nb = max((n + 1023) // 1024, 1)
    exp_hist = np.stack([np.bincount(ids_h[b * 1024:(b + 1) * 1024], minlength=E) for b in range(nb)])
    check((hist == exp_hist).all(), f"hist n{n} E{E}")
# invalid ids are skipped
ids_h = np.array([0, 5, -1, 1, 0])
_, counts, ro, p2r, r2p = run_plan(ids_h, 2, 1)
check(list(counts) == [2, 1] and list(p2r) == [0, -7, -7, 2, 1] and list(r2p) == [0, 4, 3], f"invalid ids {counts} {p2r} {r2p}")
print("dispatch done", flush=True)


def ptr_expected(counts, align, slot, chunk, nslots, A, B, C, scr):
    E = len(counts)
    offs, tot = [], 0
    for c in counts:
        offs.append(tot)
        tot += (1 if c > 0 else 0) if slot > 0 else -(-c // align) * align
    if slot > 0:
        offs = [o * slot for o in offs]
        tot *= slot
    a, b, c_ = [], [], []
    for e in range(E):
        if chunk == 0:
            rows = [offs[e]] if counts[e] > 0 else []
        else:
            rows = [offs[e] + q * chunk for q in range(-(-counts[e] // chunk))]
        for r in rows:
            a.append(A[0] + r * A[1] + e * A[2])
            b.append(B[0] + r * B[1] + e * B[2])
            c_.append(C[0] + r * C[1] + e * C[2])
    nprob = len(a)
    lastb = b[-1] if b else B[0]
    for _ in range(nprob, nslots):
        a.append(A[0]); b.append(lastb); c_.append(scr)
    return offs + [tot], a, b, c_, nprob


for E, slot, chunk, nslots, align in [(8, 0, 0, 0, 1), (8, 0, 0, 16, 8), (300, 0, 64, 0, 64), (2500, 0, 0, 3000, 1),
                                      (2500, 128, 32, 9000, 1), (5, 256, 0, 5, 1), (1, 0, 0, 4, 1), (3000, 0, 16, 0, 16)]:
    counts_h = rng.integers(0, 300, E) * (rng.random(E) < 0.7)
    if E == 1:
        counts_h[:] = 0
    A = (0x7f0000000000, 4096 * 2, 0); B = (0x7e0000000000, 0, 4096 * 1024 * 2); C = (0x7d0000000000, 1024 * 2, 0)
    scr = 0x7c0000000000
    offs, a, b, c, nprob = ptr_expected(list(counts_h), align, slot, chunk, nslots, A, B, C, scr)
    cap = max(len(a), 1)
    da = cp.zeros(cap, np.uint64); db = cp.zeros(cap, np.uint64); dc = cp.zeros(cap, np.uint64)
    ro = cp.zeros(E + 1, np.int32)
    P.get_function("build_pointers")((1,), (1024,), (
        cp.asarray(counts_h.astype(np.int32)), i32(E), i32(align), i32(slot), i32(chunk), i32(nslots),
        u64(A[0]), i64(A[1]), i64(A[2]), u64(B[0]), i64(B[1]), i64(B[2]), u64(C[0]), i64(C[1]), i64(C[2]),
        u64(scr), da, db, dc, ro))
    check(list(cp.asnumpy(ro)) == offs, f"ptr offs E{E} slot{slot} chunk{chunk}")
    check(list(cp.asnumpy(da)[:len(a)]) == a and list(cp.asnumpy(db)[:len(a)]) == b and list(cp.asnumpy(dc)[:len(a)]) == c,
          f"ptrs E{E} slot{slot} chunk{chunk} nprob{nprob}")
print("pointers done", flush=True)

# ---------------------------------------------------------------- row kernels
A_ = mods["activation"]
Cm = mods["combine"]
for dt in DT:
    for H, off in [(4096, 0), (1000, 0), (77, 0), (4096, 1), (8, 0)]:
        T, k, E = 37, 3, 5
        ids_h = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
        plan = ref.plan_ref(ids_h, E, 4)
        nrows = int(plan["row_offsets"][-1])
        xd_full, xh_full = to_dev(rng.standard_normal((T * H + off,)), dt)
        xd = xd_full[off:].reshape(T, H); xh = xh_full[off:].reshape(T, H)
        r2p = cp.asarray(plan["row_to_pair"]); p2r = cp.asarray(plan["pair_to_row"])
        out = empty((nrows, H), dt); out.fill(7)
        D.get_function("gather_rows_" + dt)((50,), (128,), (xd, i32(H), r2p, i32(k), i32(nrows), out))
        check((from_dev(out, dt) == ref.gather_ref(xh, plan["row_to_pair"], k)).all(), f"gather {dt} H{H} off{off}")
        # scatter
        yd, yh = to_dev(rng.standard_normal((nrows, H)), dt)
        sc = empty((T * k, H), dt)
        p2r_drop = plan["pair_to_row"].copy(); p2r_drop[5] = -1
        Cm.get_function("scatter_rows_" + dt)((64,), (128,), (yd, i32(H), cp.asarray(p2r_drop), i32(T * k), sc))
        check((from_dev(sc, dt) == ref.scatter_ref(yh, p2r_drop)).all(), f"scatter {dt} H{H}")
        # combine
        w_h = rng.random((T, k)).astype(np.float32)
        bd, bh = to_dev(rng.standard_normal((E, H)), dt)
        for use_w, use_b in [(True, True), (False, False), (True, False)]:
            cb = empty((T, H), dt)
            Cm.get_function("combine_rows_" + dt)((16,), (128,), (
                yd, i32(H), cp.asarray(p2r_drop), cp.asarray(w_h) if use_w else NULL, cp.asarray(ids_h),
                bd if use_b else NULL, i32(T), i32(k), cb))
            rr = ref.combine_ref(yh, p2r_drop, w_h if use_w else None, ids_h, bh if use_b else None)
            e = ref.rel_error(from_dev(cb, dt), rr)
            check(e < {"f32": 1e-6, "f16": 1e-3, "bf16": 8e-3}[dt], f"combine {dt} H{H} w{use_w} b{use_b} err {e}")
        # activation
        for gated in (1, 0):
            for act in (0, 1, 2):
                I = H
                W = 2 * I if gated else I
                hd, hh = to_dev(rng.standard_normal((nrows, W)), dt)
                b1d, b1h = to_dev(rng.standard_normal((E, W)), dt)
                for use_b in (True, False):
                    o = empty((nrows, I), dt); o.fill(3)
                    A_.get_function("expert_activation_" + dt)((40,), (128,), (
                        hd, i32(I), i32(gated), i32(act), b1d if use_b else NULL, r2p, cp.asarray(ids_h),
                        i32(nrows), o))
                    r2p_h = plan["row_to_pair"]
                    rexp = np.where(r2p_h >= 0, ids_h.reshape(-1)[np.maximum(r2p_h, 0)], -1)
                    rr = ref.activation_ref(hh, I, bool(gated), act, b1h if use_b else None, rexp)
                    e = ref.rel_error(from_dev(o, dt), rr)
                    check(e < {"f32": 1e-6, "f16": 1e-3, "bf16": 8e-3}[dt], f"act {dt} H{H} g{gated} a{act} b{use_b} err {e}")
print("row kernels done", flush=True)

# ---------------------------------------------------------------- bandwidth
T, k, H = 8192, 8, 4096
x = cp.zeros((T, H), np.uint16)
nrows = T * k
r2p = cp.arange(nrows, dtype=np.int32)[cp.asarray(rng.permutation(nrows))]
out = cp.empty((nrows, H), np.uint16)
f = D.get_function("gather_rows_bf16")
ev0, ev1 = cp.cuda.Event(), cp.cuda.Event()
for grid in (1024, 4096, 65535):
    f((grid,), (128,), (x, i32(H), r2p, i32(k), i32(nrows), out))
    ev0.record()
    for _ in range(10):
        f((grid,), (128,), (x, i32(H), r2p, i32(k), i32(nrows), out))
    ev1.record(); ev1.synchronize()
    ms = cp.cuda.get_elapsed_time(ev0, ev1) / 10
    print(f"gather bf16 grid {grid}: {ms:.3f} ms, {2 * nrows * H * 2 / ms / 1e9:.0f} GB/s (r+w)")
y = cp.zeros((nrows, H), np.uint16)
p2r = cp.arange(nrows, dtype=np.int32)
w = cp.ones((T, k), np.float32)
ids = cp.zeros((T, k), np.int32)
o = cp.empty((T, H), np.uint16)
f = Cm.get_function("combine_rows_bf16")
for grid in (1024, 8192):
    f((grid,), (128,), (y, i32(H), p2r, w, ids, NULL, i32(T), i32(k), o))
    ev0.record()
    for _ in range(10):
        f((grid,), (128,), (y, i32(H), p2r, w, ids, NULL, i32(T), i32(k), o))
    ev1.record(); ev1.synchronize()
    ms = cp.cuda.get_elapsed_time(ev0, ev1) / 10
    print(f"combine bf16 grid {grid}: {ms:.3f} ms, {(nrows + T) * H * 2 / ms / 1e9:.0f} GB/s")
hbuf = cp.zeros((nrows, 2 * 1024), np.uint16); ob = cp.empty((nrows, 1024), np.uint16)
f = A_.get_function("expert_activation_bf16")
f((8192,), (128,), (hbuf, i32(1024), i32(1), i32(0), NULL, p2r, ids, i32(nrows), ob))
ev0.record()
for _ in range(10):
    f((8192,), (128,), (hbuf, i32(1024), i32(1), i32(0), NULL, p2r, ids, i32(nrows), ob))
ev1.record(); ev1.synchronize()
ms = cp.cuda.get_elapsed_time(ev0, ev1) / 10
print(f"activation bf16 silu gated I=1024: {ms:.3f} ms, {nrows * 3 * 1024 * 2 / ms / 1e9:.0f} GB/s")
lg = cp.zeros((T, 256), np.uint16); wt = cp.empty((T, 8), np.float32); it = cp.empty((T, 8), np.int32)
f = mods["routing"].get_function("route_topk_bf16")
ev0.record()
for _ in range(10):
    f(((T + 3) // 4,), (128,), (lg, i32(T), i32(256), i32(8), i32(0), i32(1), wt, it), shared_mem=4 * 256 * 4)
ev1.record(); ev1.synchronize()
print(f"route T{T} E256 k8: {cp.cuda.get_elapsed_time(ev0, ev1) / 10:.3f} ms")
print("FAILS:", len(fails))
sys.exit(1 if fails else 0)
