"""What the benchmark and the tuner measure: model shapes, cases, routings, FLOP and byte counts.

Plain NumPy; nothing here touches a GPU. The tuner (``cublas_grouped.tools.tune``)
shares the models, the routing generators and the seeds, so a tuned shape is
the shape the benchmark times.
"""

from __future__ import annotations

import argparse
import zlib
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from ...gemm.plan import layout_for

__all__ = [
    "ALGORITHMS",
    "KERNEL_ALGORITHMS",
    "kernel_unavailable",
    "DTYPE_BYTES",
    "MODELS",
    "ModelShape",
    "Case",
    "build_cases",
    "case_seed",
    "expert_popularity",
    "uniform_routing",
    "skewed_routing",
    "routing_weights",
    "make_routing",
    "expert_counts",
    "gemm1_flops",
    "layer_flops",
    "gemm1_weight_bytes",
    "layer_weight_bytes",
    "tflops",
    "gbs",
    "layout_rows",
]

# The single algorithms AUTO chooses among (the values of cublas_grouped.Algorithm).
ALGORITHMS = ("cublas_grouped", "sequential", "chunked_batched", "padded_strided")
# Our own kernels' algorithms, timed (and tuned, and chosen by AUTO) only where
# the GPU and dtype allow: the Hopper kernel, SM 9.0 and bf16/fp16; elsewhere
# each case records it as skipped.
KERNEL_ALGORITHMS = ("sm90_grouped",)


def kernel_unavailable(method: str, sm: tuple[int, int], dtype: str) -> str | None:
    """Why ``method`` (one of KERNEL_ALGORITHMS) cannot run on an SM ``sm``
    GPU in ``dtype``, as a "skipped" error; None when it can."""
    if tuple(sm) != (9, 0):
        return f"skipped: {method} needs an SM 9.0 GPU (this one is SM {sm[0]}.{sm[1]})"
    if dtype not in ("bfloat16", "float16"):
        return f"skipped: {method} takes bfloat16 or float16, not {dtype}"
    return None


@dataclass(frozen=True)
class ModelShape:
    """Expert shapes of one MoE model (per layer)."""

    experts: int
    top_k: int
    hidden: int
    inter: int


MODELS: dict[str, ModelShape] = {
    "mixtral-8x7b": ModelShape(experts=8, top_k=2, hidden=4096, inter=14336),
    "qwen3-30b-a3b": ModelShape(experts=128, top_k=8, hidden=2048, inter=768),
    "deepseek-v3": ModelShape(experts=256, top_k=8, hidden=7168, inter=2048),
}
PREFILL_TOKENS = (4096, 16384)
DECODE_TOKENS = (16, 64)
QUICK_TOKENS = (16, 64, 4096)
# At or below this many tokens a layer reads more weight bytes than it does
# useful math: it is judged by bandwidth, not FLOP/s.
DECODE_MAX_TOKENS = 128
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Case:
    """One benchmark point: expert shapes, token count, routing and dtype."""

    model: str
    tokens: int
    experts: int
    top_k: int
    hidden: int
    inter: int
    routing: str = "uniform"
    dtype: str = "bfloat16"
    gated: bool = True

    @property
    def name(self) -> str:
        return f"{self.model}/T{self.tokens}/{self.routing}"

    @property
    def n1(self) -> int:
        """N of the first GEMM: gate and up projections packed side by side when gated."""
        return 2 * self.inter if self.gated else self.inter

    @property
    def pairs(self) -> int:
        """(token, expert) pairs, the rows the expert GEMMs see without padding."""
        return self.tokens * self.top_k

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def phase(self) -> str:
        return "decode" if self.tokens <= DECODE_MAX_TOKENS else "prefill"


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The cases a parsed command line asks for, grouped by model (weights are reused within one).

    Parameters
    ----------
    args : argparse.Namespace
        From :func:`cublas_grouped.tools.bench.cli.parse_args`.

    Returns
    -------
    list of Case
        Model x tokens (ascending) x routing; or the one custom shape x tokens x routing.
    """
    if args.tokens:
        tokens = list(args.tokens)
    elif args.quick:
        tokens = list(QUICK_TOKENS)
    else:
        tokens = sorted(DECODE_TOKENS + PREFILL_TOKENS)
    routings = getattr(args, "routings", None) or ["uniform", "skewed"]
    if args.experts is not None:
        name = f"custom-e{args.experts}k{args.topk}h{args.hidden}i{args.inter}"
        shapes = {name: ModelShape(args.experts, args.topk, args.hidden, args.inter)}
    else:
        wanted = [s.strip() for s in args.cases.split(",") if s.strip()] if args.cases else []
        shapes = {m: s for m, s in MODELS.items() if not wanted or any(w in m for w in wanted)}
    return [
        Case(model, t, s.experts, s.top_k, s.hidden, s.inter, routing, args.dtype)
        for model, s in shapes.items()
        for t in tokens
        for routing in routings
    ]


# -- routing -----------------------------------------------------------------------------------------------


def case_seed(name: str, seed: int) -> int:
    """A 32-bit seed for ``name`` (a case, a weight tensor, an input set) under the run's ``seed``.

    crc32, not ``hash()``: the same name gets the same seed in every process.
    """
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF


def expert_popularity(num_experts: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Relative popularity of each expert, lognormal with parameter ``sigma``; sums to 1.

    The values are the lognormal's quantiles at ``(i + 0.5) / E``, shuffled
    over the experts: a stratified draw, so the spread between the busiest
    and the idlest expert is the same in every run and only which expert is
    busy depends on the seed. (With 8 experts a plain draw swings from nearly
    uniform to one dominant expert, which would make runs incomparable.)

    Parameters
    ----------
    num_experts : int
    sigma : float
        Standard deviation of the log-popularity.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
        float64 ``[E]``, positive, sums to 1.
    """
    normal = NormalDist()
    z = np.array([normal.inv_cdf((i + 0.5) / num_experts) for i in range(num_experts)])
    p = np.exp(sigma * z)
    rng.shuffle(p)
    return p / p.sum()


def _top_k_of_keys(keys: np.ndarray, top_k: int) -> np.ndarray:
    ids = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
    return ids.astype(np.int32)


def uniform_routing(tokens: int, num_experts: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Each token picks ``top_k`` distinct experts uniformly at random.

    Returns
    -------
    numpy.ndarray
        int32 ``[tokens, top_k]``.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}]; got {top_k}")
    return _top_k_of_keys(rng.random((tokens, num_experts)), top_k)


def skewed_routing(
    tokens: int, num_experts: int, top_k: int, rng: np.random.Generator, sigma: float = 1.0
) -> np.ndarray:
    """Each token picks ``top_k`` distinct experts, favouring popular ones.

    Sampling without replacement with probabilities from
    :func:`expert_popularity`, by the Gumbel-top-k trick: the k largest of
    ``log p_e + Gumbel noise`` are a draw without replacement in proportion
    to ``p``.

    Returns
    -------
    numpy.ndarray
        int32 ``[tokens, top_k]``.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}]; got {top_k}")
    p = expert_popularity(num_experts, sigma, rng)
    keys = np.log(p)[None, :] + rng.gumbel(size=(tokens, num_experts))
    return _top_k_of_keys(keys, top_k)


def routing_weights(tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Positive routing weights that sum to 1 per token (float32 ``[tokens, top_k]``)."""
    w = rng.random((tokens, top_k)) + 0.1
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def make_routing(case: Case, seed: int = 0, sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(topk_weights, topk_ids)`` of a case, on the host, reproducible from the seed."""
    rng = np.random.default_rng(case_seed(case.name, seed))
    if case.routing == "skewed":
        ids = skewed_routing(case.tokens, case.experts, case.top_k, rng, sigma)
    elif case.routing == "uniform":
        ids = uniform_routing(case.tokens, case.experts, case.top_k, rng)
    else:
        raise ValueError(f"routing must be 'uniform' or 'skewed'; got {case.routing!r}")
    return routing_weights(case.tokens, case.top_k, rng), ids


def expert_counts(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Rows per expert (int64 ``[E]``)."""
    return np.bincount(np.asarray(topk_ids).reshape(-1), minlength=num_experts).astype(np.int64)


# -- FLOPs, bytes, rows ------------------------------------------------------------------------------------


def gemm1_flops(case: Case) -> int:
    """Useful FLOPs of the first GEMM: ``2 * T*k * H * N1`` (padding rows do not count)."""
    return 2 * case.pairs * case.hidden * case.n1


def layer_flops(case: Case) -> int:
    """Useful FLOPs of both expert GEMMs of the layer."""
    return gemm1_flops(case) + 2 * case.pairs * case.inter * case.hidden


def gemm1_weight_bytes(case: Case, active_experts: int) -> int:
    """Bytes of ``w1`` the first GEMM must read: the active experts' ``[H, N1]`` slices."""
    return active_experts * case.hidden * case.n1 * case.itemsize


def layer_weight_bytes(case: Case, active_experts: int) -> int:
    """Bytes of ``w1`` and ``w2`` the layer must read: the decode floor's numerator."""
    return active_experts * (case.hidden * case.n1 + case.inter * case.hidden) * case.itemsize


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def gbs(nbytes: float, ms: float) -> float:
    """GB/s (10^9 bytes per second) of ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def layout_rows(algorithm: str, counts: np.ndarray) -> int:
    """Rows of the gathered layout ``algorithm`` runs on, for these per-expert counts.

    The library's own rule (:func:`cublas_grouped.gemm.plan.layout_for`); the
    benchmark and the tuner use it to estimate memory before any GPU work.
    """
    return layout_for(algorithm, counts).rows(counts)
