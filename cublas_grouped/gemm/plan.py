"""The plan of a grouped GEMM: shapes, row layouts, addresses, capacities.

Everything here is plain NumPy and runs before any GPU work. This is the one
place where the row-major (NumPy) semantics of the API meet cuBLAS's
column-major convention: a row-major ``Y = X @ W`` is computed as the
column-major ``Y^T = W^T @ X^T``, which is the same memory, so nothing is
transposed or copied (:class:`CublasDims`).

Vocabulary: *rows* is the operand whose rows are grouped by expert (``a``),
*weights* the per-expert matrices (``b``), *out* the result. Three row
layouts say where expert e's rows start in the rows and out buffers
(:class:`RowLayout`; :func:`layout_for` says which algorithm needs which):

- *grouped-contiguous rows*: each expert's rows back to back, what ``gmm`` takes;
- *chunk-aligned rows*: each expert's block rounded up to a multiple of C rows
  (CHUNKED_BATCHED, and the fixed-capacity step of the MoE layer);
- *padded capacity*: expert e at row ``e * capacity``, ``[E, capacity, K]``
  (PADDED_STRIDED).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..runtime.arrays import ArrayView
from ..runtime.cublas import Op
from .config import Algorithm, coerce_enum

__all__ = [
    "GemmPlan",
    "CublasDims",
    "ProblemStats",
    "RowLayout",
    "Operands",
    "layout_for",
    "plan_gmm",
    "shape_plan",
    "host_group_sizes",
    "check_group_sizes",
    "capacity_for",
    "packed_chunks",
    "choose_chunk_rows",
    "CHUNK_CANDIDATES",
    "CHUNK_TFLOPS",
]

CHUNK_CANDIDATES = (256, 128, 64, 32)
# bf16 TFLOP/s of one cublasGemmBatchedEx over chunks of that many rows, at
# 256-1024 rows per expert (H100, cuBLAS 13.1, 2026-11-26: Qwen3 and
# DeepSeek-V3 expert shapes, no padding; see docs/design-notes.md). Thin
# chunks leave the row tile mostly empty, so padding often costs less.
CHUNK_TFLOPS = {256: 640.0, 128: 560.0, 64: 370.0, 32: 240.0}
_CHUNKS = np.array(CHUNK_CANDIDATES, dtype=np.int64)
_CHUNK_RATES = np.array([CHUNK_TFLOPS[c] for c in CHUNK_CANDIDATES])


class CublasDims(NamedTuple):
    """One column-major cuBLAS problem: C = op(A) op(B), A = weights side, B = rows side.
    (A named tuple: made on every per-group call, where a frozen dataclass costs nine calls.)"""

    transa: int
    transb: int
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int


@dataclass(frozen=True)
class GemmPlan:
    """Shapes and offsets of one grouped GEMM.

    Normal mode: ``out[o_e:o_e+m_e] = a[o_e:o_e+m_e] @ b[e]`` (``b[e].T`` with
    ``trans_b``). K-grouped mode (``trans_a``): ``out[e] = a_e.T @ b_e`` where
    ``a_e``/``b_e`` are the rows of group e of ``a`` [M, K] and ``b`` [M, N].
    ``offsets`` follow the row layout the rows are in (grouped-contiguous for ``gmm``).
    """

    num_experts: int
    total_rows: int
    n: int
    k: int
    trans_a: bool
    trans_b: bool
    sizes: np.ndarray  # int64 [E], rows per group
    offsets: np.ndarray  # int64 [E + 1], first row of each group
    active: np.ndarray  # int64, ids of groups with rows, ascending

    @property
    def zero_product(self) -> bool:
        """Every output element is an empty sum (K = 0 without ``trans_a``): the
        result is zeros and there is no GEMM to run (cuBLAS refuses K = 0, as a
        zero leading dimension). With ``trans_a``, K = 0 gives an empty output."""
        return self.k == 0 and not self.trans_a

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the result: ``[M, N]``, or ``[E, K, N]`` with ``trans_a``."""
        if self.trans_a:
            return (self.num_experts, self.k, self.n)
        return (self.total_rows, self.n)

    def dims(self, rows: int) -> CublasDims:
        """cuBLAS dimensions for a group of ``rows`` rows."""
        n, k = self.n, self.k
        if self.trans_a:
            # out_e^T [N, K] = b_e^T [N, rows] @ a_e [rows, K]
            return CublasDims(Op.N, Op.T, n, k, rows, n, k, n)
        # out_e^T [N, rows] = op(W_e)^T [N, K] @ a_e^T [K, rows]
        if self.trans_b:
            return CublasDims(Op.T, Op.N, n, rows, k, k, k, n)
        return CublasDims(Op.N, Op.N, n, rows, k, n, k, n)

    def dims_arrays(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Vectorized :meth:`dims` for many groups: int32 arrays for cublasGemmGroupedBatchedEx."""
        count = len(rows)
        rows32 = rows.astype(np.int32)
        probe = self.dims(1)
        full = {
            name: np.full(count, getattr(probe, name), dtype=np.int32)
            for name in ("transa", "transb", "m", "n", "k", "lda", "ldb", "ldc")
        }
        # Exactly one of m/n/k carries the group's rows.
        full["k" if self.trans_a else "n"] = rows32
        return full


@dataclass(frozen=True)
class ProblemStats:
    """What the choice of algorithm depends on, cheap to compute from the host row counts."""

    num_experts: int
    active_experts: int
    total_rows: int
    max_rows: int
    n: int
    k: int
    dtype: str = "bfloat16"

    @property
    def padding_ratio(self) -> float:
        """Rows the padded-capacity layout computes over the rows there are."""
        return self.num_experts * self.max_rows / self.total_rows if self.total_rows else float("inf")

    @property
    def mean_rows(self) -> float:
        """Rows per active expert."""
        return self.total_rows / self.active_experts if self.active_experts else 0.0

    @classmethod
    def from_sizes(cls, sizes: np.ndarray, n: int, k: int, dtype: str) -> ProblemStats:
        """Stats of per-expert row counts ``sizes`` for a GEMM of N = ``n``, K = ``k``."""
        active = int(np.count_nonzero(sizes))
        return cls(len(sizes), active, int(sizes.sum()), int(sizes.max(initial=0)), n, k, dtype)

    @property
    def skew(self) -> float:
        """Busiest expert's rows over the mean (1 for an even load)."""
        mean = self.mean_rows
        return max(self.max_rows / mean, 1.0) if mean else 1.0

    def features(self) -> np.ndarray:
        """log2 of (experts, active experts, mean rows + 1, N, K, skew): what the
        tuning tables' distance is measured on."""
        return np.log2(
            np.array(
                [
                    self.num_experts,
                    max(self.active_experts, 1),
                    self.mean_rows + 1,
                    self.n,
                    self.k,
                    self.skew,
                ],
                dtype=np.float64,
            )
        )


@dataclass(frozen=True)
class RowLayout:
    """Where expert e's rows start in the rows and out buffers.

    Build one with a named constructor: :meth:`contiguous` (grouped-contiguous
    rows), :meth:`chunk_aligned` (each expert's block rounded up to a multiple
    of ``align`` rows) or :meth:`padded` (expert e at ``e * stride``, the
    ``[E, stride, K]`` padded-capacity layout). ``kernels/pointers.cu`` computes
    the same offsets on the device (its ``align`` argument).

    Attributes
    ----------
    align : int
        Each expert's block is rounded up to a multiple of this many rows (1: none).
    stride : int
        When positive, expert e starts at row ``e * stride`` and ``align`` is unused.
    """

    align: int = 1
    stride: int = 0

    def __post_init__(self):
        if self.align < 1 or self.stride < 0:
            raise ValueError(f"RowLayout needs align >= 1 and stride >= 0; got {self.align}, {self.stride}")

    @classmethod
    def contiguous(cls) -> RowLayout:
        """Grouped-contiguous rows: each expert's rows right after the previous expert's."""
        return cls()

    @classmethod
    def chunk_aligned(cls, chunk_rows: int) -> RowLayout:
        """Chunk-aligned rows: each expert's block padded to a multiple of ``chunk_rows``."""
        return cls(align=chunk_rows)

    @classmethod
    def padded(cls, capacity: int) -> RowLayout:
        """Padded capacity: expert e's rows at ``e * capacity``, ``capacity`` rows each."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1; got {capacity}")
        return cls(stride=capacity)

    @property
    def kind(self) -> str:
        """``"grouped-contiguous"``, ``"chunk-aligned"`` or ``"padded-capacity"``."""
        if self.stride:
            return "padded-capacity"
        return "chunk-aligned" if self.align > 1 else "grouped-contiguous"

    def algorithms(self) -> tuple[Algorithm, ...]:
        """Algorithms that can run on rows laid out this way."""
        if self.stride:
            return (Algorithm.PADDED_STRIDED, Algorithm.SEQUENTIAL)
        if self.align > 1:
            return (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL, Algorithm.CHUNKED_BATCHED)
        # The sm90 kernel finds each group's rows from the sizes alone: back to back.
        return (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL, Algorithm.SM90_GROUPED)

    def offsets(self, sizes: np.ndarray) -> np.ndarray:
        """First row of each expert, then the rows in all (int64 [E + 1])."""
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        if self.stride:
            offsets[:] = np.arange(len(sizes) + 1) * self.stride
        elif self.align == 1:
            np.cumsum(sizes, out=offsets[1:])  # gmm's every call: no rounding to pay for
        else:
            np.cumsum(-(-sizes // self.align) * self.align, out=offsets[1:])
        return offsets

    def rows(self, sizes: np.ndarray) -> int:
        """Rows the rows and out buffers need for per-expert row counts ``sizes``."""
        return int(self.offsets(sizes)[-1])


def layout_for(algorithm: Algorithm, sizes: np.ndarray, chunk_rows: int | None = None) -> RowLayout:
    """The row layout ``algorithm`` runs on, for per-expert row counts ``sizes``.

    The one rule: PADDED_STRIDED takes padded capacity (:func:`capacity_for`
    rows per expert); CHUNKED_BATCHED chunk-aligned rows of ``chunk_rows``
    (default :func:`choose_chunk_rows`); CUBLAS_GROUPED and SEQUENTIAL
    grouped-contiguous rows. Which algorithms a layout serves is
    :meth:`RowLayout.algorithms`.
    """
    algorithm = coerce_enum(Algorithm, algorithm, "algorithm")
    if algorithm is Algorithm.AUTO:
        raise ValueError("algorithm AUTO has no row layout: choose the algorithm first")
    if algorithm is Algorithm.CHUNKED_BATCHED:
        return RowLayout.chunk_aligned(chunk_rows or choose_chunk_rows(sizes))
    if algorithm is Algorithm.PADDED_STRIDED:
        return RowLayout.padded(capacity_for(sizes))
    return RowLayout.contiguous()


@dataclass(frozen=True)
class Operands:
    """Device addresses and byte strides of the three operands.

    Each operand's address for a group at row ``r`` of expert ``e`` is
    ``base + r * row_bytes + e * expert_bytes``.
    """

    a: int
    a_row_bytes: int
    a_expert_bytes: int
    b: int
    b_row_bytes: int
    b_expert_bytes: int
    c: int
    c_row_bytes: int
    c_expert_bytes: int

    @classmethod
    def for_plan(cls, plan: GemmPlan, a: int, b: int, c: int, itemsize: int) -> Operands:
        """Strides of ``plan``'s operands at addresses ``a`` (rows), ``b`` (weights), ``c`` (out)."""
        n, k = plan.n, plan.k
        if plan.trans_a:
            return cls(a, k * itemsize, 0, b, n * itemsize, 0, c, 0, k * n * itemsize)
        return cls(a, k * itemsize, 0, b, 0, k * n * itemsize, c, n * itemsize, 0)

    def at(self, row, expert) -> tuple:
        """Addresses (rows, weights, out) of a group at ``row`` of ``expert``
        (ints, or NumPy arrays of many groups)."""
        return (
            self.a + row * self.a_row_bytes + expert * self.a_expert_bytes,
            self.b + row * self.b_row_bytes + expert * self.b_expert_bytes,
            self.c + row * self.c_row_bytes + expert * self.c_expert_bytes,
        )


def misaligned(a: int, b: int, out: int, alignment: int) -> str | None:
    """Why these operand addresses do not suit a back end that needs each of
    ``a``, ``b`` and ``out`` to start at a multiple of ``alignment`` bytes (the
    first one that does not is named), or None when they all do. No address
    in the message: callers warn once per message."""
    for name, ptr in (("a", a), ("b", b), ("out", out)):
        if int(ptr) % alignment:
            return f"needs {name} at a {alignment}-byte aligned address"
    return None


def host_group_sizes(group_sizes, num_experts: int) -> np.ndarray:
    """``group_sizes`` given on the host (sequence or NumPy) as int64, validated."""
    try:
        sizes = np.asarray(group_sizes)
    except Exception as exc:
        raise TypeError(f"group_sizes must be a sequence of integers: {exc}") from None
    if sizes.dtype == object or not (sizes.size == 0 or np.issubdtype(sizes.dtype, np.integer)):
        raise TypeError(f"group_sizes must hold integers; got dtype {sizes.dtype}")
    return check_group_sizes(sizes.astype(np.int64), num_experts)


def check_group_sizes(sizes: np.ndarray, num_experts: int, total_rows: int | None = None) -> np.ndarray:
    """Shape, sign and sum checks shared by host and (copied-back) device sizes."""
    if sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D; got shape {sizes.shape}")
    if len(sizes) != num_experts:
        raise ValueError(f"group_sizes has {len(sizes)} entries but b has {num_experts} groups")
    if (sizes < 0).any():
        bad = int(np.flatnonzero(sizes < 0)[0])
        raise ValueError(f"group_sizes must be non-negative; group_sizes[{bad}] = {int(sizes[bad])}")
    if total_rows is not None and int(sizes.sum()) != total_rows:
        raise ValueError(f"sum(group_sizes) = {int(sizes.sum())} but a has {total_rows} rows")
    return sizes


def _check_matrix(v: ArrayView, name: str, ndim: int) -> None:
    if v.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {v.shape}")
    # An empty array has no memory to lay out (a [M, 0] slice keeps its parent's strides).
    if v.size and not v.is_c_contiguous():
        raise ValueError(
            f"{name} must be C-contiguous (row-major); got strides {v.strides} for shape {v.shape}"
        )
    if v.ptr % v.itemsize:
        raise ValueError(
            f"{name} is misaligned: address {v.ptr:#x} is not a multiple of its {v.itemsize}-byte element"
        )


def plan_gmm(
    a: ArrayView,
    b: ArrayView,
    sizes: np.ndarray | None,
    *,
    trans_a: bool,
    trans_b: bool,
    num_experts: int | None = None,
) -> GemmPlan:
    """Validate operand shapes and build the plan on grouped-contiguous rows
    (``sizes=None``: not known yet, all zero)."""
    if trans_a and trans_b:
        raise ValueError("trans_a and trans_b cannot both be set: with trans_a, b holds rows [M, N]")
    _check_matrix(a, "a", 2)
    if trans_a:
        _check_matrix(b, "b", 2)
        if b.shape[0] != a.shape[0]:
            raise ValueError(f"with trans_a, a and b must have the same rows; got a {a.shape}, b {b.shape}")
        if num_experts is None:
            raise ValueError("with trans_a the number of groups comes from group_sizes")
        total, k = a.shape
        n = b.shape[1]
    else:
        _check_matrix(b, "b", 3)
        total, k = a.shape
        num_experts = b.shape[0]
        kb, n = (b.shape[2], b.shape[1]) if trans_b else (b.shape[1], b.shape[2])
        if kb != k:
            layout = "[E, N, K]" if trans_b else "[E, K, N]"
            raise ValueError(f"K mismatch: a is {a.shape} (K={k}) but b {layout} is {b.shape} (K={kb})")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype; got {a.dtype} and {b.dtype}")
    if a.device is not None and b.device is not None and a.device != b.device:
        raise ValueError(f"a is on device {a.device} but b is on device {b.device}")
    if max(total, n, k) >= 2**31:
        raise ValueError("every dimension must be below 2**31 (cuBLAS int sizes)")
    if sizes is None:
        sizes = np.zeros(num_experts, dtype=np.int64)
    else:
        check_group_sizes(sizes, num_experts, total)
    offsets = RowLayout.contiguous().offsets(sizes)
    return GemmPlan(num_experts, total, n, k, trans_a, trans_b, sizes, offsets, np.flatnonzero(sizes))


@functools.lru_cache(maxsize=256)
def shape_plan(num_experts: int, n: int, k: int, trans_b: bool) -> GemmPlan:
    """A plan of shapes only (no rows, no sizes): the column-major mapping of a
    grouped GEMM with N = ``n``, K = ``k``, for callers that make their own
    pointer arrays (the fixed-capacity step). Made once per shape and shared:
    do not write to its arrays."""
    empty = np.zeros(0, np.int64)
    return GemmPlan(num_experts, 0, n, k, False, trans_b, empty, np.zeros(1, np.int64), empty)


# -- capacities ----------------------------------------------------------------


def capacity_for(sizes: np.ndarray, multiple: int = 8) -> int:
    """Per-expert capacity of the padded-capacity layout: the largest group, rounded up."""
    return max(multiple, int(math.ceil(int(sizes.max(initial=0)) / multiple) * multiple))


def choose_chunk_rows(sizes: np.ndarray) -> int:
    """C of the chunk-aligned layout with the least expected time: padded rows
    over the rate batched GEMMs reach with that many rows per problem (CHUNK_TFLOPS)."""
    if int(sizes.sum()) == 0:
        return CHUNK_CANDIDATES[-1]
    # Padded rows for every candidate at once, in one array operation.
    padded = ((sizes[None, :] + _CHUNKS[:, None] - 1) // _CHUNKS[:, None] * _CHUNKS[:, None]).sum(axis=1)
    return int(_CHUNKS[int(np.argmin(padded / _CHUNK_RATES))])


def packed_chunks(sizes: np.ndarray, offsets: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk problems over grouped-contiguous rows: (first row of each chunk, its group).

    A group of m >= chunk rows gets ceil(m / chunk) chunks; when m is not a
    multiple, its last chunk ends exactly at the group's last row and
    overlaps the one before, so no chunk reads or writes another group's
    rows (the overlapping rows are computed twice, with the same inputs).
    Groups of fewer rows than ``chunk`` get no chunk: the caller runs them
    another way.
    """
    big = np.flatnonzero(sizes >= chunk)
    per_group = -(-sizes[big] // chunk)
    groups = np.repeat(big, per_group)
    index = np.arange(len(groups)) - np.repeat(np.cumsum(per_group) - per_group, per_group)
    starts = offsets[groups] + np.minimum(index * chunk, sizes[groups] - chunk)
    return starts.astype(np.int64), groups.astype(np.int64)
