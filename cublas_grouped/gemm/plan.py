"""Host-side planning of a grouped GEMM: validate shapes, compute offsets, and map
row-major problems onto cuBLAS's column-major calls.

Everything here is plain NumPy and runs before any GPU work. This is the one
place where the row-major (NumPy) semantics of the API meet cuBLAS's
column-major convention: a row-major ``Y = X @ W`` is computed as the
column-major ``Y^T = W^T @ X^T``, which is the same memory, so nothing is
transposed or copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.arrays import ArrayView
from ..runtime.cublas import Op

__all__ = ["GemmPlan", "CublasDims", "plan_gmm", "host_group_sizes", "check_group_sizes"]


@dataclass(frozen=True)
class CublasDims:
    """One column-major cuBLAS problem: C = op(A) op(B), A = weights side, B = rows side."""

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
    """Shapes and offsets of one ``gmm`` call.

    Normal mode: ``out[o_e:o_e+m_e] = a[o_e:o_e+m_e] @ b[e]`` (``b[e].T`` with
    ``trans_b``). K-grouped mode (``trans_a``): ``out[e] = a_e.T @ b_e`` where
    ``a_e``/``b_e`` are the rows of group e of ``a`` [M, K] and ``b`` [M, N].
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
    """Validate operand shapes and build the plan (``sizes=None``: not known yet, all zero)."""
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
    offsets = np.zeros(num_experts + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return GemmPlan(num_experts, total, n, k, trans_a, trans_b, sizes, offsets, np.flatnonzero(sizes))
