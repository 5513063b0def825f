"""Train a small MoE block with plain SGD on CuPy: the forward and backward of this library, no framework.

A student MoEMLP (router, 8 experts with biases, top-2, a shared expert)
learns to imitate a teacher MoEMLP of the same shape on fresh random tokens
every step (a synthetic regression; the loss is the squared error summed over
the hidden size, averaged over tokens). Every parameter, the router's
included, gets its gradient from ``MoEMLP.backward`` and is updated in place.
The mean loss of the last 10 steps must be at least ``--min-drop`` times
below that of the first 10 (default 2; a float64 NumPy run of the same
recipe falls about 3.3x), else the script exits with status 1.

    python examples/train_moe.py [--steps 400] [--lr 0.2] [--tokens 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import require_gpu  # noqa: E402

HIDDEN, INTER, EXPERTS, TOP_K = 32, 32, 8, 2


def make_block(seed: int):
    """A float32 MoEMLP with weights drawn like a fresh layer (std 1/sqrt(fan_in)), zero biases."""
    import cupy

    import cublas_grouped as cg

    rng = np.random.default_rng(seed)

    def normal(shape, fan_in):
        return cupy.asarray((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))

    router = normal((HIDDEN, EXPERTS), HIDDEN)
    w1 = cg.ExpertWeights(normal((EXPERTS, HIDDEN, 2 * INTER), HIDDEN), cupy.zeros((EXPERTS, 2 * INTER), "f"))
    w2 = cg.ExpertWeights(normal((EXPERTS, INTER, HIDDEN), INTER), cupy.zeros((EXPERTS, HIDDEN), "f"))
    shared_w1, shared_w2 = normal((HIDDEN, 2 * INTER), HIDDEN), normal((INTER, HIDDEN), INTER)
    return cg.MoEMLP(router, w1, w2, TOP_K, shared_w1=shared_w1, shared_w2=shared_w2)


def sgd_step(block, grads, lr: float) -> None:
    """Plain SGD, in place (the block holds these very arrays)."""
    experts = grads.experts
    pairs = [
        (block.router_weight, grads.router_weight),
        (block.w1.weight, experts.dw1),
        (block.w2.weight, experts.dw2),
        (block.w1.bias, experts.db1),
        (block.w2.bias, experts.db2),
        (block.shared[0][0], grads.shared_w1),
        (block.shared[1][0], grads.shared_w2),
    ]
    for param, grad in pairs:
        param -= lr * grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per step")
    parser.add_argument("--min-drop", type=float, default=2.0, help="required first/last loss ratio")
    args = parser.parse_args()
    require_gpu()
    import cupy

    teacher, student = make_block(1), make_block(2)
    rng = np.random.default_rng(0)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        x = cupy.asarray(rng.standard_normal((args.tokens, HIDDEN)).astype(np.float32))
        target = teacher(x)
        out, ctx = student(x, return_context=True)
        diff = out - target
        losses.append(float(cupy.mean(cupy.sum(diff * diff, axis=1))))
        grads = student.backward(ctx, (2.0 / args.tokens) * diff)
        sgd_step(student, grads, args.lr)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:9.4f}")
    seconds = time.perf_counter() - start
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    ratio = first / last if last > 0 else float("inf")
    print(f"{args.steps} steps in {seconds:.1f} s; loss {first:.3f} -> {last:.3f} ({ratio:.2f}x lower)")
    if not np.isfinite(last) or ratio < args.min_drop:
        print(f"FAIL: the loss fell {ratio:.2f}x, less than the required {args.min_drop}x")
        sys.exit(1)
    print(f"OK: the loss fell at least {args.min_drop}x")


if __name__ == "__main__":
    main()
