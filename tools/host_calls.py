"""Development probe (CPU, no GPU needed): Python and C function calls per eager call.

The host cost of an eager call on the GPU machine follows the number of
function calls it makes (about 1 us each there), which can be counted on any
machine: this runs the cases of ``python -m cublas_grouped.bench --host-only``
with the GPU side replaced by the stand-ins of ``tests/host_stubs.py`` (CuPy's
allocator, cuBLAS, the driver launch and the copies do nothing), after a
warm-up that fills the caches, and prints the calls per call of each, and
what one call queues: kernel launches and memsets (``launches``), host-device
copies (``copies``) and cuBLAS calls (``cublas``).
``--profile NAME`` prints a cProfile of one case (by call count).

    PYTHONPATH=. python3 tools/host_calls.py [--profile "moe_forward T=1 qwen3 (auto)"]

The counts leave out the stand-ins' own calls; they include the C calls the
library makes (CuPy attribute reads that are methods, NumPy functions, ctypes
calls), not the time those take on a GPU (cuBLAS and the driver's own host
time, CuPy's allocator). tests/test_call_cache.py and tests/test_layer_cache.py
hold budgets for some of these counts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("CUBLAS_GROUPED_AUTOTUNE", "0")  # tables and rules: nothing to time without a GPU

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from host_stubs import count_calls, fake_array, stub_gpu  # noqa: E402

import cublas_grouped as cg  # noqa: E402


def cases(rec) -> dict:
    """The host benchmark's calls (cublas_grouped/tools/bench/host.py), on stand-in arrays."""
    a, b, out = fake_array((16, 256)), fake_array((4, 256, 256)), fake_array((16, 256))
    sizes = np.array([4, 4, 4, 4], dtype=np.int64)
    e, k, h, inter = 128, 8, 2048, 768
    counts = np.zeros(e, np.int32)
    counts[:k] = 1  # one token, k distinct experts
    answers = {(e,): counts, (4,): sizes}  # device copies of the counts and of gmm's device sizes

    def host_values(arr):
        found = answers.get(arr.shape)
        return found.astype(arr.dtype) if found is not None else np.zeros(arr.shape, arr.dtype)

    rec.host_values = host_values
    logits = fake_array((1, e), "float32")
    x, w1, w2 = fake_array((1, h)), fake_array((e, h, 2 * inter)), fake_array((e, inter, h))
    ids, weights = fake_array((1, k), "int32"), fake_array((1, k), "float32")
    found = {}
    for alg in ("auto", "cublas_grouped", "sequential", "chunked_batched", "sm90_grouped"):
        found[f"gmm tiny, host sizes ({alg})"] = lambda alg=alg: cg.gmm(a, b, sizes, algorithm=alg)
    found["gmm tiny, host sizes, out= (auto)"] = lambda: cg.gmm(a, b, sizes, out=out)
    sizes_dev, b_t = fake_array((4,), "int64"), fake_array((4, 256, 256))
    found["gmm tiny, device sizes (auto)"] = lambda: cg.gmm(a, b, sizes_dev)
    found["gmm tiny, device sizes (sm90_grouped, trans_b)"] = lambda: cg.gmm(
        a, b_t, sizes_dev, trans_b=True, algorithm="sm90_grouped"
    )
    found["route T=1 E=128 k=8"] = lambda: cg.route(logits, k)
    found["moe_forward T=1 qwen3 (auto)"] = lambda: cg.moe_forward(x, ids, weights, w1, w2)
    found["moe_forward T=1 qwen3 fixed_capacity"] = lambda: cg.moe_forward(
        x, ids, weights, w1, w2, fixed_capacity=True
    )
    return found


def _time_us(fn, repeat: int = 2000, batches: int = 5) -> float:
    import time

    best = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best.append((time.perf_counter() - start) / repeat * 1e6)
    return float(np.median(best))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", metavar="NAME", help="print a cProfile of this case")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument(
        "--time", action="store_true", help="also print us per call on this CPU (stand-ins included: a proxy)"
    )
    args = parser.parse_args(argv)
    monkeypatch = pytest.MonkeyPatch()
    if args.time:  # the stand-in driver's decoding of each launch's values: not the library's time
        import host_stubs

        monkeypatch.setattr(host_stubs, "_argument_values", lambda L, params: ())
    try:
        with stub_gpu(monkeypatch) as rec:
            found = cases(rec)
            head = f"{'call':48s} {'calls':>6s} {'launches':>8s} {'copies':>6s} {'cublas':>6s}"
            print(head + (f" {'us here':>8s}" if args.time else ""))
            for name, fn in found.items():
                fn()
                fn()  # the second call is the first cached one
                rec.clear()
                fn()
                queued = (len(rec.launches) + len(rec.memsets), len(rec.copies), len(rec.cublas))
                line = f"{name:48s} {count_calls(fn, repeat=args.repeat):6d} {queued[0]:8d} {queued[1]:6d} {queued[2]:6d}"
                if args.time:
                    line += f" {_time_us(fn):8.1f}"
                print(line)
            if args.profile:
                import cProfile
                import pstats

                fn = found[args.profile]
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(args.repeat):
                    fn()
                profile.disable()
                pstats.Stats(profile).sort_stats("ncalls").print_stats(40)
    finally:
        monkeypatch.undo()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
