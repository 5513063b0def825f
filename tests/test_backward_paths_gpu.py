"""Each weight-gradient path of the backward (``moe.weight_grad``) on the GPU:
STRIDED on padded capacity, BUCKETED on chunk-aligned rows, and the grouped
and per-expert calls on the same layouts, forced one at a time, against the
float64 reference, with skewed routing (idle experts, one busy one), several
token counts and chunk sizes, and bitwise repeatability."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from test_backward_gpu import NAMES, check_all, forward_backward, make_case, reference, same_bits, to_host

import cublas_grouped as cg
from cublas_grouped.moe import backward as B
from cublas_grouped.moe.weight_grad import WeightGradPath

pytestmark = pytest.mark.gpu

P = WeightGradPath
# Paths that can run on each layout's rows (the forward's algorithm fixes the layout).
LAYOUT_PATHS = {
    "padded_strided": (P.STRIDED, P.SEQUENTIAL),
    "chunked_batched": (P.BUCKETED, P.GROUPED, P.SEQUENTIAL),
}
CASES = [(a, p) for a, paths in LAYOUT_PATHS.items() for p in paths]
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def skewed(rng, dev, host, experts, idle):
    """Route every token to expert ``idle`` first (the busy one); experts
    ``[0, idle)`` get no token, the rest share what is left."""
    import cupy

    ids = host["topk_ids"].copy()
    tokens, k = ids.shape
    others = np.arange(idle + 1, experts)
    for t in range(tokens):
        ids[t, 0] = idle
        ids[t, 1:] = rng.choice(others, size=k - 1, replace=False)
    host["topk_ids"] = ids
    dev["topk_ids"] = cupy.asarray(ids)


@pytest.fixture
def forced(monkeypatch):
    """Force the backward's weight-gradient path; records every path used."""
    used = []

    def force(path):
        def pick(*args):
            used.append(path)
            return path

        monkeypatch.setattr(B, "weight_grad_path", pick)
        return used

    return force


def run(dev, algorithm, chunk_rows=None):
    executor = cg.GroupedGemmExecutor(config={"chunk_rows": chunk_rows}) if chunk_rows else None
    return forward_backward(dev, algorithm=algorithm, executor=executor)[1]


@pytest.mark.parametrize("algorithm, path", CASES)
@pytest.mark.parametrize("tokens", [1, 37, 600, 4096])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_each_path_matches_float64(forced, algorithm, path, tokens, dtype):
    rng = np.random.default_rng(tokens + 7)
    dev, host = make_case(rng, tokens, 24, 4, 128, 64, dtype, unused=3)
    used = forced(path)
    grads = run(dev, algorithm)
    assert used == [path, path]
    check_all(grads, reference(host), TOL[np.dtype(dtype).name], f"{algorithm} {path.value} T={tokens}")


@pytest.mark.parametrize("algorithm, path", CASES)
@pytest.mark.parametrize("tokens", [5, 900])
def test_skewed_routing_idle_experts_exact_zeros(forced, algorithm, path, tokens):
    rng = np.random.default_rng(tokens)
    experts, idle = 16, 4
    dev, host = make_case(rng, tokens, experts, 3, 64, 32, ml_dtypes.bfloat16)
    skewed(rng, dev, host, experts, idle)
    forced(path)
    grads = run(dev, algorithm)
    for name in ("dw1", "dw2", "db1", "db2"):
        grad = to_host(getattr(grads, name)).reshape(experts, -1)
        assert (grad[:idle] == 0).all(), name
        assert (grad[idle] != 0).any(), name
    check_all(grads, reference(host), 2e-2, f"skewed {algorithm} {path.value}")


@pytest.mark.parametrize("chunk_rows", [8, 32, 128])
def test_bucketed_with_several_chunk_sizes(forced, chunk_rows):
    rng = np.random.default_rng(chunk_rows)
    dev, host = make_case(rng, 700, 32, 6, 128, 96, np.float32, unused=2)
    forced(P.BUCKETED)
    grads = run(dev, "chunked_batched", chunk_rows)
    check_all(grads, reference(host), 1e-5, f"bucketed C={chunk_rows}")


@pytest.mark.parametrize("algorithm, path", CASES)
def test_each_path_gives_identical_bits(forced, algorithm, path):
    rng = np.random.default_rng(21)
    dev, host = make_case(rng, 2048, 64, 6, 256, 128, ml_dtypes.bfloat16, unused=3)
    skewed(rng, dev, host, 64, 3)
    forced(path)
    first = run(dev, algorithm)
    for _ in range(2):
        again = run(dev, algorithm)
        for name in NAMES:
            assert same_bits(getattr(first, name), getattr(again, name)), (path.value, name)
