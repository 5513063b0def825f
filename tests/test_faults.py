"""Faults on the CPU: a damaged, truncated or emptied kernel cache entry, eight
processes compiling into one cache, unusable cache locations, damaged tuning
files, concurrent writers of AUTO's measurements, injected cuBLAS and launch
failures, out-of-memory errors and interrupted work.

Each test makes the fault happen, checks what the library says, then checks
that the next call gets the right answer."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import multiprocessing
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from tuning_util import entry, isolate_tuning, write_table

from cublas_grouped.gemm import autotune as at
from cublas_grouped.gemm import tables
from cublas_grouped.gemm.config import Algorithm
from cublas_grouped.gemm.plan import ProblemStats
from cublas_grouped.moe.kernels import DEFINES as MOE_DEFINES
from cublas_grouped.runtime import cublas as _cublas
from cublas_grouped.runtime import kernel_cache as kc
from cublas_grouped.runtime import nvrtc, oom
from cublas_grouped.runtime.device import DeviceInfo

DISPATCH = ("dispatch", "sm_90", MOE_DEFINES["dispatch"])
POINTERS = ("pointers", "sm_90", {"POINTER_THREADS": 1024})
ROUTING = ("routing", "sm_80", MOE_DEFINES["routing"])


# -- the kernel cache ---------------------------------------------------------------------------------------


def _fresh_process(monkeypatch):
    """nvrtc as a new process finds it: nothing compiled, the cache not yet opened."""
    monkeypatch.setattr(nvrtc, "_compiled", {})
    monkeypatch.setattr(nvrtc, "_from_disk", {})
    monkeypatch.setattr(nvrtc, "_kernels", {})
    monkeypatch.setattr(nvrtc, "_disk_cache", None)
    monkeypatch.setattr(nvrtc, "_disk_cache_ready", False)
    monkeypatch.setattr(nvrtc, "_disk_warned", False)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "kernels"
    monkeypatch.setenv("CUBLAS_GROUPED_CACHE_DIR", str(root))
    _fresh_process(monkeypatch)
    return root


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _compile(which):
    name, arch, defines = which
    return bytes(nvrtc.compile_source(name, arch, defines).code)


def _cache_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, kc.KernelCacheWarning)]


def test_a_compile_stores_one_checked_entry_that_the_next_process_uses(cache_dir, monkeypatch):
    cubin = _compile(DISPATCH)
    (path,) = _entries(cache_dir)  # no temporary file left beside it
    assert path.suffix == ".cubin" and path.read_bytes() == kc.frame(cubin)
    assert cubin[:4] == b"\x7fELF" and kc.cubin_problem(cubin) is None
    _fresh_process(monkeypatch)

    def no_compile(*args):
        raise AssertionError("compiled although a sound entry was on disk")

    monkeypatch.setattr(nvrtc, "_compile", no_compile)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compile(DISPATCH) == cubin


def _damage(kind: str, data: bytes) -> bytes:
    cubin = data[: -kc.TRAILER_BYTES]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    return {
        "random": os.urandom(100),
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "last-byte-lost": data[:-1],
        "one-bit-flipped": bytes(flipped),
        "junk-with-a-valid-checksum": kc.frame(b"\x00" * 300),
        "half-a-cubin-with-a-valid-checksum": kc.frame(cubin[: len(cubin) // 2]),
        "cubin-without-trailer": cubin,
    }[kind]


DAMAGE = {
    "random": "without the cache trailer",
    "empty": "empty file",
    "truncated": "without the cache trailer",
    "last-byte-lost": "without the cache trailer",
    "one-bit-flipped": "checksum does not match",
    "junk-with-a-valid-checksum": "not a cubin: no ELF magic",
    "half-a-cubin-with-a-valid-checksum": "not a cubin: .*past the end",
    "cubin-without-trailer": "without the cache trailer",
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_entry_is_named_recompiled_and_replaced(cache_dir, monkeypatch, kind):
    cubin = _compile(DISPATCH)
    (path,) = _entries(cache_dir)
    path.write_bytes(_damage(kind, path.read_bytes()))
    _fresh_process(monkeypatch)
    with pytest.warns(
        kc.KernelCacheWarning, match=rf"{path}.*is damaged \(.*{DAMAGE[kind]}.*\).*recompiled and replaced"
    ):
        again = _compile(DISPATCH)
    assert again == cubin  # the compiler's output, never the damaged bytes
    assert _entries(cache_dir) == [path] and path.read_bytes() == kc.frame(cubin)
    _fresh_process(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the replaced entry is sound: no second warning
        assert _compile(DISPATCH) == cubin


def test_structural_check_of_cubins():
    cubin = _compile(POINTERS)
    assert kc.cubin_problem(cubin) is None
    assert kc.cubin_problem(b"") == "0 bytes, shorter than an ELF header"
    assert kc.cubin_problem(b"\x7fELF" + b"\x01" * 60) == "not a 64-bit little-endian ELF file"
    x86 = bytearray(cubin)
    x86[18:20] = (62).to_bytes(2, "little")  # EM_X86_64
    assert kc.cubin_problem(bytes(x86)) == "ELF machine 62, not EM_CUDA (190)"
    assert "header table ends at byte" in kc.cubin_problem(cubin[: len(cubin) - 1])
    # A section whose contents run past the end (its size field damaged): found too.
    shoff, shentsize = int.from_bytes(cubin[40:48], "little"), int.from_bytes(cubin[58:60], "little")
    grown = bytearray(cubin)
    size_field = shoff + 1 * shentsize + 32  # section 1's sh_size
    grown[size_field : size_field + 8] = len(cubin).to_bytes(8, "little")
    assert kc.cubin_problem(bytes(grown)).startswith("section 1 ends at byte")


class _FakeModule:
    """Stands in for an ObjectCode whose kernels the driver loads or refuses."""

    def __init__(self, code: bytes, loads: bool):
        self.code, self.loads = code, loads

    def get_kernel(self, name):
        if not self.loads:
            raise RuntimeError("CUDA_ERROR_INVALID_IMAGE: device kernel image is invalid")
        return ("kernel", name, self.code)


class _FakeObjectCode:
    @staticmethod
    def from_cubin(cubin, name=""):
        return _FakeModule(cubin, loads=False)  # what came from disk is refused


def test_an_entry_the_driver_refuses_is_recompiled_and_replaced(cache_dir, monkeypatch):
    import cuda.core

    cubin = _compile(DISPATCH)
    (path,) = _entries(cache_dir)
    _fresh_process(monkeypatch)
    real_compile = nvrtc._compile
    monkeypatch.setattr(cuda.core, "ObjectCode", _FakeObjectCode)
    monkeypatch.setattr(nvrtc, "_compile", lambda *a: _FakeModule(bytes(real_compile(*a).code), loads=True))
    path.write_bytes(kc.frame(cubin))
    stamp = path.stat().st_mtime_ns
    with pytest.warns(
        kc.KernelCacheWarning, match=rf"{path} could not be loaded \(RuntimeError: CUDA_ERROR_INVALID_IMAGE"
    ):
        kernel = nvrtc.get_kernel("dispatch", "gather_rows_bf16", "sm_90", defines=MOE_DEFINES["dispatch"])
    assert kernel == ("kernel", "gather_rows_bf16", cubin)
    assert path.read_bytes() == kc.frame(cubin) and path.stat().st_mtime_ns != stamp  # written anew
    # From now on the fresh build is used, in memory.
    assert nvrtc.compile_source(*DISPATCH).loads


def test_a_load_failure_that_a_fresh_build_shares_is_raised_and_the_entry_kept(cache_dir, monkeypatch):
    import cuda.core

    cubin = _compile(DISPATCH)
    (path,) = _entries(cache_dir)
    _fresh_process(monkeypatch)
    monkeypatch.setattr(cuda.core, "ObjectCode", _FakeObjectCode)
    monkeypatch.setattr(nvrtc, "_compile", lambda *a: _FakeModule(cubin, loads=False))  # no GPU, say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="CUDA_ERROR_INVALID_IMAGE") as info:
            nvrtc.get_kernel("dispatch", "gather_rows_bf16", "sm_90", defines=MOE_DEFINES["dispatch"])
    assert isinstance(info.value.__cause__, RuntimeError)  # the first failure, from the disk's copy
    assert path.read_bytes() == kc.frame(cubin)


def _unusable(kind, tmp_path, monkeypatch):
    if kind == "under-a-regular-file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        monkeypatch.setenv("CUBLAS_GROUPED_CACHE_DIR", str(blocker / "kernels"))
    elif kind == "a-regular-file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        monkeypatch.setenv("CUBLAS_GROUPED_CACHE_DIR", str(blocker))
    elif kind == "no-home":
        monkeypatch.delenv("CUBLAS_GROUPED_CACHE_DIR", raising=False)
        monkeypatch.delenv("HOME", raising=False)

        def no_home():
            raise RuntimeError("Could not determine home directory.")

        monkeypatch.setattr(Path, "home", staticmethod(no_home))
    elif kind == "read-only":
        monkeypatch.setenv("CUBLAS_GROUPED_CACHE_DIR", str(tmp_path / "ro"))

        def read_only(self, key, cubin):
            raise OSError(errno.EROFS, "Read-only file system", str(self.path_for(key)))

        monkeypatch.setattr(kc.KernelCache, "put", read_only)
    elif kind == "disk-full":
        monkeypatch.setenv("CUBLAS_GROUPED_CACHE_DIR", str(tmp_path / "full"))

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(kc.os, "fsync", full)
    return {
        "under-a-regular-file": "Not a directory",
        "a-regular-file": "is not a folder",
        "no-home": "Could not determine home directory",
        "read-only": "Read-only file system",
        "disk-full": "No space left on device",
    }[kind]


@pytest.mark.parametrize(
    "kind", ["under-a-regular-file", "a-regular-file", "no-home", "read-only", "disk-full"]
)
def test_an_unusable_cache_location_compiles_in_memory_with_one_warning(tmp_path, monkeypatch, kind):
    _fresh_process(monkeypatch)
    reason = _unusable(kind, tmp_path, monkeypatch)
    expected = {}
    with warnings.catch_warnings():
        monkeypatch.setenv("CUBLAS_GROUPED_CACHE_DIR", "off")
        for which in (DISPATCH, POINTERS, ROUTING):
            expected[which[0]] = _compile(which)
    _fresh_process(monkeypatch)
    _unusable(kind, tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = {which[0]: _compile(which) for which in (DISPATCH, POINTERS, ROUTING)}
    assert got == expected
    (message,) = _cache_warnings(record)  # one warning for the whole process
    assert reason in message and "compiled in memory for this process only" in message
    assert nvrtc._disk_cache is None
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "a-file"]
    assert leftovers == []  # no temporary file, no partial entry


def _compile_in_a_new_process(root: str, barrier, results) -> None:
    """One of the processes of the concurrency test: compile three kernels at once with the others."""
    os.environ["CUBLAS_GROUPED_CACHE_DIR"] = root
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            barrier.wait(timeout=120)
            digests = {
                which[0]: hashlib.sha256(_compile(which)).hexdigest()
                for which in (DISPATCH, POINTERS, ROUTING)
            }
        results.put((digests, [str(w.message) for w in record]))
    except BaseException as exc:  # report, never hang the parent
        results.put(({}, [f"{type(exc).__name__}: {exc}"]))


def test_eight_processes_compiling_into_one_empty_cache(tmp_path, monkeypatch):
    root = tmp_path / "shared"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(8), context.Queue()
    procs = [
        context.Process(target=_compile_in_a_new_process, args=(str(root), barrier, results))
        for _ in range(8)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert all(not messages for _, messages in outcomes), outcomes  # no failure, no warning
    assert len({json.dumps(d, sort_keys=True) for d, _ in outcomes}) == 1 and len(outcomes[0][0]) == 3
    files = _entries(root)
    assert len(files) == 3 and all(f.suffix == ".cubin" for f in files)  # no temporary file left
    # Every entry is sound, and is what this process compiles too.
    monkeypatch.setenv("CUBLAS_GROUPED_CACHE_DIR", str(root))
    _fresh_process(monkeypatch)
    cache = kc.KernelCache(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for f in files:
            cubin, problem = kc._unframe(f.read_bytes())
            assert problem is None and hashlib.sha256(cubin).hexdigest() in outcomes[0][0].values()
        assert {hashlib.sha256(_compile(w)).hexdigest() for w in (DISPATCH, POINTERS, ROUTING)} == set(
            outcomes[0][0].values()
        )
    assert cache.entries.is_dir()


def test_an_interrupted_write_leaves_no_entry_and_no_temporary_file(tmp_path, monkeypatch):
    cache = kc.KernelCache(tmp_path)

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(kc.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.put(b"key", _compile(POINTERS))
    assert _entries(tmp_path) == []
    monkeypatch.undo()
    assert cache.get(b"key") is None


def test_an_interrupted_compile_leaves_nothing_half_cached(cache_dir, monkeypatch):
    real = nvrtc._compile

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(nvrtc, "_compile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _compile(DISPATCH)
    assert nvrtc._compiled == {} and _entries(cache_dir) == []
    monkeypatch.setattr(nvrtc, "_compile", real)
    assert _compile(DISPATCH)[:4] == b"\x7fELF" and len(_entries(cache_dir)) == 1


# -- tuning tables and AUTO's measurements ------------------------------------------------------------------

H100 = "NVIDIA H100 80GB HBM3"
QWEN = ProblemStats(128, 128, 32768, 280, 1536, 2048)
CANDIDATES = (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL, Algorithm.CHUNKED_BATCHED)


def _device(name=H100, version=130100):
    return DeviceInfo(sm=(9, 0), cublas_version=version, name=name)


def _doc(entries, gpu=H100, version=130100):
    return json.dumps({"gpu": gpu, "cublas_version": version, "sm": [9, 0], "entries": entries})


# Files that parse but would steer AUTO wrongly if trusted, and files that do not parse.
MISLEADING = {
    "negative-time": (_doc([entry(times={"sequential": -1.0, "cublas_grouped": 2.0})]), "time of -1.0 ms"),
    "zero-time": (_doc([entry(times={"sequential": 0, "cublas_grouped": 2.0})]), "time of 0 ms"),
    "nan-time": (
        json.dumps(
            {"gpu": H100, "cublas_version": 130100, "entries": [entry(times={"sequential": math.nan})]}
        ),
        "time of nan ms",
    ),
    "infinite-time": (_doc([entry(times={"sequential": math.inf})]), "time of inf ms"),
    "boolean-time": (_doc([entry(times={"sequential": True})]), "time of True ms"),
    "string-time": (_doc([entry(times={"sequential": "1.0"})]), "time of '1.0' ms"),
    "times-a-list": (_doc([{**entry(), "times_ms": [1.0, 2.0]}]), "needs times_ms"),
    "auto-timed": (_doc([entry(times={"auto": 0.1})]), "unknown algorithm 'auto'"),
    "more-active-than-experts": (_doc([entry(experts=8, active=9)]), "active_experts <= num_experts"),
    "no-experts": (_doc([entry(experts=0, active=0)]), "num_experts >= 1"),
    "zero-n": (_doc([entry(n=0)]), "n and k >= 1"),
    "float-k": (_doc([entry(k=2048.0)]), "n and k >= 1"),
    "negative-rows": (_doc([entry(mean_rows=-3)]), "mean_rows -3"),
    "negative-max-rows": (_doc([entry(max_rows=-1)]), "max_rows -1"),
    "no-dtype": (_doc([{k: v for k, v in entry().items() if k != "dtype"}]), "needs a dtype"),
    "entry-a-number": (_doc([3]), "entry 0 is a int"),
    "gpu-a-number": (json.dumps({"gpu": 7, "cublas_version": 130100, "entries": []}), "gpu must be a string"),
    "version-a-string": (
        json.dumps({"gpu": H100, "cublas_version": "13", "entries": []}),
        "cublas_version an int",
    ),
    "half-a-file": (_doc([entry()])[:70], "is not valid JSON"),
    "empty": ("", "is not valid JSON"),
    "not-utf8": (b"\xff\xfe{}".decode("latin-1"), "is not valid JSON"),
    "nested-too-deep": ("[" * 100000 + "]" * 100000, "is not valid JSON"),
}


@pytest.mark.parametrize("kind", sorted(MISLEADING))
def test_a_damaged_tuning_table_is_ignored_with_a_warning_naming_it(tmp_path, monkeypatch, kind):
    user, shipped = isolate_tuning(tmp_path, monkeypatch)
    monkeypatch.setattr(tables, "_warned_files", set())
    text, problem = MISLEADING[kind]
    bad = user / "damaged.json"
    bad.write_bytes(text.encode("latin-1") if kind == "not-utf8" else text.encode())
    write_table(shipped, "good.json", H100, 120900, [entry(times={"cublas_grouped": 1.0, "sequential": 2.0})])
    with pytest.warns(
        RuntimeWarning, match=rf"cublas_grouped ignores a damaged tuning file \({bad}.*{_re(problem)}"
    ):
        table, why = tables.tuning_table_for(_device())
    assert table.cublas_version == 120900 and "good.json" in why  # the next table in the chain decides
    times = table.nearest(QWEN)
    assert times == {Algorithm.CUBLAS_GROUPED: 1.0, Algorithm.SEQUENTIAL: 2.0}


def test_a_damaged_tuning_file_warns_once_per_file_and_problem(monkeypatch):
    # Pins warn_ignored_file: one warning per (file, problem), another file or
    # another problem warns again; the file is named once, in front of a
    # problem that does not name it already.
    monkeypatch.setattr(tables, "_warned_files", set())
    a, b = Path("/t/a.json"), Path("/t/b.json")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for path, problem in ((a, "bad"), (a, "bad"), (b, "bad"), (a, "worse"), (b, "/t/b.json is empty")):
            tables.warn_ignored_file(path, problem)
    assert [str(w.message) for w in seen] == [
        "cublas_grouped ignores a damaged tuning file (/t/a.json: bad)",
        "cublas_grouped ignores a damaged tuning file (/t/b.json: bad)",
        "cublas_grouped ignores a damaged tuning file (/t/a.json: worse)",
        "cublas_grouped ignores a damaged tuning file (/t/b.json is empty)",
    ]
    assert all(w.category is RuntimeWarning for w in seen)


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_a_sound_table_still_loads_every_time_form(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(_doc([entry(times={"sequential": 2, "cublas_grouped": 0.5, "chunked_batched": None})]))
    table = tables.TuningTable.load(path)
    assert table.nearest(QWEN) == {Algorithm.SEQUENTIAL: 2.0, Algorithm.CUBLAS_GROUPED: 0.5}


@pytest.mark.parametrize(
    "edge",
    [
        {"num_experts": 1, "active_experts": 1},
        {"active_experts": 0, "mean_rows": 0, "max_rows": 0},
        {"n": 1, "k": 1},
        {"mean_rows": 0.5},
        {"times_ms": {"sequential": 1e-6, "cublas_grouped": None, "sm90_grouped": 7}},
    ],
)
def test_entries_at_the_edges_of_sound_still_load(tmp_path, edge):
    path = tmp_path / "edge.json"
    path.write_text(_doc([{**entry(), **edge}]))
    assert tables.entry_problem({**entry(), **edge}) is None
    assert len(tables.TuningTable.load(path).entries) == 1


_LONG = "x" * 100


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"mean_rows": True}, "has mean_rows True; it must be a number in [0, 2147483647]"),
        ({"mean_rows": _LONG}, f"has mean_rows '{'x' * 39}; it must be a number in [0, 2147483647]"),
        ({"max_rows": _LONG}, f"has max_rows '{'x' * 39}; it must be an int in [0, 2147483647]"),
        ({"dtype": "b" * 257}, "needs a dtype name"),
        ({"layout": "l" * 257}, "has a layout that is not a short name"),
        ({"times_ms": None}, "needs times_ms, an object of algorithm -> milliseconds"),
        ({"times_ms": {_LONG: 1.0}}, f"times an unknown algorithm {'x' * 40!r}"),
        (
            {"times_ms": {"sequential": _LONG}},
            f"has a time of '{'x' * 39} ms for sequential; it must be in (0, 1e+07] or null",
        ),
    ],
)
def test_entry_problems_are_named_and_quote_at_most_40_characters(change, problem):
    # Pins entry_problem's messages (what the warning about an ignored file
    # says) and that a hostile value is quoted in 40 characters at most.
    assert tables.entry_problem({**entry(), **change}) == problem


def test_names_of_256_characters_are_short_enough():
    # Pins the name limit from the sound side: 256 characters pass (257 are refused above).
    assert tables.entry_problem({**entry(), "dtype": "b" * 256, "layout": "l" * 256}) is None


def test_table_header_limits_from_both_sides(tmp_path):
    # Pins TuningTable.load's header checks at their limits: cuBLAS version 0
    # and 10**8 - 1 and a GPU name of 256 characters load; 10**8 and 257
    # characters are refused with the rule spelled out.
    path = tmp_path / "t.json"
    for gpu, version in ((H100, 0), (H100, 10**8 - 1), ("g" * 256, 130100)):
        path.write_text(_doc([entry()], gpu=gpu, version=version))
        table = tables.TuningTable.load(path)
        assert (table.gpu, table.cublas_version) == (gpu, version)
    rule = (
        r"is not a tuning table \(gpu must be a string of at most 256 characters, "
        r"cublas_version an int below 10\*\*8\)$"
    )
    for gpu, version in ((H100, 10**8), ("g" * 257, 130100)):
        path.write_text(_doc([entry()], gpu=gpu, version=version))
        with pytest.raises(ValueError, match=rule):
            tables.TuningTable.load(path)


def test_a_table_file_is_read_only_one_byte_past_the_limit(tmp_path, monkeypatch):
    # Pins the bounded read: a hostile multi-gigabyte file costs at most
    # MAX_TABLE_BYTES + 1 bytes of memory before it is refused.
    asked = []
    real_open = open

    class Recording:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            asked.append(n)
            return self.f.read(n)

    path = tmp_path / "t.json"
    path.write_text(_doc([entry()]))
    monkeypatch.setattr(tables, "open", lambda p, mode: Recording(real_open(p, mode)), raising=False)
    tables.TuningTable.load(path)
    assert asked == [tables.MAX_TABLE_BYTES + 1]


def test_table_sm_limits_from_both_sides():
    # Pins _parse_sm's range: majors and minors 0..99 (as a list or "M.m"),
    # 100 or a negative number refused, the bad value quoted in 40 characters.
    assert tables._parse_sm([0, 0], H100) == (0, 0)
    assert tables._parse_sm([99, 99], H100) == (99, 99)
    assert tables._parse_sm("12.1", H100) == (12, 1)
    for bad in ([100, 0], [0, 100], [-1, 0], [0, -1], "nine"):
        with pytest.raises(ValueError, match="^sm must be"):
            tables._parse_sm(bad, H100)
    with pytest.raises(ValueError, match=f"; got '{'x' * 40}'$"):
        tables._parse_sm("x" * 100, H100)


def test_discarding_an_entry_another_process_removed_only_warns(tmp_path):
    # Pins discard's best effort: the entry is already gone (another process
    # discarded it first): the warning is given, nothing is raised.
    cache = kc.KernelCache(tmp_path / "cache")
    assert not cache.path_for(b"key").exists()
    with pytest.warns(kc.KernelCacheWarning, match="is damaged"):
        cache.discard(b"key", "is damaged (test)")


def _elf_header(ei_data=1, ei_version=1, machine=190, phoff=64, shoff=64, shnum=1, phnum=0):
    """A 64-byte ELF64 header with the given fields (no program headers unless phnum)."""
    head = bytearray(64)
    head[:4] = b"\x7fELF"
    head[4], head[5], head[6] = 2, ei_data, ei_version
    struct.pack_into("<H", head, 18, machine)
    struct.pack_into("<QQ", head, 32, phoff, shoff)
    struct.pack_into("<HHHH", head, 54, 56, phnum, 64, shnum)
    return bytes(head)


def test_cubin_problems_read_the_header_fields_as_unsigned():
    # Pins cubin_problem's reading of the ELF header: byte 5 (not 6) says the
    # byte order; the machine and the table offsets are unsigned, so a
    # hostile 0xFFFF or 2^64 - 64 is named as such, never taken as negative.
    assert kc.cubin_problem(_elf_header(ei_data=2)) == "not a 64-bit little-endian ELF file"
    assert kc.cubin_problem(_elf_header(machine=0xFFFF)) == "ELF machine 65535, not EM_CUDA (190)"
    # The smallest sound cubin: the header and one empty (SHT_NULL) section header after it.
    assert kc.cubin_problem(_elf_header() + bytes(64)) is None
    assert kc.cubin_problem(_elf_header(shnum=0) + bytes(64)) == "no section header table"
    assert kc.cubin_problem(_elf_header(shnum=0xFFFF) + bytes(64)) == (
        f"the section header table ends at byte {64 + 64 * 0xFFFF}, past the end (128)"
    )
    huge = 2**64 - 64
    assert kc.cubin_problem(_elf_header(shoff=huge)) == (
        f"the section header table ends at byte {huge + 64}, past the end (64)"
    )


def _section(sh_type, offset, size):
    """One 64-byte ELF64 section header (name, flags and address zero)."""
    return struct.pack("<4xIQQQQ", sh_type, 0, 0, offset, size) + bytes(24)


def test_cubin_problems_name_the_table_or_section_past_the_end():
    # Pins the bounds of the header tables and of each section with contents:
    # a section may end exactly at the end of the data, not one byte past it,
    # and offsets are unsigned (2^64 - 1 is past any end, never -1).
    assert (
        kc.cubin_problem(_elf_header(phnum=1))
        == "the program header table ends at byte 120, past the end (64)"
    )
    head = _elf_header(shnum=2)
    assert kc.cubin_problem(head + _section(0, 0, 0) + _section(1, 0, 192)) is None
    assert kc.cubin_problem(head + _section(0, 0, 0) + _section(1, 0, 193)) == (
        "section 1 ends at byte 193, past the end (192)"
    )
    assert kc.cubin_problem(head + _section(0, 0, 0) + _section(1, 2**64 - 1, 1)) == (
        f"section 1 ends at byte {2**64}, past the end (192)"
    )


def test_an_entry_is_written_beside_its_final_name(tmp_path, monkeypatch):
    # Pins put's temporary file: in the entry's own folder (the rename that
    # publishes it must not cross file systems), then renamed onto the entry.
    moves = []
    real_replace = os.replace
    monkeypatch.setattr(kc.os, "replace", lambda a, b: (moves.append((a, b)), real_replace(a, b)))
    cache = kc.KernelCache(tmp_path / "cache")
    path = cache.put(b"key", _elf_header() + bytes(64))
    ((tmp, final),) = moves
    assert Path(final) == path and Path(tmp).parent == path.parent and Path(tmp).suffix != ".cubin"


def test_a_folder_made_meanwhile_by_another_process_is_gone_past(tmp_path, monkeypatch):
    # Pins _make_folders under a race: the cache root appears between the
    # check and the mkdir (another process made it); the folders below it are
    # still made and the entry is stored.
    real_mkdir = os.mkdir
    root = tmp_path / "cache"

    def racing_mkdir(folder, mode=0o777):
        if Path(folder) == root and not root.exists():
            real_mkdir(folder, 0o700)  # the other process wins
            raise FileExistsError(folder)
        real_mkdir(folder, mode)

    monkeypatch.setattr(kc.os, "mkdir", racing_mkdir)
    cache = kc.KernelCache(root)
    path = cache.put(b"key", _elf_header() + bytes(64))
    assert path.is_file() and cache.get(b"key") == _elf_header() + bytes(64)


def test_unframe_messages_at_the_edges():
    # Pins _unframe's word on an empty file, on a frame of no code at all
    # (exactly the trailer's size: a sound frame, but no cubin), and on a
    # trailer whose length field is 2^64 - 1 (read unsigned).
    assert kc._unframe(b"") == (None, "empty file")
    assert kc._unframe(kc.frame(b"")) == (None, "not a cubin: 0 bytes, shorter than an ELF header")
    forged = bytearray(kc.frame(b"\x00" * 10))
    struct.pack_into("<Q", forged, 10 + len(kc.MAGIC), 2**64 - 1)
    assert kc._unframe(bytes(forged)) == (
        None,
        f"the trailer gives {2**64 - 1} bytes of code but 10 are there",
    )


def test_a_file_that_is_not_json_is_named_with_the_parsers_words(tmp_path):
    # Pins _read_json's message: the parser's exception type and its words,
    # cut at 200 characters (a hostile file cannot flood the warning).
    path = tmp_path / "t.json"
    path.write_text("{nope")
    with pytest.raises(ValueError, match=r"is not valid JSON \(JSONDecodeError: Expecting property name"):
        tables.TuningTable.load(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError) as caught:
        tables.TuningTable.load(path)
    words = str(caught.value).split("(UnicodeDecodeError: ", 1)[1]
    assert words.endswith(")") and len(words) - 1 <= 200
    assert words[:-1] == str(UnicodeDecodeError("utf-8", b"\xff\xfe", 0, 1, "invalid start byte"))[:200]


class _Measure:
    def __init__(self, fastest="chunked_batched", fail=None):
        self.calls, self.fastest, self.fail = 0, fastest, fail

    def __call__(self, stats, candidates):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return {a: (1.0 if a.value == self.fastest else 3.0) for a in candidates}


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    dirs = isolate_tuning(tmp_path, monkeypatch)
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "1")
    monkeypatch.setattr(at, "stream_is_capturing", lambda stream: False)
    monkeypatch.setattr(tables, "_warned_files", set())
    yield dirs
    at.reset_measurements()


@pytest.mark.parametrize(
    "kind", ["negative-time", "zero-time", "nan-time", "half-a-file", "empty", "times-a-list"]
)
def test_a_damaged_measurement_file_never_steers_auto(measuring, kind):
    dev = _device("Unknown GPU")
    path = at.autotune_path(dev)
    text = MISLEADING[kind][0].replace(H100, "Unknown GPU")
    if kind != "half-a-file" and text:
        doc = json.loads(text)  # Python's json reads and writes NaN
        doc["entries"] = [{**e, "layout": "layer"} if isinstance(e, dict) else e for e in doc["entries"]]
        text = json.dumps(doc)
    path.write_text(text)
    measure = _Measure()
    with pytest.warns(RuntimeWarning, match=rf"ignores a damaged tuning file \({path}"):
        times = at.auto_times(QWEN, dev, CANDIDATES, family="layer", measure=measure, stream=7)
    # Measured afresh (the file's times were not used), and the file replaced by a sound one.
    assert measure.calls == 1 and min(times, key=times.get) is Algorithm.CHUNKED_BATCHED
    assert [e["times_ms"]["chunked_batched"] for e in tables.TuningTable.load(path).entries] == [1.0]


def _store_one_in_a_new_process(folder: str, index: int, barrier, results) -> None:
    """One writer of the concurrency test: stores its own measurement in the shared file."""
    os.environ["CUBLAS_GROUPED_TUNING_DIR"] = folder
    try:
        dev = _device("Shared GPU")
        store = at._store_for(dev)
        barrier.wait(timeout=120)
        for round_ in range(5):  # each writer merges several times while the others do
            stats = ProblemStats(8 + index, 8, 1024 * (round_ + 1), 200 * (round_ + 1), 1024, 1024)
            store.add(at._entry(stats, "layer", {Algorithm.SEQUENTIAL: 1.0 + index}), keep=True)
        results.put("ok")
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_eight_processes_storing_measurements_lose_none(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(8), context.Queue()
    procs = [
        context.Process(target=_store_one_in_a_new_process, args=(str(tmp_path), i, barrier, results))
        for i in range(8)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok"] * 8
    (path,) = [p for p in tmp_path.iterdir() if p.name.endswith(".autotune.json")]
    stored = tables.TuningTable.load(path)  # one whole, sound file
    assert sorted((e["num_experts"], e["mean_rows"]) for e in stored.entries) == sorted(
        (8 + i, 1024 * (r + 1) / 8) for i in range(8) for r in range(5)
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_an_interrupted_measurement_leaves_no_half_updated_state(measuring):
    dev = _device("Unknown GPU")
    before = at.state_token()
    with pytest.raises(KeyboardInterrupt):
        at.auto_times(
            QWEN, dev, CANDIDATES, family="layer", measure=_Measure(fail=KeyboardInterrupt()), stream=7
        )
    store = at._store_for(dev)
    assert store.entries == [] and store.given_up == [] and store.measured_here == 0
    assert at.state_token() == before and not at.autotune_path(dev).exists()
    measure = _Measure("sequential")
    times = at.auto_times(QWEN, dev, CANDIDATES, family="layer", measure=measure, stream=7)
    assert measure.calls == 1 and min(times, key=times.get) is Algorithm.SEQUENTIAL
    assert len(tables.TuningTable.load(at.autotune_path(dev)).entries) == 1


# -- failed library calls, injected -------------------------------------------------------------------------


@pytest.fixture
def cublas_calls(monkeypatch):
    """Every cuBLAS entry point replaced by a recorder; ``fail[name] = status`` makes
    the next call of ``name`` return that status (once)."""
    _cublas.load()
    calls, fail = [], {}

    def recorder(name):
        def fn(*args):
            calls.append((name, args))
            return fail.pop(name, 0)

        return fn

    for name in list(_cublas._functions):
        monkeypatch.setitem(_cublas._functions, name, recorder(name))
    return calls, fail


@pytest.mark.parametrize(
    "status, name",
    [
        (7, "CUBLAS_STATUS_INVALID_VALUE"),
        (13, "CUBLAS_STATUS_EXECUTION_FAILED"),
        (99, "CUBLAS_STATUS_UNKNOWN_99"),
    ],
)
def test_a_cublas_status_names_the_call_and_the_status(cublas_calls, status, name):
    calls, fail = cublas_calls
    fail["cublasGemmEx"] = status
    args = (5, 0, 0, 4, 4, 4, 1.0, 1, 0, 4, 2, 0, 4, 0.0, 3, 0, 4, _cublas.ComputeType.C32F)
    with pytest.raises(_cublas.CublasError, match=rf"^cublasGemmEx failed: {name} \({status}\)$") as info:
        _cublas.gemm_ex(*args)
    assert (info.value.status, info.value.status_name, info.value.function) == (status, name, "cublasGemmEx")
    _cublas.gemm_ex(*args)  # the next call goes through
    assert [c[0] for c in calls] == ["cublasGemmEx", "cublasGemmEx"]


class _FakeResources:
    """The per-stream resources as the cuBLAS back end sees them (no GPU)."""

    device_id, stream = 0, 77

    def __init__(self):
        self.binds = 0

    def bind(self, workspace_bytes):
        self.binds += 1
        return 4242


def _plan(sizes, fake):
    from cublas_grouped.gemm.plan import Operands, plan_gmm
    from cublas_grouped.runtime.arrays import view

    m = int(sum(sizes))
    a, b = view(fake((m, 16)), "a"), view(fake((len(sizes), 16, 8)), "b")
    plan = plan_gmm(a, b, np.asarray(sizes, np.int64), trans_a=False, trans_b=False, num_experts=len(sizes))
    return plan, Operands.for_plan(plan, 0x1000, 0x200000, 0x400000, 4)


@pytest.mark.parametrize("tensor_cores", [True, False])
def test_a_failed_gemm_leaves_the_handle_as_it_was_and_the_next_run_is_whole(
    cublas_calls, fake, tensor_cores
):
    from cublas_grouped.gemm.backends import cublas as backend
    from cublas_grouped.gemm.config import GroupedGemmConfig

    calls, fail = cublas_calls
    plan, ops = _plan([3, 0, 5, 2], fake)
    config = GroupedGemmConfig(use_tensor_cores=tensor_cores)
    info = _device()
    res = _FakeResources()
    real_gemm_ex = _cublas._functions["cublasGemmEx"]
    count = {"n": 0}

    def second_fails(*args):  # the second expert's GEMM fails
        count["n"] += 1
        real_gemm_ex(*args)
        return 13 if count["n"] == 2 else 0

    _cublas._functions["cublasGemmEx"] = second_fails
    with pytest.raises(_cublas.CublasError, match="cublasGemmEx failed: CUBLAS_STATUS_EXECUTION_FAILED"):
        backend.run(plan, ops, np.dtype(np.float32), Algorithm.SEQUENTIAL, res, config=config, info=info)
    modes = [c[1][1] for c in calls if c[0] == "cublasSetMathMode"]
    # Pedantic math is undone even though the run failed: the handle is shared by the stream.
    assert modes == ([] if tensor_cores else [_cublas.MathMode.PEDANTIC, _cublas.MathMode.DEFAULT])
    calls.clear()
    _cublas._functions["cublasGemmEx"] = real_gemm_ex
    backend.run(plan, ops, np.dtype(np.float32), Algorithm.SEQUENTIAL, res, config=config, info=info)
    gemms = [c[1] for c in calls if c[0] == "cublasGemmEx"]
    assert len(gemms) == 3 and res.binds == 2  # every non-empty expert, on the same handle
    assert all(g[0] == 4242 for g in gemms)
    assert [g[4] for g in gemms] == [3, 5, 2]  # n of each call: the rows of experts 0, 2 and 3


def test_a_failed_launch_names_the_kernel_and_keeps_the_driver_error(monkeypatch):
    import ctypes
    from types import SimpleNamespace

    import cuda.core
    import numpy as np

    from cublas_grouped.runtime import launch as fast

    class DriverError(RuntimeError):
        pass

    def refuse(stream, config, kernel, *args):
        raise DriverError("CUDA_ERROR_INVALID_VALUE: invalid argument")

    # Arguments that are not all scalars (a tensor map) go through cuda.core.
    monkeypatch.setattr(cuda.core, "LaunchConfig", lambda **kw: kw)
    monkeypatch.setattr(cuda.core, "launch", refuse)

    class Kernel:  # hashable, as cuda.core's are
        handle = 0x1234

    stream = SimpleNamespace(handle=5)
    kernel = Kernel()
    monkeypatch.setitem(nvrtc._labels, id(kernel), "build_pointers (kernels/pointers.cu, sm_90)")
    with pytest.raises(
        nvrtc.KernelLaunchError,
        match=r"^launch of build_pointers \(kernels/pointers\.cu, sm_90\) with grid 1, block 2048, "
        r"0 bytes of shared memory failed: DriverError: CUDA_ERROR_INVALID_VALUE",
    ) as info:
        nvrtc.launch(stream, kernel, 1, 2048, (object(),))
    assert isinstance(info.value.__cause__, DriverError)
    with pytest.raises(nvrtc.KernelLaunchError, match="^launch of a kernel with grid"):
        nvrtc.launch(stream, Kernel(), 1, 32, (object(),))

    # All-scalar arguments take the driver's cuLaunchKernel: its refusal is named the same way.
    class Driver:
        def cuLaunchKernel(self, *args):
            return 1

        def cuGetErrorName(self, status, out):
            ctypes.cast(out, ctypes.POINTER(ctypes.c_char_p))[0] = b"CUDA_ERROR_INVALID_VALUE"
            return 0

    monkeypatch.setattr(fast, "driver", lambda: Driver())
    with pytest.raises(
        nvrtc.KernelLaunchError,
        match=r"^launch of build_pointers .* block 2048, 0 bytes of shared memory failed: "
        r"LaunchError: .*CUDA_ERROR_INVALID_VALUE",
    ) as info:
        nvrtc.launch(7, kernel, 1, 2048, (np.int32(3),))
    assert isinstance(info.value.__cause__, fast.LaunchError)


# -- out of memory -------------------------------------------------------------------------------------------


def _cupy_oom(size=3 << 30):
    import cupy

    return cupy.cuda.memory.OutOfMemoryError(size, 1 << 30, 2 << 30)


def test_out_of_memory_names_the_call_the_bytes_and_the_operands(fake):
    @oom.reports_out_of_memory("my_call")
    def allocating(a, b, *, out=None, scale=1.0):
        raise _cupy_oom()

    a, out = fake((4096, 1024), np.float16), fake((4096, 2048), np.float16)
    with pytest.raises(oom.GpuOutOfMemoryError) as info:
        allocating(a, [1, 2], out=out, scale=2.0)
    err = info.value
    assert isinstance(err, MemoryError) and err.call == "my_call" and err.requested_bytes == 3 << 30
    text = str(err)
    assert text.startswith(
        "my_call with a [4096, 1024] float16, out [4096, 2048] float16: out of GPU memory "
    )
    assert "allocating 3,221,225,472 bytes (3.00 GiB)" in text
    assert "OutOfMemoryError: Out of memory allocating 3,221,225,472 bytes" in text  # CuPy's own words
    assert isinstance(err.__cause__, MemoryError) and type(err.__cause__).__module__.startswith("cupy")


def test_out_of_memory_from_the_runtime_the_driver_and_cublas_is_recognised():
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    assert oom.is_out_of_memory(_cupy_oom())
    assert oom.is_out_of_memory(CUDARuntimeError(2))  # cudaErrorMemoryAllocation
    assert not oom.is_out_of_memory(CUDARuntimeError(1))
    assert oom.is_out_of_memory(_cublas.CublasError(3, "cublasCreate"))  # CUBLAS_STATUS_ALLOC_FAILED
    assert not oom.is_out_of_memory(_cublas.CublasError(7, "cublasGemmEx"))
    assert not oom.is_out_of_memory(MemoryError("host"))  # NumPy's: not ours to rename
    assert not oom.is_out_of_memory(ValueError("CUDA_ERROR_OUT_OF_MEMORY"))

    @oom.reports_out_of_memory("outer")
    def outer():
        return inner()

    @oom.reports_out_of_memory("inner")
    def inner():
        raise CUDARuntimeError(2)

    with pytest.raises(oom.GpuOutOfMemoryError, match=r"^inner: out of GPU memory in an allocation") as info:
        outer()
    assert info.value.requested_bytes is None

    @oom.reports_out_of_memory("host")
    def host():
        raise MemoryError("host memory")

    with pytest.raises(MemoryError, match="^host memory$") as info:
        host()
    assert type(info.value) is MemoryError


def test_the_entry_points_report_out_of_memory(fake, monkeypatch):
    """gmm and moe_forward past their checks, with the first GPU step failing for lack of memory."""
    import cublas_grouped as cg
    from cublas_grouped.gemm import gmm as gmm_module
    from cublas_grouped.moe import layer

    class Executor:
        def execute(self, *args, **kwargs):
            raise _cupy_oom(1 << 20)

    monkeypatch.setattr(gmm_module, "shared_executor", lambda *a: Executor())
    a, b = fake((64, 32), np.float16), fake((2, 32, 16), np.float16)
    with pytest.raises(
        oom.GpuOutOfMemoryError,
        match=r"^gmm with a \[64, 32\] float16, b \[2, 32, 16\] float16: .*1,048,576 bytes",
    ):
        cg.gmm(a, b, [32, 32])

    def no_memory(*args):
        raise _cupy_oom(5 << 20)

    monkeypatch.setattr(layer, "stream_resources", no_memory)
    x, ids = fake((6, 32), np.float16), fake((6, 2), np.int32)
    w1, w2 = fake((4, 32, 16), np.float16), fake((4, 8, 32), np.float16)
    with pytest.raises(
        oom.GpuOutOfMemoryError,
        match=r"^moe_forward with x \[6, 32\] float16, topk_ids \[6, 2\] int32, w1 .*5,242,880 bytes",
    ):
        cg.moe_forward(x, ids, None, w1, w2)
    assert cg.moe_forward.__wrapped__.__name__ == "moe_forward"  # the signature stays inspectable


class _FakeArray:
    def __init__(self, nbytes):
        self.nbytes = nbytes


class _FakeCupy:
    """Enough of CuPy for ``StreamResources.buffer``: allocations above ``limit`` bytes fail."""

    uint8 = np.uint8

    def __init__(self, limit):
        import cupy

        self.error = cupy.cuda.memory.OutOfMemoryError  # the real class, before this fake replaces CuPy
        self.limit, self.asked = limit, []
        self.cuda = type("cuda", (), {"Device": staticmethod(lambda i: _NullContext())})

    def empty(self, size, dtype=None):
        self.asked.append(size)
        if size > self.limit:
            raise self.error(size, 0, self.limit)
        return _FakeArray(size)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_scratch_growth_falls_back_to_the_exact_size_and_recovers(monkeypatch):
    import sys

    from cublas_grouped.runtime.device import StreamResources

    fake_cupy = _FakeCupy(limit=1600)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    res = StreamResources(0, 7, 1)
    assert res.buffer("pointers", 1000).nbytes == 1000
    assert res.buffer("pointers", 1500).nbytes == 1500  # twice 1000 does not fit; exactly 1500 does
    assert fake_cupy.asked == [1000, 2000, 1500]
    with pytest.raises(MemoryError):
        res.buffer("pointers", 5000)
    assert "pointers" not in res.buffers  # no stale entry: the old buffer was given back first
    assert res.buffer("pointers", 800).nbytes == 800


def test_the_benchmark_reports_its_own_out_of_memory_with_bytes():
    from cublas_grouped.tools.bench.gpu import describe_error

    text = describe_error(_cupy_oom(1 << 30))
    assert text.startswith("GpuOutOfMemoryError: the benchmark's buffers: out of GPU memory allocating")
    assert "1,073,741,824 bytes (1.00 GiB)" in text
    assert describe_error(ValueError("x\ny")) == "ValueError: x"
