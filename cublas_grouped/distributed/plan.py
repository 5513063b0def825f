"""Who sends what to whom: the expert-parallel dispatch plan, in NumPy (no GPU).

Placement: R ranks, E experts, E % R == 0; rank r owns the contiguous block
of experts ``[r * E/R, (r + 1) * E/R)`` and calls them local experts
``0 .. E/R - 1``.

Send order on every source rank: pairs ``p = t * k + j`` sorted by
(destination rank, expert, token, choice). Because the owner of an expert
grows with its id, that is the pairs sorted by (expert, pair index): the
order :class:`cublas_grouped.distributed.ExpertParallelMoE` builds on the
GPU. Each destination receives, from source 0, then source 1, ..., the rows
of that source's block, already in (local expert, token, choice) order; it
sends the results back in the same order, and the source combines each
token's k rows in choice order.

The helpers :func:`placement`, :func:`send_layout` and :func:`receive_layout`
are what the GPU layer runs on the host (:func:`chunk_layout` too, when it
splits the exchange into chunks of local experts to overlap it with the
experts' compute); :func:`dispatch_model` and
:func:`forward_model` play the whole exchange for faked ranks in NumPy, for
tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Placement",
    "placement",
    "send_order",
    "send_layout",
    "receive_layout",
    "chunk_bounds",
    "ChunkPlan",
    "chunk_layout",
    "RankTraffic",
    "dispatch_model",
    "forward_model",
]


@dataclass(frozen=True)
class Placement:
    """E experts over R ranks in contiguous blocks of ``experts_per_rank``."""

    num_experts: int
    world_size: int

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.world_size

    def owner(self, expert):
        """Rank that holds ``expert`` (works on arrays)."""
        return expert // self.experts_per_rank

    def first_expert(self, rank: int) -> int:
        """Global id of ``rank``'s local expert 0."""
        return rank * self.experts_per_rank


def placement(num_experts: int, world_size: int) -> Placement:
    """Check and build the placement: ``ValueError`` unless ``E % R == 0`` and E >= R >= 1."""
    for name, value in (("num_experts", num_experts), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if num_experts % world_size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by world_size={world_size}: each rank holds "
            "the same number of experts (E / R) in one contiguous block"
        )
    return Placement(int(num_experts), int(world_size))


def send_order(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Pair indices in send order: by (expert, token, choice), hence by destination rank first.

    The key ``expert * P + pair`` is unique, so any sort (stable or not, CPU or GPU) gives this order.
    """
    flat = np.asarray(topk_ids, dtype=np.int64).reshape(-1)
    pairs = flat.size
    return np.argsort(flat * max(pairs, 1) + np.arange(pairs), kind="stable")


def send_layout(counts_per_expert: np.ndarray, where: Placement) -> tuple[np.ndarray, np.ndarray]:
    """(rows sent to each rank [R], their offsets in the send buffer [R + 1]) from per-expert counts [E]."""
    counts = np.asarray(counts_per_expert, dtype=np.int64).reshape(where.world_size, where.experts_per_rank)
    rows = counts.sum(axis=1)
    return rows, np.concatenate([[0], np.cumsum(rows)])


def receive_layout(recv_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a rank receives, from the counts it was sent.

    Parameters
    ----------
    recv_counts : int [R, E/R]: rows for each local expert from each source rank.

    Returns
    -------
    rows_per_source [R], offsets [R + 1] in the receive buffer, and the local
    expert of every received row (int32 [N]), rows in (source, local expert,
    token, choice) order.
    """
    counts = np.asarray(recv_counts, dtype=np.int64)
    rows = counts.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(rows)])
    local = np.tile(np.arange(counts.shape[1], dtype=np.int32), counts.shape[0])
    return rows, offsets, np.repeat(local, counts.reshape(-1))


def chunk_bounds(experts_per_rank: int, chunks: int) -> list[tuple[int, int]]:
    """Local expert ranges ``[lo, hi)`` of the overlap chunks: ``min(chunks, E/R)``
    non-empty ranges as even as integer division makes them, in order. Every
    rank holds E/R experts, so every rank cuts the same ranges."""
    n = min(int(chunks), int(experts_per_rank))
    edges = [c * experts_per_rank // n for c in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of an exchange split by local expert (:func:`chunk_layout`).

    Attributes
    ----------
    experts : (lo, hi), the local experts of the chunk on every rank
    send : per destination d, (row offset, rows) in the send buffer: the rows
        for d's local experts lo .. hi-1 (one contiguous run of the send order)
    recv : per source s, (row offset, rows) in the chunk-major receive buffer
    rows : (start, end) of the chunk in the receive buffer
    local_ids : int32 [end - start], the local expert of each received row
    """

    experts: tuple[int, int]
    send: list
    recv: list
    rows: tuple[int, int]
    local_ids: np.ndarray


def chunk_layout(send_counts: np.ndarray, recv_counts: np.ndarray, chunks: int) -> list[ChunkPlan]:
    """The exchange cut into chunks of local experts, for overlapping it with compute.

    Parameters
    ----------
    send_counts : int [R, E/R], rows this rank sends for each (destination, local expert)
    recv_counts : int [R, E/R], rows it receives for each (source, local expert)
    chunks : how many chunks (see :func:`chunk_bounds`)

    The receive buffer is chunk-major: chunk 0 from source 0, 1, ..., then
    chunk 1, ...; within a chunk, rows are in (source, local expert, token,
    choice) order. So each expert's rows arrive in the same order as without
    chunks (source, then token, then choice), in one chunk, and the expert
    computation sees the same rows per expert. With one chunk this is
    :func:`send_layout` and :func:`receive_layout`.
    """
    send = np.asarray(send_counts, dtype=np.int64)
    recv = np.asarray(recv_counts, dtype=np.int64)
    world, epr = send.shape
    starts = np.concatenate([[0], np.cumsum(send.reshape(-1))])  # send offset of (d, e) at d * epr + e
    plans, at = [], 0
    for lo, hi in chunk_bounds(epr, chunks):
        sends = [(int(starts[d * epr + lo]), int(send[d, lo:hi].sum())) for d in range(world)]
        first, recvs, ids = at, [], []
        for s in range(world):
            rows = int(recv[s, lo:hi].sum())
            recvs.append((at, rows))
            ids.append(np.repeat(np.arange(lo, hi, dtype=np.int32), recv[s, lo:hi]))
            at += rows
        plans.append(ChunkPlan((lo, hi), sends, recvs, (first, at), np.concatenate(ids).astype(np.int32)))
    return plans


@dataclass
class RankTraffic:
    """One rank's part of the exchange (:func:`dispatch_model`).

    Attributes
    ----------
    order : int [P] the rank's pairs in send order
    send_rows : int [R] rows it sends to each rank
    sent_pairs : list over destinations of the pair indices sent there, in order
    recv_counts : int [R, E/R] rows it receives per (source, local expert)
    received : int [N, 4] one line per received row: source rank, source's
        pair index, global expert, local expert; in receive-buffer order
    """

    order: np.ndarray
    send_rows: np.ndarray
    sent_pairs: list
    recv_counts: np.ndarray
    received: np.ndarray


def dispatch_model(ids_per_rank: list[np.ndarray], num_experts: int) -> list[RankTraffic]:
    """The exchange for faked ranks: rank r routes ``ids_per_rank[r]`` (int [T_r, k])."""
    where = placement(num_experts, len(ids_per_rank))
    epr = where.experts_per_rank
    counts = [np.bincount(np.asarray(ids).reshape(-1), minlength=num_experts) for ids in ids_per_rank]
    for r, c in enumerate(counts):
        if c.size != num_experts:
            raise ValueError(f"rank {r} routes to an expert id outside [0, {num_experts})")
    traffic = []
    for r, ids in enumerate(ids_per_rank):
        order = send_order(ids, num_experts)
        rows, offsets = send_layout(counts[r], where)
        sent = [order[offsets[d] : offsets[d + 1]] for d in range(where.world_size)]
        recv_counts = np.stack([c[r * epr : (r + 1) * epr] for c in counts])
        traffic.append(RankTraffic(order, rows, sent, recv_counts, np.zeros((0, 4), np.int64)))
    for d, mine in enumerate(traffic):
        lines = []
        for s, theirs in enumerate(traffic):
            flat = np.asarray(ids_per_rank[s]).reshape(-1)
            for p in theirs.sent_pairs[d]:
                lines.append((s, p, flat[p], flat[p] - where.first_expert(d)))
        mine.received = np.array(lines, dtype=np.int64).reshape(-1, 4)
    return traffic


def forward_model(x_per_rank, ids_per_rank, weights_per_rank, w1, w2, expert_fn=None) -> list[np.ndarray]:
    """The distributed layer played in float64 for faked ranks; returns each rank's [T_r, H] output.

    ``w1`` [E, H, 2I] and ``w2`` [E, I, H] hold all experts; rank d uses only
    its block, on rows that travelled as the plan says. ``expert_fn(x, e)``
    replaces the gated SiLU expert when given.
    """
    num_experts = np.asarray(w1).shape[0]
    traffic = dispatch_model(ids_per_rank, num_experts)
    where = placement(num_experts, len(ids_per_rank))
    w1, w2 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)

    def silu_expert(rows, e):
        h = rows @ w1[e]
        gate, up = np.split(h, 2, axis=-1)
        return (gate / (1 + np.exp(-gate)) * up) @ w2[e]

    expert_fn = expert_fn or silu_expert
    # Each destination computes its received rows, in receive order, with its own experts only.
    results = []
    for d, mine in enumerate(traffic):
        out = np.zeros((len(mine.received), np.asarray(x_per_rank[0]).shape[1]))
        for i, (s, p, e, local) in enumerate(mine.received):
            assert where.owner(e) == d and 0 <= local < where.experts_per_rank
            k = np.asarray(ids_per_rank[s]).shape[1]
            out[i] = expert_fn(np.asarray(x_per_rank[s], np.float64)[p // k][None], e)[0]
        results.append(out)
    # Back to the sources: rank s's block in d's results sits at d's receive offset for s.
    outputs = []
    for s, mine in enumerate(traffic):
        ids = np.asarray(ids_per_rank[s])
        tokens, k = ids.shape
        back = np.zeros((tokens * k, np.asarray(x_per_rank[s]).shape[1]))
        for d, theirs in enumerate(traffic):
            _, offsets, _ = receive_layout(theirs.recv_counts)
            back[mine.sent_pairs[d]] = results[d][offsets[s] : offsets[s + 1]]
        w = np.ones((tokens, k)) if weights_per_rank is None else np.asarray(weights_per_rank[s], np.float64)
        out = np.zeros((tokens, back.shape[1]))
        for j in range(k):  # the fixed combine order: choice 0, 1, ..., k-1
            out += w[:, j, None] * back[np.arange(tokens) * k + j]
        outputs.append(out)
    return outputs
