"""Choose the GEMM algorithm for one call: built-in rules, refined by a tuning table.

The rules encode what was measured on an H100 (../shared/DESIGN.md):
``cublasGemmGroupedBatchedEx`` is steady but slow for large problems; a loop of
``cublasGemmEx`` is near peak when experts are few and large; one
``cublasGemmBatchedEx`` over equal row chunks wins on many mid-sized experts.
A tuning table measured on the actual GPU (``python -m cublas_grouped.tune``)
overrides the rules for shapes it covers: the nearest measured shape (in log
space over experts, active experts, rows per expert, N and K) decides.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._config import Algorithm
from ._device import DeviceInfo

__all__ = [
    "ProblemStats",
    "TuningTable",
    "select_algorithm",
    "best_measured",
    "choose_layer_algorithms",
    "packed_chunks",
    "algorithms_on_layout_of",
    "measured_times",
    "allowed_algorithms",
    "choose_chunk_rows",
    "tuning_table_path",
    "load_tuning_table",
]

CHUNK_CANDIDATES = (256, 128, 64, 32)
# bf16 TFLOP/s of one cublasGemmBatchedEx over chunks of that many rows, at
# 256-1024 rows per expert (H100, cuBLAS 13.1, 2026-11-26: Qwen3 and
# DeepSeek-V3 expert shapes, no padding; see docs/design-notes.md). Thin
# chunks leave the row tile mostly empty, so padding often costs less.
CHUNK_TFLOPS = {256: 640.0, 128: 560.0, 64: 370.0, 32: 240.0}
_CHUNKS = np.array(CHUNK_CANDIDATES, dtype=np.int64)
_CHUNK_RATES = np.array([CHUNK_TFLOPS[c] for c in CHUNK_CANDIDATES])
# PADDED_STRIDED is taken from a table only while it computes at most this
# many times the real rows (tables are measured on even loads).
MAX_STRIDED_PADDING = 1.5
# A tuning entry farther than this (sum of squared log2 ratios) does not apply.
MAX_TABLE_DISTANCE = 2.0


@dataclass(frozen=True)
class ProblemStats:
    """What the choice depends on, cheap to compute from the host row counts."""

    num_experts: int
    active_experts: int
    total_rows: int
    max_rows: int
    n: int
    k: int
    dtype: str = "bfloat16"

    @property
    def padding_ratio(self) -> float:
        """Rows the padded strided layout computes over the rows there are."""
        return self.num_experts * self.max_rows / self.total_rows if self.total_rows else float("inf")

    @property
    def mean_rows(self) -> float:
        return self.total_rows / self.active_experts if self.active_experts else 0.0

    @classmethod
    def from_sizes(cls, sizes: np.ndarray, n: int, k: int, dtype: str) -> ProblemStats:
        active = int(np.count_nonzero(sizes))
        return cls(len(sizes), active, int(sizes.sum()), int(sizes.max(initial=0)), n, k, dtype)

    @property
    def skew(self) -> float:
        """Busiest expert's rows over the mean (1 for an even load)."""
        mean = self.mean_rows
        return max(self.max_rows / mean, 1.0) if mean else 1.0

    def features(self) -> np.ndarray:
        """log2 of (experts, active experts, mean rows + 1, N, K, skew): what the
        table's distance is measured on."""
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


@dataclass
class TuningTable:
    """Measured times per shape for one (GPU name, cuBLAS version)."""

    gpu: str
    cublas_version: int
    entries: list[dict]

    def __post_init__(self):
        grouped: dict[str, tuple[list, list]] = {}
        for entry in self.entries:
            active = entry["active_experts"]
            total = int(round(entry["mean_rows"] * active))
            # Tables written before max_rows was recorded count as even loads.
            max_rows = entry.get("max_rows", int(math.ceil(entry["mean_rows"])))
            stats = ProblemStats(
                entry["num_experts"], active, total, max_rows, entry["n"], entry["k"], entry["dtype"]
            )
            times = {Algorithm(name): t for name, t in entry["times_ms"].items() if t is not None}
            feats, items = grouped.setdefault(entry["dtype"], ([], []))
            feats.append(stats.features())
            items.append(times)
        self._by_dtype = {d: (np.array(f), i) for d, (f, i) in grouped.items()}

    def nearest(self, stats: ProblemStats) -> dict[Algorithm, float] | None:
        """Measured times (ms per algorithm) of the closest shape, or None if none is close."""
        found = self._by_dtype.get(stats.dtype)
        if found is None:
            return None
        feats, items = found
        dist = ((feats - stats.features()) ** 2).sum(axis=1)
        best = int(np.argmin(dist))
        return items[best] if dist[best] <= MAX_TABLE_DISTANCE else None

    @classmethod
    def load(cls, path: Path) -> TuningTable:
        data = json.loads(Path(path).read_text())
        return cls(data["gpu"], int(data["cublas_version"]), list(data["entries"]))

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"gpu": self.gpu, "cublas_version": self.cublas_version, "entries": self.entries}, indent=1
            )
        )
        os.replace(tmp, path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def tuning_table_path(device: DeviceInfo, user: bool = True) -> Path:
    """Where the table for ``device`` lives.

    ``user=True``: ``$CUBLAS_GROUPED_TUNING_DIR`` or ``~/.cache/cublas_grouped/tuning``
    (what ``python -m cublas_grouped.tune`` writes). ``user=False``: the tables
    shipped inside the package.
    """
    name = f"{_slug(device.name)}-cublas{device.cublas_version}.json"
    if user:
        root = os.environ.get("CUBLAS_GROUPED_TUNING_DIR")
        base = Path(root) if root else Path.home() / ".cache" / "cublas_grouped" / "tuning"
    else:
        base = Path(__file__).resolve().parent / "tuning"
    return base / name


_tables: dict[tuple[str, int], TuningTable | None] = {}


def load_tuning_table(device: DeviceInfo) -> TuningTable | None:
    """The user's table for this GPU and cuBLAS, else the shipped one, else None (cached)."""
    key = (device.name, device.cublas_version)
    if key not in _tables:
        table = None
        for user in (True, False):
            path = tuning_table_path(device, user)
            if path.is_file():
                try:
                    table = TuningTable.load(path)
                    break
                except (ValueError, KeyError, OSError):
                    continue  # a broken table is ignored, not trusted
        _tables[key] = table
    return _tables[key]


def allowed_algorithms(
    device: DeviceInfo, *, padded_layouts: bool, packed_chunks: bool = False
) -> list[Algorithm]:
    """Algorithms that can run here.

    ``padded_layouts``: the rows are (or will be) laid out by the MoE layer,
    so CHUNKED_BATCHED and PADDED_STRIDED can run. ``packed_chunks``: rows are
    packed (``gmm``) but CHUNKED_BATCHED can still run, with overlapping last
    chunks (not for the K-grouped product).
    """
    allowed = [Algorithm.SEQUENTIAL]
    if device.supports_grouped_gemm():
        allowed.insert(0, Algorithm.CUBLAS_GROUPED)
    if padded_layouts or packed_chunks:
        allowed.append(Algorithm.CHUNKED_BATCHED)
    if padded_layouts:
        allowed.append(Algorithm.PADDED_STRIDED)
    return allowed


def _rule(stats: ProblemStats, allowed: list[Algorithm]) -> Algorithm:
    mean = stats.mean_rows
    if Algorithm.SEQUENTIAL in allowed and stats.active_experts <= 16 and mean >= 512:
        return Algorithm.SEQUENTIAL  # few large GEMMs: each runs near peak, few launches
    if Algorithm.CHUNKED_BATCHED in allowed and mean >= 64:
        return Algorithm.CHUNKED_BATCHED
    if Algorithm.CUBLAS_GROUPED in allowed:
        return Algorithm.CUBLAS_GROUPED
    return Algorithm.SEQUENTIAL


def select_algorithm(
    stats: ProblemStats,
    device: DeviceInfo,
    *,
    padded_layouts: bool = False,
    table: TuningTable | None | bool = True,
    packed_chunks: bool = False,
) -> Algorithm:
    """The algorithm to run for ``stats`` on ``device``.

    ``table=True`` loads the tuning table for the device (if any); pass a
    :class:`TuningTable`, or ``None``/``False`` for the built-in rules only.
    """
    allowed = allowed_algorithms(device, padded_layouts=padded_layouts, packed_chunks=packed_chunks)
    best = best_measured(stats, device, allowed, table)
    return best if best is not None else _rule(stats, allowed)


def measured_times(
    stats: ProblemStats, device: DeviceInfo, candidates, table: TuningTable | None | bool = True
) -> dict[Algorithm, float] | None:
    """Times (ms) of ``candidates`` at the tuning table's nearest shape, or None
    when no table covers ``stats``."""
    if table is True:
        table = load_tuning_table(device)
    if not table or not stats.active_experts:
        return None
    measured = table.nearest(stats)
    if measured is None:
        return None
    times = {alg: t for alg, t in measured.items() if alg in candidates}
    # Padding every expert to the busiest one costs far more on a skewed load
    # than the table's (mostly even) measurements show.
    if stats.padding_ratio > MAX_STRIDED_PADDING:
        times.pop(Algorithm.PADDED_STRIDED, None)
    return times or None


def best_measured(
    stats: ProblemStats, device: DeviceInfo, candidates, table: TuningTable | None | bool = True
) -> Algorithm | None:
    """Fastest of ``candidates`` in the tuning table's nearest shape, or None."""
    times = measured_times(stats, device, candidates, table)
    return min(times, key=times.get) if times else None


def algorithms_on_layout_of(first: Algorithm) -> tuple[Algorithm, ...]:
    """Algorithms that can run on the row layout made for ``first``
    (the same sets as :meth:`RowLayout.algorithms`)."""
    if first is Algorithm.PADDED_STRIDED:
        return (Algorithm.PADDED_STRIDED, Algorithm.SEQUENTIAL)
    if first is Algorithm.CHUNKED_BATCHED:
        return (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL, Algorithm.CHUNKED_BATCHED)
    return (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL)


_layer_choices: dict[tuple, tuple[Algorithm, Algorithm]] = {}


def choose_layer_algorithms(
    sizes: np.ndarray, first_nk: tuple[int, int], second_nk: tuple[int, int], dtype: str, device: DeviceInfo
) -> tuple[Algorithm, Algorithm]:
    """AUTO for an expert layer's two GEMMs on one row layout: (first, second).

    The layout is made for the first GEMM's algorithm, so the pair is chosen
    together: the first algorithm's measured time plus the best measured time
    of any algorithm that runs on its layout. Without table entries for both
    shapes, the built-in rules pick the first and the second follows it.

    Decisions are memoized on a coarse key (log2 of active experts, mean rows
    and skew in quarter steps), because this runs after the one host
    synchronization of each layer call, where host time is GPU idle time.
    """
    active = int(np.count_nonzero(sizes))
    total, largest = int(sizes.sum()), int(sizes.max(initial=0))
    first_stats = ProblemStats(len(sizes), active, total, largest, *first_nk, dtype)
    quarter = lambda v: round(4 * math.log2(max(v, 1e-9)))  # noqa: E731
    key = (
        device.name,
        device.cublas_version,
        dtype,
        len(sizes),
        first_nk,
        second_nk,
        quarter(max(active, 1)),
        quarter(first_stats.mean_rows + 1),
        quarter(first_stats.skew),
        first_stats.padding_ratio > MAX_STRIDED_PADDING,
    )
    found = _layer_choices.get(key)
    if found is not None:
        return found
    allowed = allowed_algorithms(device, padded_layouts=True)
    first = measured_times(first_stats, device, allowed)
    second = None
    if first:
        second_stats = ProblemStats(len(sizes), active, total, largest, *second_nk, dtype)
        second = measured_times(second_stats, device, allowed)
    if first and second:

        def on_layout(a: Algorithm) -> tuple[float, Algorithm]:
            options = [(second[b], b) for b in algorithms_on_layout_of(a) if b in second]
            return min(options) if options else (math.inf, a)

        choice = min(first, key=lambda a: first[a] + on_layout(a)[0])
        found = (choice, on_layout(choice)[1] if on_layout(choice)[0] < math.inf else choice)
    else:
        choice = _rule(first_stats, allowed) if not first else min(first, key=first.get)
        found = (choice, choice)
    if len(_layer_choices) > 4096:
        _layer_choices.clear()
    _layer_choices[key] = found
    return found


def choose_chunk_rows(sizes: np.ndarray) -> int:
    """Chunk size with the least expected time: padded rows over the rate
    batched GEMMs reach with that many rows per problem (CHUNK_TFLOPS)."""
    if int(sizes.sum()) == 0:
        return CHUNK_CANDIDATES[-1]
    # Padded rows for every candidate at once, in one array operation.
    padded = ((sizes[None, :] + _CHUNKS[:, None] - 1) // _CHUNKS[:, None] * _CHUNKS[:, None]).sum(axis=1)
    return int(_CHUNKS[int(np.argmin(padded / _CHUNK_RATES))])


def packed_chunks(sizes: np.ndarray, offsets: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk problems over packed rows: (first row of each chunk, its group).

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


def padded_rows(sizes: np.ndarray, align: int) -> int:
    """Rows of the layout where each group starts at a multiple of ``align``."""
    return int((-(-sizes // align) * align).sum())


def capacity_for(sizes: np.ndarray, multiple: int = 8) -> int:
    """Per-expert capacity of the padded strided layout: the largest group, rounded up."""
    return max(multiple, int(math.ceil(int(sizes.max(initial=0)) / multiple) * multiple))
