"""Development check: a few FP8 kernel launches for compute-sanitizer, with
CuPy's memory pool off (so a write past an array hits memory nobody owns) and
a small grid (so each CTA walks many tiles and the ring, the mailboxes and
the tile counter go round). ``--variant`` picks the defines: ``wide`` (128 x
192 tiles, ``hopper_fp8.WIDE``), ``pairs`` (CTA pairs with two load threads)
or ``default``. For docs/kernel-notes.md.

    compute-sanitizer --tool racecheck python tools/fp8_sanitize_cases.py --variant wide
    compute-sanitizer --tool memcheck python tools/fp8_sanitize_cases.py --variant pairs
"""

from __future__ import annotations

import argparse

# (group sizes, N, K): groups ending inside tiles, N and K tails, a's small boxes.
CASES = [
    ([37, 0, 64, 65, 1], 264, 144),
    ([3, 130, 0, 77], 200, 528),
    ([16, 17, 33, 2, 48, 63, 64, 65, 0, 15, 192, 193, 129], 512, 528),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=("default", "wide", "pairs"), default="default")
    args = parser.parse_args()

    import cupy

    cupy.cuda.set_allocator(None)
    import numpy as np

    import cublas_grouped as cg
    from cublas_grouped.gemm.backends import hopper_fp8

    if args.variant == "wide":
        hopper_fp8.WIDE = True
    if args.variant == "pairs":
        hopper_fp8.DEFINES = {**hopper_fp8.DEFINES, "FP8_CLUSTER": 2, "FP8_LOADERS": 2}
    hopper_fp8.GRID_LIMIT = 2 if args.variant == "pairs" else 3
    for sizes, n, k in CASES:
        rng = np.random.default_rng(n + k)
        m, e = sum(sizes), len(sizes)
        x = cupy.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype("bfloat16")
        w = cupy.asarray((rng.standard_normal((e, n, k)) * k**-0.5).astype(np.float32)).astype("bfloat16")
        a_q, a_s = cg.quantize_rows_fp8(x)
        wq = cg.quantize_fp8(w, trans_b=True)
        out = hopper_fp8.grouped_fp8(a_q, a_s, wq, cupy.asarray(sizes, dtype=cupy.int32))
        cupy.cuda.Device().synchronize()
        print(
            f"{args.variant}: {sizes} N={n} K={k} finite: {bool(cupy.isfinite(out.astype(cupy.float32)).all())}"
        )


if __name__ == "__main__":
    main()
