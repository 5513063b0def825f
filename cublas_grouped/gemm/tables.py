"""Tuning tables: measured times per shape, their files, and which table applies.

A table holds, for one (GPU name, cuBLAS version, SM version), the time of
each algorithm at a set of shapes (``python -m cublas_grouped.tune`` writes
them). The nearest measured shape, in log space over experts, active experts,
rows per expert, N, K and skew (:meth:`ProblemStats.features`), answers for a
shape it covers. :func:`tuning_table_for` walks a fallback chain (the user's
exact table, the shipped exact one, the same GPU with the nearest cuBLAS, the
same architecture) and says why it took the one it took. What to do with the
times is :mod:`.select`'s business; measuring on first sight is :mod:`.autotune`'s.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.device import DeviceInfo
from .config import Algorithm
from .plan import ProblemStats

__all__ = [
    "TuningTable",
    "MAX_TABLE_DISTANCE",
    "MAX_TABLE_BYTES",
    "MAX_TABLE_ENTRIES",
    "MAX_TABLE_COUNT",
    "MAX_TIME_MS",
    "SHIPPED_TUNING_DIR",
    "AUTOTUNE_SUFFIX",
    "infer_sm",
    "file_slug",
    "user_tuning_dir",
    "tuning_table_path",
    "tuning_table_for",
    "is_close_table",
    "load_tuning_table",
    "forget_tables",
    "entry_problem",
    "warn_ignored_file",
]

# A tuning entry farther than this (sum of squared log2 ratios) does not apply.
MAX_TABLE_DISTANCE = 2.0
# The tables that ship inside the package (one file per GPU name and cuBLAS version).
SHIPPED_TUNING_DIR = Path(__file__).resolve().parent.parent / "tuning"
# Files of measurements made on first sight (.autotune): never a fallback table.
AUTOTUNE_SUFFIX = ".autotune.json"
# Bounds of the table schema (:meth:`TuningTable.load`): a file larger than
# MAX_TABLE_BYTES is not read (the shipped tables are ~100 kB, AUTO's files grow
# by at most 32 entries per process); counts and sizes stay below 2**31, the
# bound of every dimension cuBLAS takes; a time is at most MAX_TIME_MS.
MAX_TABLE_BYTES = 16 * 2**20
MAX_TABLE_ENTRIES = 100_000
MAX_TABLE_COUNT = 2**31 - 1
MAX_TIME_MS = 1e7
_MAX_NAME_CHARS = 256
# Hopper parts whose tables may lack ``sm`` (written before it was recorded).
_HOPPER_NAME = re.compile(r"\bG?H(100|200|800|20)\b")


def infer_sm(gpu: str) -> tuple[int, int] | None:
    """SM version of a GPU known by name alone (the Hopper parts), else None.

    Tables written before ``sm`` was recorded get their architecture this way;
    any other old table counts as unknown architecture.
    """
    return (9, 0) if _HOPPER_NAME.search(gpu) else None


def _parse_sm(value, gpu: str) -> tuple[int, int] | None:
    if value is None:
        return infer_sm(gpu)
    try:
        major, minor = (int(v) for v in (value.split(".") if isinstance(value, str) else value))
    except (TypeError, ValueError, OverflowError):
        major = minor = -1
    if not (0 <= major < 100 and 0 <= minor < 100):
        raise ValueError(f"sm must be [major, minor] like [9, 0]; got {str(value)[:40]!r}")
    return (major, minor)


@dataclass
class TuningTable:
    """Measured times per shape for one (GPU name, cuBLAS version, SM version).

    ``sm`` is the architecture the table was measured on, ``(9, 0)`` for
    Hopper; ``None`` reads it from the GPU name where that is an H100/H200 class
    part, else leaves it unknown (such a table is never a same-architecture
    fallback).
    """

    gpu: str
    cublas_version: int
    entries: list[dict]
    sm: tuple[int, int] | None = None

    def __post_init__(self):
        self.sm = _parse_sm(self.sm, self.gpu)
        grouped: dict[str, tuple[list, list]] = {}
        for entry in self.entries:
            active = entry["active_experts"]
            total = int(round(entry["mean_rows"] * active))
            # Tables written before max_rows was recorded count as even loads.
            max_rows = entry.get("max_rows", int(math.ceil(entry["mean_rows"])))
            stats = ProblemStats(
                entry["num_experts"], active, total, max_rows, entry["n"], entry["k"], entry["dtype"]
            )
            times = {Algorithm(name): float(t) for name, t in entry["times_ms"].items() if t is not None}
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
        """Read a table; a malformed, damaged or hostile file raises ValueError naming
        it and what is wrong (``OSError`` when it cannot be read); nothing else escapes.

        The file is at most ``MAX_TABLE_BYTES`` of JSON, and every entry is checked (:func:`entry_problem`), so that a
        damaged file cannot steer AUTO with, say, a zero or negative time, nor
        a huge number overflow the distance computation.
        """
        data = _read_json(Path(path))
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise ValueError(f"{path} is not a tuning table (no list of entries)")
        gpu, version = data.get("gpu"), _count(data.get("cublas_version"), 0)
        if not isinstance(gpu, str) or len(gpu) > _MAX_NAME_CHARS or version is None or version >= 10**8:
            raise ValueError(
                f"{path} is not a tuning table (gpu must be a string of at most {_MAX_NAME_CHARS} "
                "characters, cublas_version an int below 10**8)"
            )
        if len(data["entries"]) > MAX_TABLE_ENTRIES:
            raise ValueError(f"{path} has {len(data['entries'])} entries, over {MAX_TABLE_ENTRIES}")
        for i, entry in enumerate(data["entries"]):
            problem = entry_problem(entry)
            if problem is not None:
                raise ValueError(f"{path}: entry {i} {problem}")
        try:
            return cls(gpu, version, data["entries"], data.get("sm"))
        except (ValueError, TypeError, KeyError, OverflowError) as exc:  # whatever entry_problem let by
            raise ValueError(f"{path}: {exc}") from None

    def to_json(self) -> dict:
        """The table as written to disk."""
        doc = {"gpu": self.gpu, "cublas_version": self.cublas_version}
        if self.sm is not None:
            doc["sm"] = list(self.sm)
        doc["entries"] = self.entries
        return doc

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file in the same folder, then a rename, so a
        reader (or a second writer) never sees half a table."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _read_json(path: Path):
    """The JSON document in ``path``: at most ``MAX_TABLE_BYTES`` of UTF-8. (NaN and
    Infinity parse, as Python's json allows; the range checks refuse them.)"""
    with open(path, "rb") as f:
        raw = f.read(MAX_TABLE_BYTES + 1)
    if len(raw) > MAX_TABLE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_TABLE_BYTES} bytes, the limit for a tuning table")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
        raise ValueError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def _count(value, low: int, high: int = MAX_TABLE_COUNT) -> int | None:
    """``value`` when it is an int (not a bool) in ``[low, high]``, else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    return value if ok else None


def _time(value) -> bool:
    """Whether ``value`` can be a measured time: a number of ms in (0, MAX_TIME_MS], or None (not measured)."""
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_TIME_MS


def entry_problem(entry) -> str | None:
    """What is wrong with one table entry (None when nothing is): fields missing,
    of the wrong type or out of range (counts and sizes in ``[0, MAX_TABLE_COUNT]``),
    an unknown algorithm, a time that is not a positive number of milliseconds
    up to ``MAX_TIME_MS`` (or null), names longer than 256 characters."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    experts = _count(entry.get("num_experts"), 1)
    if experts is None or _count(entry.get("active_experts"), 0) is None or entry["active_experts"] > experts:
        return f"needs num_experts >= 1 (at most {MAX_TABLE_COUNT}) and 0 <= active_experts <= num_experts"
    if _count(entry.get("n"), 1) is None or _count(entry.get("k"), 1) is None:
        return f"needs n and k >= 1 (at most {MAX_TABLE_COUNT})"
    rows = entry.get("mean_rows")
    if not isinstance(rows, (int, float)) or isinstance(rows, bool) or not 0 <= rows <= MAX_TABLE_COUNT:
        return f"has mean_rows {repr(rows)[:40]}; it must be a number in [0, {MAX_TABLE_COUNT}]"
    if "max_rows" in entry and _count(entry["max_rows"], 0) is None:
        return f"has max_rows {repr(entry['max_rows'])[:40]}; it must be an int in [0, {MAX_TABLE_COUNT}]"
    dtype, layout = entry.get("dtype"), entry.get("layout", "")
    if not isinstance(dtype, str) or len(dtype) > _MAX_NAME_CHARS:
        return "needs a dtype name"
    if not isinstance(layout, str) or len(layout) > _MAX_NAME_CHARS:
        return "has a layout that is not a short name"
    times = entry.get("times_ms")
    if not isinstance(times, dict):
        return "needs times_ms, an object of algorithm -> milliseconds"
    known = {a.value for a in Algorithm} - {Algorithm.AUTO.value}
    for name, value in times.items():
        if name not in known:
            return f"times an unknown algorithm {name[:40]!r}"
        if not _time(value):
            return (
                f"has a time of {repr(value)[:40]} ms for {name}; it must be in (0, {MAX_TIME_MS:g}] or null"
            )
    return None


def file_slug(text: str) -> str:
    """``text`` as part of a file name: lower case, other runs of characters as one ``-``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def user_tuning_dir() -> Path:
    """``$CUBLAS_GROUPED_TUNING_DIR``, else ``~/.cache/cublas_grouped/tuning``: where
    ``python -m cublas_grouped.tune`` and AUTO's measurements write."""
    root = os.environ.get("CUBLAS_GROUPED_TUNING_DIR")
    return Path(root) if root else Path.home() / ".cache" / "cublas_grouped" / "tuning"


def tuning_table_path(device: DeviceInfo, user: bool = True) -> Path:
    """Where the exact table for ``device`` (its GPU name and cuBLAS version) lives.

    ``user=True``: in :func:`user_tuning_dir` (what ``python -m cublas_grouped.tune``
    writes). ``user=False``: among the tables shipped inside the package.
    """
    name = f"{file_slug(device.name)}-cublas{device.cublas_version}.json"
    return (user_tuning_dir() if user else SHIPPED_TUNING_DIR) / name


_warned_files: set[tuple[str, str]] = set()


def warn_ignored_file(path: Path, problem: str) -> None:
    """One ``RuntimeWarning`` per file and problem: the file is damaged and ignored."""
    if (str(path), problem) not in _warned_files:
        _warned_files.add((str(path), problem))
        what = problem if str(path) in problem else f"{path}: {problem}"
        warnings.warn(f"cublas_grouped ignores a damaged tuning file ({what})", RuntimeWarning, stacklevel=3)


def _read_tables(folder: Path) -> list[tuple[Path, TuningTable]]:
    """Every readable table in ``folder``, by file name; broken files are ignored
    (with one warning each), not trusted."""
    try:
        paths = sorted(p for p in folder.glob("*.json") if not p.name.endswith(AUTOTUNE_SUFFIX))
    except OSError:
        return []
    tables = []
    for path in paths:
        try:
            tables.append((path, TuningTable.load(path)))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            warn_ignored_file(path, str(exc))
    return tables


def _version_distance(table: TuningTable, device: DeviceInfo) -> tuple[int, int]:
    """How far a table's cuBLAS is from the device's: another major version first,
    then the absolute difference of the version numbers (major*10000 + minor*100 + patch)."""
    other_major = int(table.cublas_version // 10000 != device.cublas_version // 10000)
    return (other_major, abs(table.cublas_version - device.cublas_version))


def is_close_table(table: TuningTable | None, device: DeviceInfo) -> bool:
    """Whether ``table`` was measured close enough to ``device`` to be trusted
    over measuring: the same GPU name and the same cuBLAS major version.

    Tables of another cuBLAS major (which may pick other kernels) or of
    another GPU of the same architecture (other bandwidth and clocks) are only
    fallbacks: AUTO uses them where it cannot measure (see :mod:`.autotune`).
    """
    return (
        table is not None
        and table.gpu == device.name
        and table.cublas_version // 10000 == device.cublas_version // 10000
    )


def _choose_table(device: DeviceInfo, user_dir: Path, shipped_dir: Path) -> tuple[TuningTable | None, str]:
    found = [(path, table, True) for path, table in _read_tables(user_dir)]
    found += [(path, table, False) for path, table in _read_tables(shipped_dir)]
    where = lambda path, user: f"{'user' if user else 'shipped'} table {path}"  # noqa: E731
    running = f"{device.name}, cuBLAS {device.cublas_version}, SM {device.sm[0]}.{device.sm[1]}"
    # 1-2: exact (GPU name and cuBLAS version), the user's before the shipped one.
    for path, table, user in found:
        if table.gpu == device.name and table.cublas_version == device.cublas_version:
            return table, f"{where(path, user)}: exact match ({running})"
    # 3: the same GPU, nearest cuBLAS; 4: another GPU of the same architecture.
    same_gpu = [f for f in found if f[1].gpu == device.name]
    same_arch = [f for f in found if f[1].gpu != device.name and f[1].sm is not None and f[1].sm == device.sm]
    for group, what in ((same_gpu, "same GPU, nearest cuBLAS"), (same_arch, "same architecture")):
        if group:
            # Nearer cuBLAS first; at equal distance the user's table before the shipped
            # one, then the newer cuBLAS.
            path, table, user = min(
                group, key=lambda f: (_version_distance(f[1], device), not f[2], -f[1].cublas_version)
            )
            return table, (
                f"{where(path, user)}: {what} ({table.gpu}, cuBLAS {table.cublas_version}); running {running}"
            )
    return None, f"no table for {running} in {user_dir} or the shipped tables: built-in rules"


_cache: dict[tuple, tuple[TuningTable | None, str]] = {}


def tuning_table_for(device: DeviceInfo) -> tuple[TuningTable | None, str]:
    """The tuning table AUTO uses on ``device``, and why: ``(table or None, reason)``.

    Fallback order, first found wins:

    1. the user's exact table (same GPU name and cuBLAS version, in
       :func:`user_tuning_dir`);
    2. the shipped exact table;
    3. a table of the same GPU name with the nearest cuBLAS version: one of the
       same major version before any other, then the smallest difference of
       the version numbers (``major*10000 + minor*100 + patch``); at equal
       distance the user's table before the shipped one, then the newer cuBLAS;
    4. a table of another GPU of the same architecture (``sm``), ordered the
       same way.

    Broken files are skipped. Cached per (GPU name, cuBLAS version, SM version)
    and tuning folders; :func:`forget_tables` (or ``select.reset_tuning_cache``) forgets.
    """
    user_dir = os.environ.get("CUBLAS_GROUPED_TUNING_DIR")
    key = (device.name, device.cublas_version, device.sm, user_dir, SHIPPED_TUNING_DIR)
    found = _cache.get(key)
    if found is None:
        found = _cache[key] = _choose_table(device, user_tuning_dir(), SHIPPED_TUNING_DIR)
    return found


def load_tuning_table(device: DeviceInfo) -> TuningTable | None:
    """The table :func:`tuning_table_for` picks for ``device``, or None (cached)."""
    return tuning_table_for(device)[0]


def forget_tables() -> None:
    """Forget the cached table choices (after writing a new table, and in tests)."""
    _cache.clear()
