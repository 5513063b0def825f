"""How much a fixed-capacity step needs: rows per chunk, the most chunks any
routing of T tokens can need, and the buffers that hold every step up to a
token capacity (:mod:`cublas_grouped.moe.fixed_capacity` runs the steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..gemm.backends import hopper
from ..gemm.plan import GemmPlan, shape_plan
from . import kernels as K
from .checks import LayerShape

__all__ = [
    "CHUNK_ROWS",
    "MAX_FIXED_CAPACITY_TOKENS",
    "INT32_LIMIT",
    "ChunkCapacity",
    "ChunkBuffers",
    "chunk_rows",
    "max_chunks",
    "chunk_gemm_plan",
    "cached_chunk_buffers",
]

# Rows per chunk of a fixed-capacity step with many thin experts (see chunk_rows).
CHUNK_ROWS = 16
# Kernel arguments and row indices are int32.
INT32_LIMIT = 2**31
# Most tokens of one fixed-capacity step. Sizing walks every T up to the
# capacity (about 1.5 us each); fixed capacity is for decode and small
# prefill chunks, far below this.
MAX_FIXED_CAPACITY_TOKENS = 2**18


def chunk_rows(shape: LayerShape, tokens: int) -> int:
    """Rows per chunk (C) for a step of ``tokens`` tokens.

    Few, large experts (Mixtral: mean rows per expert ``T*k/E`` above half
    a chunk, i.e. ``T*k > 8*E``) get one T-row chunk each, so no expert's
    weights are read twice. Many, thin experts (Qwen3, DeepSeek-V3) get
    ``min(T, 16)``-row chunks: 16 is the row tile cuBLAS picks for such thin
    problems on Hopper, and T-row chunks would compute mostly padding
    (measured: 4-6% faster at T=64).
    """
    if tokens * shape.top_k > shape.num_experts * CHUNK_ROWS // 2:
        return max(1, tokens)
    return max(1, min(tokens, CHUNK_ROWS))


def max_chunks(shape: LayerShape, tokens: int) -> int:
    """The most chunks any routing of ``tokens`` tokens needs (exact).

    With P = T*k pairs, A = min(E, P) experts that can be active and C
    rows per chunk: each active expert's first chunk costs at least one
    row, every further chunk C more, and no expert has more than T rows
    (repeats share a row), so at most ``A + (P - A) // C`` chunks and at
    most ``A * ceil(T / C)``. Routings reach the smaller of the two.
    """
    pairs, chunk = tokens * shape.top_k, chunk_rows(shape, tokens)
    active = min(shape.num_experts, pairs)
    return min(active + (pairs - active) // chunk, active * -(-tokens // chunk))


def chunk_gemm_plan(shape: LayerShape, n: int, k: int) -> GemmPlan:
    """Shape-only plan: the column-major mapping of a GEMM with N=n, K=k (made once per shape)."""
    return shape_plan(shape.num_experts, n, k, shape.trans_b)


@dataclass(frozen=True)
class ChunkCapacity:
    """What a fixed-capacity step's buffers hold: the largest need over every
    token count up to ``max_tokens`` (the need is not monotonic in T, because
    the chunk size changes with T)."""

    max_tokens: int
    pairs: int  # max_tokens * top_k
    chunks: int  # most chunks (problems of the batched GEMM) of any step
    rows: int  # most rows (chunks * chunk rows) of any step
    chunk_rows: int  # largest chunk (the scratch output's rows)

    @classmethod
    def of(cls, shape: LayerShape, max_tokens: int) -> ChunkCapacity:
        """Capacity for every step of 1..``max_tokens`` tokens.

        ``ValueError`` above :data:`MAX_FIXED_CAPACITY_TOKENS` tokens or past
        the int32 limits of the kernels, before any allocation.
        """
        pairs = max_tokens * shape.top_k
        if max_tokens > MAX_FIXED_CAPACITY_TOKENS or pairs >= INT32_LIMIT:
            raise ValueError(
                f"max_tokens={max_tokens} is too large: a fixed-capacity step takes at most "
                f"{MAX_FIXED_CAPACITY_TOKENS} tokens and fewer than 2**31 (token, expert) pairs"
            )
        chunks = rows = largest = 0
        for tokens in range(1, max_tokens + 1):  # every T: the need is not monotonic in T
            chunk, step_chunks = chunk_rows(shape, tokens), max_chunks(shape, tokens)
            chunks = max(chunks, step_chunks)
            rows = max(rows, step_chunks * chunk)
            largest = max(largest, chunk)
        if rows >= INT32_LIMIT:
            raise ValueError(f"max_tokens={max_tokens} needs {rows} rows; rows must stay below 2**31")
        return cls(max_tokens, pairs, chunks, rows, largest)

    @classmethod
    def kernel_rows(cls, shape: LayerShape, max_tokens: int) -> ChunkCapacity:
        """Capacity for steps that run only on the Hopper kernel: T*k rows, no
        chunk (``chunks == 0``), so any T up to the limit is cheap to size."""
        pairs = max_tokens * shape.top_k
        if max_tokens > MAX_FIXED_CAPACITY_TOKENS or pairs >= INT32_LIMIT:
            raise ValueError(
                f"max_tokens={max_tokens} is too large: a fixed-capacity step takes at most "
                f"{MAX_FIXED_CAPACITY_TOKENS} tokens and fewer than 2**31 (token, expert) pairs"
            )
        return cls(max_tokens, pairs, 0, pairs, 0)

    def check_kernel_step(self, shape: LayerShape, tokens: int) -> None:
        """Refuse a kernel step the buffers cannot hold: T*k rows (an internal error)."""
        if tokens * shape.top_k > min(self.pairs, self.rows):
            raise RuntimeError(
                f"a step of {tokens} tokens needs {tokens * shape.top_k} rows but the buffers hold "
                f"{min(self.pairs, self.rows)}"
            )

    def check_step(self, shape: LayerShape, tokens: int) -> None:
        """Refuse a chunked step the buffers cannot hold (an internal error: never truncate)."""
        pairs, chunks, chunk = tokens * shape.top_k, max_chunks(shape, tokens), chunk_rows(shape, tokens)
        rows = chunks * chunk
        if pairs > self.pairs or chunks > self.chunks or rows > self.rows or chunk > self.chunk_rows:
            raise RuntimeError(
                f"a step of {tokens} tokens needs {pairs} pairs, {chunks} chunks, {rows} rows "
                f"and {chunk}-row chunks but the buffers hold {self.pairs}, {self.chunks}, "
                f"{self.rows} and {self.chunk_rows}"
            )


@dataclass
class ChunkBuffers:
    """Every intermediate of a fixed-capacity step, sized by a :class:`ChunkCapacity`."""

    capacity: ChunkCapacity
    block_counts: object
    counts: object
    offsets: object
    pair_to_row: object
    row_to_pair: object
    row_weights: object  # float32 [rows]: each row's routing weight, for GEMM 2's epilogue (kernel steps)
    rows: object
    h: object
    act: object
    y: object
    scratch: object
    pointers: object  # uint64 [2, 3, chunks]: (GEMM 1, GEMM 2) x (rows, weights, out)
    schedule: object  # int32: the Hopper kernel's offsets and tile counter (SM 9.0 steps), owned so graphs keep them
    # uint32 [1], zero between launches: the last-block ticket of the kernel
    # steps' histogram-and-schedule launch (moe/placement_launches.py).
    ticket: object
    # Prepared launches of kernel steps on these buffers (moe.kernel_step), by
    # T and the weights: they hold these buffers' addresses, so they live here.
    launches: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def allocate(cls, shape: LayerShape, capacity: ChunkCapacity) -> ChunkBuffers:
        """Allocate every buffer on the current device, in ``shape.dtype``."""
        import cupy

        rows, i32, dtype = capacity.rows, cupy.int32, shape.dtype
        return cls(
            capacity,
            cupy.empty((K.num_pair_blocks(capacity.pairs), shape.num_experts), dtype=i32),
            cupy.empty(shape.num_experts, dtype=i32),
            cupy.empty(shape.num_experts + 1, dtype=i32),
            cupy.empty(capacity.pairs, dtype=i32),
            cupy.empty(rows, dtype=i32),
            cupy.empty(rows, dtype=cupy.float32),
            cupy.empty((rows, shape.hidden), dtype=dtype),
            cupy.empty((rows, shape.width), dtype=dtype),
            cupy.empty((rows, shape.inter), dtype=dtype),
            cupy.empty((rows, shape.hidden), dtype=dtype),
            cupy.empty((capacity.chunk_rows, max(shape.width, shape.hidden)), dtype=dtype),
            cupy.empty((2, 3, capacity.chunks), dtype=cupy.uint64),
            cupy.empty(hopper.schedule_ints(shape.num_experts), dtype=i32),
            cupy.zeros(1, dtype=cupy.uint32),
        )

    @property
    def nbytes(self) -> int:
        """GPU memory of every buffer."""
        return sum(
            getattr(self, f.name).nbytes for f in fields(self) if f.name not in ("capacity", "launches")
        )


def cached_chunk_buffers(res, shape: LayerShape, tokens: int, *, kernel_only: bool = False) -> ChunkBuffers:
    """Chunk buffers kept on the stream's resources for ``moe_forward(fixed_capacity=True)``.

    One set per layer shape (dtype included) and stream, sized for every step
    up to the largest T seen, rounded up to a power of two so that slowly
    rising decode batch sizes reallocate only a few times. ``kernel_only``:
    a separate set for steps on the Hopper kernel (:meth:`ChunkCapacity.kernel_rows`:
    T*k rows, where chunks of prefill-sized steps would need many times that).
    """
    key = ("kernel-rows" if kernel_only else "chunk-buffers", shape)
    cached = res.buffers.get(key)
    if cached is None or cached.capacity.max_tokens < tokens:
        max_tokens = max(tokens, min(1 << (tokens - 1).bit_length(), MAX_FIXED_CAPACITY_TOKENS))
        capacity = (ChunkCapacity.kernel_rows if kernel_only else ChunkCapacity.of)(shape, max_tokens)
        cached = ChunkBuffers.allocate(shape, capacity)
        res.buffers[key] = cached
    return cached
