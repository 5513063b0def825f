"""Security on the CPU: who the kernel cache trusts, hostile tuning tables, the
expert-parallel start-up store on real loopback sockets, and no code from data.

Each test builds the hostile input (a file of another owner, a table of huge
numbers, a client with the wrong token) and checks that the library refuses it,
says why, and goes on with the right answer."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import socket
import stat
import struct
import sys
import threading
import time
import tokenize
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tuning_util import entry, isolate_tuning, write_table

from cublas_grouped import launch
from cublas_grouped.distributed import group, store
from cublas_grouped.distributed.store import StoreAuthError, StoreTimeoutError, TCPStore
from cublas_grouped.gemm import select, tables
from cublas_grouped.gemm.config import Algorithm
from cublas_grouped.gemm.plan import ProblemStats
from cublas_grouped.moe.kernels import DEFINES as MOE_DEFINES
from cublas_grouped.runtime import kernel_cache as kc
from cublas_grouped.runtime import nvrtc
from cublas_grouped.runtime.device import DeviceInfo

ROOT = Path(__file__).resolve().parent.parent
DISPATCH = ("dispatch", "sm_90", MOE_DEFINES["dispatch"])
ROUTING = ("routing", "sm_80", MOE_DEFINES["routing"])
ME = os.getuid()
posix_only = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")


# -- the kernel cache ---------------------------------------------------------------------------------------


def _fresh_process(monkeypatch):
    """nvrtc as a new process finds it: nothing compiled, the cache not yet opened."""
    for name, value in (
        ("_compiled", {}),
        ("_from_disk", {}),
        ("_kernels", {}),
        ("_disk_cache", None),
        ("_disk_cache_ready", False),
        ("_disk_warned", False),
    ):
        monkeypatch.setattr(nvrtc, name, value)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "kernels"
    monkeypatch.setenv("CUBLAS_GROUPED_CACHE_DIR", str(root))
    _fresh_process(monkeypatch)
    return root


def _compile(which) -> bytes:
    name, arch, defines = which
    return bytes(nvrtc.compile_source(name, arch, defines).code)


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.cubin"))


def _cache_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, kc.KernelCacheWarning)]


def _fake_stat(uid, mode):
    return SimpleNamespace(st_uid=uid, st_mode=mode)


@pytest.mark.parametrize(
    "uid, mode, problem",
    [
        (ME, stat.S_IFDIR | 0o700, None),
        (ME, stat.S_IFREG | 0o600, None),
        (ME, stat.S_IFDIR | 0o755, None),  # others may read: the kernels' source is public anyway
        (ME, stat.S_IFREG | 0o444, None),
        (ME + 1, stat.S_IFDIR | 0o700, f"is owned by uid {ME + 1}, not by this user (uid {ME})"),
        (ME + 1000, stat.S_IFREG | 0o600, f"is owned by uid {ME + 1000}, not by this user (uid {ME})"),
        (ME, stat.S_IFDIR | 0o770, "is writable by its group or by others (mode 770)"),
        (ME, stat.S_IFREG | 0o620, "is writable by its group or by others (mode 620)"),
        (ME, stat.S_IFREG | 0o602, "is writable by its group or by others (mode 602)"),
        (ME, stat.S_IFDIR | 0o1777, "is writable by its group or by others (mode 1777)"),  # /tmp itself
    ],
)
def test_trust_problem_on_fake_stat_results(uid, mode, problem):
    assert kc.trust_problem(_fake_stat(uid, mode), ME) == problem


def test_trust_problem_without_posix_owners_trusts():
    assert kc.trust_problem(_fake_stat(12345, 0o777), None) is None


@posix_only
def test_cache_folders_are_created_private_and_entries_0600(tmp_path):
    cubin = _compile(ROUTING)
    old = os.umask(0o022)  # the common umask, which made 0755 folders before
    try:
        root = tmp_path / "new" / "kernels"
        path = kc.KernelCache(root).put(b"key", cubin)
    finally:
        os.umask(old)
    for folder in (tmp_path / "new", root, root / "v1", path.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert kc.KernelCache(root).get(b"key") == cubin


@posix_only
def test_a_tampered_entry_fails_the_integrity_check_and_is_deleted(tmp_path):
    cubin = _compile(ROUTING)
    cache = kc.KernelCache(tmp_path)
    path = cache.put(b"key", cubin)
    data = bytearray(path.read_bytes())
    data[len(cubin) // 2] ^= 0x01  # one bit of code changed, trailer kept
    path.write_bytes(bytes(data))
    with pytest.warns(
        kc.KernelCacheWarning, match=rf"{path} is damaged \(the SHA-256 checksum does not match"
    ):
        assert cache.get(b"key") is None
    assert not path.exists()


@posix_only
def test_an_entry_owned_by_another_user_is_refused_and_recompiled(cache_dir, monkeypatch):
    expected = _compile(DISPATCH)
    (path,) = _entries(cache_dir)
    _fresh_process(monkeypatch)
    real = os.fstat
    monkeypatch.setattr(kc, "_fstat", lambda fd: _fake_stat(ME + 7, real(fd).st_mode))
    compiled = []
    real_compile = nvrtc._compile
    monkeypatch.setattr(nvrtc, "_compile", lambda *a: compiled.append(a[0]) or real_compile(*a))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _compile(DISPATCH)
    (message,) = _cache_warnings(record)
    assert f"{path} is owned by uid {ME + 7}, not by this user (uid {ME})" in message
    assert "ignored, recompiled and replaced" in message
    assert compiled == ["dispatch"] and got == expected
    monkeypatch.setattr(kc, "_fstat", real)
    assert path.read_bytes() == kc.frame(expected)  # replaced by this user's own entry


@posix_only
@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_group_or_other_writable_entry_is_never_loaded(cache_dir, monkeypatch, mode):
    expected = _compile(DISPATCH)
    (path,) = _entries(cache_dir)
    # What a co-user could leave there: well-formed (its trailer checks out) but other code.
    path.write_bytes(kc.frame(_compile(ROUTING)))
    os.chmod(path, mode)
    _fresh_process(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _compile(DISPATCH)
    (message,) = _cache_warnings(record)
    assert f"{path} is writable by its group or by others (mode {mode:o})" in message
    assert got == expected
    assert path.read_bytes() == kc.frame(expected) and stat.S_IMODE(path.stat().st_mode) == 0o600


@posix_only
def test_a_symbolic_link_entry_is_never_followed(cache_dir, monkeypatch, tmp_path):
    expected = _compile(DISPATCH)
    (path,) = _entries(cache_dir)
    elsewhere = tmp_path / "elsewhere.cubin"
    elsewhere.write_bytes(kc.frame(_compile(ROUTING)))
    path.unlink()
    path.symlink_to(elsewhere)
    _fresh_process(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _compile(DISPATCH) == expected
    (message,) = _cache_warnings(record)
    assert f"{path} is a symbolic link" in message
    assert elsewhere.read_bytes() == kc.frame(_compile(ROUTING))  # the link's target is left alone


@posix_only
def test_a_fifo_entry_neither_blocks_nor_loads(cache_dir, monkeypatch):
    expected = _compile(DISPATCH)
    (path,) = _entries(cache_dir)
    path.unlink()
    os.mkfifo(path, 0o600)
    _fresh_process(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _compile(DISPATCH) == expected
    (message,) = _cache_warnings(record)
    assert f"{path} is not a regular file" in message
    assert path.read_bytes() == kc.frame(expected)


def _untrusted_folder(kind, root: Path, monkeypatch) -> str:
    """Make the cache under ``root`` untrusted in one way; returns what the warning must say."""
    if kind == "foreign-owner":
        monkeypatch.setattr(kc, "_current_uid", lambda: ME + 3)
        return f"the kernel cache folder {root} is owned by uid {ME}, not by this user (uid {ME + 3})"
    folder = {"root-group-writable": root, "v1-other-writable": root / "v1", "world-tmp": root}[kind]
    mode = {"root-group-writable": 0o770, "v1-other-writable": 0o703, "world-tmp": 0o1777}[kind]
    os.chmod(folder, mode)
    return f"the kernel cache folder {folder} is writable by its group or by others (mode {mode:o})"


@posix_only
@pytest.mark.parametrize("kind", ["foreign-owner", "root-group-writable", "v1-other-writable", "world-tmp"])
def test_an_untrusted_cache_folder_is_not_used_and_kernels_compile_in_memory(cache_dir, monkeypatch, kind):
    expected = {w[0]: _compile(w) for w in (DISPATCH, ROUTING)}
    for path in _entries(cache_dir):  # a co-user swapped the code: it must not be read
        path.write_bytes(kc.frame(b"\x7fELF" + bytes(200)))
    before = {p: p.read_bytes() for p in _entries(cache_dir)}
    _fresh_process(monkeypatch)
    reason = _untrusted_folder(kind, cache_dir, monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = {w[0]: _compile(w) for w in (DISPATCH, ROUTING)}
    assert got == expected
    (message,) = _cache_warnings(record)  # one warning for the process, naming the folder and why
    assert reason in message and "compiled in memory for this process only" in message
    assert nvrtc._disk_cache is None
    assert {p: p.read_bytes() for p in _entries(cache_dir)} == before  # nothing read, nothing written


@posix_only
def test_an_untrusted_folder_is_never_written_either(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(kc.UntrustedCacheError, match=f"the kernel cache folder {root} is writable"):
        kc.KernelCache(root).put(b"key", b"\x7fELF")
    assert not list(root.rglob("*.cubin"))


# -- tuning tables ------------------------------------------------------------------------------------------

H100 = "NVIDIA H100 80GB HBM3"
QWEN = ProblemStats(128, 128, 32768, 280, 1536, 2048)


def _device():
    return DeviceInfo(sm=(9, 0), cublas_version=130100, name=H100)


def _doc(entries, **top):
    return json.dumps({"gpu": H100, "cublas_version": 130100, "sm": [9, 0], "entries": entries, **top})


def _nested(depth):
    return "[" * depth + "]" * depth


HOSTILE = {
    "huge-n": (_doc([entry(n=10**40)]), "needs n and k >= 1"),
    "huge-k-just-over": (_doc([entry(k=2**31)]), "needs n and k >= 1"),
    "huge-experts": (_doc([entry(experts=10**400, active=1)]), "needs num_experts >= 1"),
    "huge-active": (_doc([entry(experts=2**40, active=2**40)]), "needs num_experts >= 1"),
    "huge-rows": (_doc([entry(mean_rows=1e300)]), "has mean_rows 1e+300"),
    "huge-max-rows": (_doc([entry(max_rows=2**63)]), "has max_rows 9223372036854775808"),
    "huge-time": (_doc([entry(times={"sequential": 1e300})]), "time of 1e+300 ms"),
    "huge-version": (_doc([], cublas_version=10**30), "cublas_version an int below"),
    "infinite-sm": (_doc([entry()], sm=[float("inf"), 0]), "sm must be [major, minor]"),
    "huge-sm": (_doc([entry()], sm=[10**30, 0]), "sm must be [major, minor]"),
    "negative-sm": (_doc([entry()], sm=[-9, 0]), "sm must be [major, minor]"),
    "sm-a-word": (_doc([entry()], sm="nine"), "sm must be [major, minor]"),
    "negative-n": (_doc([entry(n=-1536)]), "needs n and k >= 1"),
    "negative-max-rows": (_doc([entry(max_rows=-5)]), "has max_rows -5"),
    "negative-rows": (_doc([entry(mean_rows=-1e-9)]), "has mean_rows -1e-09"),
    "negative-time": (_doc([entry(times={"sequential": -1.0})]), "time of -1.0 ms"),
    "nan-rows": (_doc([entry(mean_rows=float("nan"))]), "has mean_rows nan"),
    "n-a-string": (_doc([entry(n="1536")]), "needs n and k >= 1"),
    "experts-a-bool": (_doc([entry(experts=True, active=1)]), "needs num_experts >= 1"),
    "dtype-an-object": (_doc([{**entry(), "dtype": {"name": "bfloat16"}}]), "needs a dtype name"),
    "dtype-huge": (_doc([{**entry(), "dtype": "b" * 100_000}]), "needs a dtype name"),
    "layout-a-list": (_doc([{**entry(), "layout": ["gmm"]}]), "has a layout that is not a short name"),
    "gpu-huge": (_doc([], gpu="G" * 10_000), "gpu must be a string of at most 256"),
    "entries-an-object": (
        json.dumps({"gpu": H100, "cublas_version": 1, "entries": {}}),
        "no list of entries",
    ),
    "table-a-list": ("[]", "no list of entries"),
    "deep-in-an-entry": (_doc([])[:-2] + _nested(50_000) + "]}", "is not valid JSON"),
    "deep-in-times": (
        _doc([{**entry(), "times_ms": {"sequential": 1.0}}]).replace(
            "1.0}", '1.0, "x": ' + _nested(20_000) + "}"
        ),
        "is not valid JSON",
    ),
    "huge-integer-literal": (_doc([]).replace("130100", "9" * 5000), "is not valid JSON"),
    "too-large-a-file": (_doc([entry()]) + " " * tables.MAX_TABLE_BYTES, "is larger than 16777216 bytes"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_table_is_ignored_with_a_warning_and_nothing_escapes(tmp_path, monkeypatch, kind):
    user, shipped = isolate_tuning(tmp_path, monkeypatch)
    monkeypatch.setattr(tables, "_warned_files", set())
    text, problem = HOSTILE[kind]
    bad = user / "hostile.json"
    bad.write_text(text)
    with pytest.raises(ValueError, match=_re(problem)):  # the loader raises ValueError, nothing else
        tables.TuningTable.load(bad)
    write_table(shipped, "good.json", H100, 120900, [entry(times={"cublas_grouped": 1.0, "sequential": 2.0})])
    with pytest.warns(
        RuntimeWarning, match=rf"ignores a damaged tuning file \({_re(str(bad))}.*{_re(problem)}"
    ):
        table, why = tables.tuning_table_for(_device())
    assert "good.json" in why and table.nearest(QWEN) == {
        Algorithm.CUBLAS_GROUPED: 1.0,
        Algorithm.SEQUENTIAL: 2.0,
    }


def test_too_many_entries_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "MAX_TABLE_ENTRIES", 3)
    path = tmp_path / "t.json"
    path.write_text(_doc([entry()] * 4))
    with pytest.raises(ValueError, match="has 4 entries, over 3"):
        tables.TuningTable.load(path)
    path.write_text(_doc([entry()] * 3))
    assert len(tables.TuningTable.load(path).entries) == 3


def test_tables_at_the_bounds_still_load(tmp_path):
    top = tables.MAX_TABLE_COUNT
    edge = entry(
        n=top, k=top, experts=top, active=top, mean_rows=top, max_rows=top, times={"sequential": 1e7}
    )
    path = tmp_path / "edge.json"
    path.write_text(_doc([edge, entry()]) + " " * (tables.MAX_TABLE_BYTES - len(_doc([edge, entry()]))))
    assert path.stat().st_size == tables.MAX_TABLE_BYTES
    assert len(tables.TuningTable.load(path).entries) == 2


def test_a_measurement_file_of_huge_numbers_never_steers_auto(tmp_path, monkeypatch):
    from cublas_grouped.gemm import autotune as at

    isolate_tuning(tmp_path, monkeypatch)
    monkeypatch.setattr(tables, "_warned_files", set())
    device = _device()
    path = at.autotune_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_doc([{**entry(experts=10**400, active=1), "layout": "gmm"}]))
    with pytest.warns(RuntimeWarning, match="needs num_experts >= 1"):
        assert at._store_for(device).entries == []


def test_table_times_choose_only_among_the_algorithms_the_plan_allows(tmp_path):
    """A table only ranks algorithms: whatever it says, the choice is one the problem
    allows (PADDED_STRIDED needs a padded layout the caller sized), never a size."""
    rng = np.random.default_rng(0)
    names = [a.value for a in Algorithm if a is not Algorithm.AUTO]
    for trial in range(50):
        times = {name: float(rng.uniform(1e-6, 1e7)) for name in names}
        table = tables.TuningTable(H100, 130100, [entry(n=1536, k=2048, times=times)], [9, 0])
        for padded in (False, True):
            allowed = select.with_own_kernel(
                select.allowed_algorithms(_device(), padded_layouts=padded), _device(), QWEN
            )
            chosen = select.select_algorithm(QWEN, _device(), padded_layouts=padded, table=table)
            assert chosen in allowed, (trial, padded, times)


def test_no_table_value_reaches_a_buffer_size():
    """The audit as a test: only selection code and the tuner (which writes tables,
    never reads them) name a table; selection reads no entry's sizes, so what it
    hands on is a dict of times or an algorithm, never a size (docs/security.md)."""
    readers = set()
    for path in (ROOT / "cublas_grouped").rglob("*.py"):
        text = path.read_text()
        if any(name in text for name in ("TuningTable", "load_tuning_table", "tuning_table_for")):
            readers.add(path.relative_to(ROOT / "cublas_grouped").as_posix())
    assert readers == {"__init__.py", "gemm/tables.py", "gemm/select.py", "gemm/autotune.py", "tools/tune.py"}
    for name in ("gemm/select.py", "gemm/autotune.py"):
        text = (ROOT / "cublas_grouped" / name).read_text()
        for field in ("max_rows", "mean_rows", "num_experts", "active_experts", '"n"', '"k"'):
            assert f"[{field}]" not in text and f'["{field}"]' not in text, f"{name} reads an entry's {field}"


def _re(text: str) -> str:
    import re

    return re.escape(text)


# -- the start-up store -------------------------------------------------------------------------------------


@pytest.fixture
def served():
    """A store served on loopback (no token) and a function that opens raw connections to it."""
    server = TCPStore("127.0.0.1", 0, is_server=True, timeout=5)
    opened = []

    def connect(token=b"", handshake=True):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        opened.append(sock)
        if handshake:
            challenge = _recv(sock, len(store.MAGIC) + 32)
            sock.sendall(hmac.new(token, challenge, hashlib.sha256).digest())
            assert _recv(sock, 1) == b"\x01"
        return sock

    yield server, connect
    for sock in opened:
        sock.close()
    server.close()


def _recv(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _closed_by_server(sock, within=5.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _still_serves(server):
    client = TCPStore("127.0.0.1", server.port, is_server=False, timeout=5)
    try:
        client.set("ok", b"yes")
        return server.get("ok", timeout=2) == b"yes"
    finally:
        client.close()


MALFORMED = {
    "unknown-op": b"X",
    "key-too-long": b"S" + struct.pack("!I", store.MAX_KEY_BYTES + 1) + b"k" * (store.MAX_KEY_BYTES + 1),
    "key-4-gib": b"G" + struct.pack("!I", 2**32 - 1),
    "empty-key": b"S" + struct.pack("!I", 0) + struct.pack("!Q", 1) + b"v",
    "key-not-ascii": b"S" + struct.pack("!I", 2) + b"\xff\xfe" + struct.pack("!Q", 1) + b"v",
    "key-with-space": b"S" + struct.pack("!I", 3) + b"a b" + struct.pack("!Q", 1) + b"v",
    "value-too-long": b"S" + struct.pack("!I", 1) + b"k" + struct.pack("!Q", store.MAX_VALUE_BYTES + 1),
    "value-2-pow-64": b"S" + struct.pack("!I", 1) + b"k" + struct.pack("!Q", 2**64 - 1),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_the_store_drops_oversized_or_malformed_messages(served, kind):
    server, connect = served
    sock = connect()
    sock.sendall(MALFORMED[kind])
    assert _closed_by_server(sock)
    assert "k" not in server._server.data and _still_serves(server)


def test_the_store_bounds_the_number_of_keys_and_bytes(served, monkeypatch):
    server, connect = served
    monkeypatch.setattr(store, "MAX_KEYS", 3)
    monkeypatch.setattr(store, "MAX_STORED_BYTES", 100)
    sock = connect()
    for i in range(3):
        sock.sendall(b"S" + struct.pack("!I", 2) + f"k{i}".encode() + struct.pack("!Q", 10) + bytes(10))
        assert _recv(sock, 1) == b"\x01"
    sock.sendall(b"S" + struct.pack("!I", 2) + b"k3" + struct.pack("!Q", 1) + b"x")
    assert _closed_by_server(sock)
    sock = connect()
    sock.sendall(b"S" + struct.pack("!I", 2) + b"k0" + struct.pack("!Q", 91) + bytes(91))  # 20 + 91 > 100
    assert _closed_by_server(sock)
    assert sorted(server._server.data) == ["k0", "k1", "k2"] and server._server.stored == 30


def test_the_store_ends_a_handshake_that_never_comes(served, monkeypatch):
    server, connect = served
    monkeypatch.setattr(store, "HANDSHAKE_TIMEOUT_S", 0.3)
    sock = connect(handshake=False)
    start = time.monotonic()
    assert _recv(sock, len(store.MAGIC) + 32).startswith(store.MAGIC)
    assert _closed_by_server(sock) and time.monotonic() - start < 3
    assert _still_serves(server)


def test_the_store_ends_a_message_that_stops_halfway(served, monkeypatch):
    server, connect = served
    monkeypatch.setattr(store, "MESSAGE_TIMEOUT_S", 0.3)
    sock = connect()
    sock.sendall(b"S" + struct.pack("!I", 1) + b"k" + struct.pack("!Q", 100) + b"only part")
    start = time.monotonic()
    assert _closed_by_server(sock) and time.monotonic() - start < 3
    assert "k" not in server._server.data


def test_wrong_or_missing_tokens_are_refused_before_any_request():
    server = TCPStore("127.0.0.1", 0, is_server=True, timeout=5, token="right")
    try:
        for token in ("wrong", None, "righ", "right "):
            start = time.monotonic()
            with pytest.raises(
                StoreAuthError, match="its token differs from rank 0's .*CUBLAS_GROUPED_STORE_TOKEN"
            ):
                TCPStore("127.0.0.1", server.port, is_server=False, timeout=5, token=token)
            assert time.monotonic() - start < 2  # refused at once, not after the timeout
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        challenge = _recv(raw, len(store.MAGIC) + 32)
        raw.sendall(hmac.new(b"wrong", challenge, hashlib.sha256).digest())
        assert _recv(raw, 1) == b"\x00" and _closed_by_server(raw)
        raw.close()
        good = TCPStore("127.0.0.1", server.port, is_server=False, timeout=5, token=b"right")
        good.set("id", bytes(range(128)))
        assert server.get("id") == bytes(range(128))
        good.close()
    finally:
        server.close()


def test_a_token_set_on_clients_only_is_refused_too():
    server = TCPStore("127.0.0.1", 0, is_server=True, timeout=5)
    try:
        with pytest.raises(StoreAuthError):
            TCPStore("127.0.0.1", server.port, is_server=False, timeout=5, token="mine")
    finally:
        server.close()


def test_each_handshake_has_a_fresh_challenge(served):
    server, connect = served
    a = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    b = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        first, second = _recv(a, len(store.MAGIC) + 32), _recv(b, len(store.MAGIC) + 32)
        assert first[: len(store.MAGIC)] == second[: len(store.MAGIC)] == store.MAGIC and first != second
    finally:
        a.close()
        b.close()


def _listening_on_wildcard_reaches(addr: str) -> bool:
    """Whether a socket bound to every interface can be reached at ``addr`` (the control)."""
    with socket.create_server(("0.0.0.0", 0)) as s:
        try:
            socket.create_connection((addr, s.getsockname()[1]), timeout=2).close()
            return True
        except OSError:
            return False


def test_the_store_binds_only_where_told():
    if not _listening_on_wildcard_reaches("127.0.0.2"):
        pytest.skip("127.0.0.2 is not a loopback address here")
    server = TCPStore("127.0.0.1", 0, is_server=True, timeout=5)
    try:
        assert server.address == ("127.0.0.1", server.port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", server.port), timeout=2).close()
        with pytest.raises(StoreTimeoutError, match="could not reach rank 0's store at 127.0.0.2"):
            TCPStore("127.0.0.2", server.port, is_server=False, timeout=0.5)
    finally:
        server.close()
    other = TCPStore("127.0.0.2", 0, is_server=True, timeout=5)
    try:
        assert other.address == ("127.0.0.2", other.port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", other.port), timeout=2).close()
    finally:
        other.close()


def test_an_empty_address_which_means_every_interface_is_refused():
    with pytest.raises(ValueError, match="an empty one would listen on every interface"):
        TCPStore("", 0, is_server=True, timeout=1)
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29500", "MASTER_ADDR": ""}
    with pytest.raises(ValueError, match="MASTER_ADDR is empty"):
        group.read_launch_env(env)


def test_clients_refuse_bad_keys_and_values_before_sending(served):
    server, _ = served
    with pytest.raises(ValueError, match="value must be at most 4194304 bytes; got 4194305"):
        server.set("k", bytes(store.MAX_VALUE_BYTES + 1))
    with pytest.raises(ValueError, match="a key must be printable ASCII"):
        server.set("a key", b"")
    with pytest.raises(ValueError, match="a key must be 1 to 256 bytes; got 257"):
        server.get("k" * 257, timeout=0.1)
    server.set("k" * 256, bytes(store.MAX_VALUE_BYTES))
    assert len(server.get("k" * 256)) == store.MAX_VALUE_BYTES


def _fake_server(reply_after_request: bytes, magic=store.MAGIC):
    """A server that speaks the handshake (any proof accepted) then answers ``reply_after_request``."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        with listener, contextlib.suppress(OSError):  # the client may hang up first
            conn, _ = listener.accept()
            with conn:
                conn.sendall(magic + bytes(32))
                _recv(conn, 32)
                conn.sendall(b"\x01")
                conn.recv(1 << 16)
                conn.sendall(reply_after_request)
                time.sleep(1)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def test_a_client_refuses_an_oversized_answer_without_reading_it():
    port = _fake_server(struct.pack("!Q", 2**40))
    client = TCPStore("127.0.0.1", port, is_server=False, timeout=3)
    try:
        with pytest.raises(StoreTimeoutError, match="announced a value of 1099511627776 bytes"):
            client.get("nccl_unique_id")
    finally:
        client.close()


def test_a_client_refuses_a_server_that_is_not_a_store():
    port = _fake_server(b"", magic=b"HTTP/1.1")
    with pytest.raises(store.StoreProtocolError, match=r"127\.0\.0\.1:\d+ is not a cublas_grouped store"):
        TCPStore("127.0.0.1", port, is_server=False, timeout=0.5)


def test_the_token_comes_from_the_environment_and_is_never_printed():
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "CUBLAS_GROUPED_STORE_TOKEN": "s3cret"}
    info = group.read_launch_env(env)
    assert info.store_token == "s3cret" and "s3cret" not in repr(info)
    assert group.read_launch_env({**env, "CUBLAS_GROUPED_STORE_TOKEN": ""}).store_token is None
    assert launch.STORE_TOKEN_ENV == store.TOKEN_ENV == "CUBLAS_GROUPED_STORE_TOKEN"


def test_the_launcher_gives_its_ranks_one_fresh_token(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(
        "import os, pathlib, sys\n"
        "pathlib.Path(sys.argv[1], os.environ['RANK']).write_text(os.environ['CUBLAS_GROUPED_STORE_TOKEN'])\n"
    )
    tokens = []
    for env in (dict(os.environ), dict(os.environ)):
        env.pop("CUBLAS_GROUPED_STORE_TOKEN", None)
        out = tmp_path / f"run{len(tokens)}"
        out.mkdir()
        assert launch.launch([sys.executable, str(script), str(out)], 2, env=env) == 0
        seen = {(out / r).read_text() for r in ("0", "1")}
        assert len(seen) == 1 and len(next(iter(seen))) == 64
        tokens.append(seen.pop())
    assert tokens[0] != tokens[1]  # a new one per launch
    out = tmp_path / "kept"
    out.mkdir()
    env = {**os.environ, "CUBLAS_GROUPED_STORE_TOKEN": "given"}
    assert launch.launch([sys.executable, str(script), str(out)], 2, env=env) == 0
    assert (out / "0").read_text() == (out / "1").read_text() == "given"


# -- no code from data --------------------------------------------------------------------------------------

# Modules and names that turn data into code (or a shell command). Attribute
# uses count too for these: ``pickle.loads``, ``yaml.load``, ``np.load(allow_pickle=...)``.
FORBIDDEN_ANYWHERE = {
    "pickle",
    "cPickle",
    "_pickle",
    "cloudpickle",
    "dill",
    "jsonpickle",
    "joblib",
    "marshal",
    "shelve",
    "copyreg",
    "yaml",
    "runpy",
    "import_module",
    "allow_pickle",
    "system",
    "popen",
    "shell",
}
# Builtins that run code; attributes of the same name (``Program.compile``,
# ``re.compile``) are other functions and are allowed.
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__", "execfile", "breakpoint", "input"}
# (file relative to cublas_grouped/, name) pairs allowed with a reason. Keep it empty unless justified.
ALLOWED: dict[tuple[str, str], str] = {}


def code_from_data_uses(source: str) -> list[tuple[int, str]]:
    """(line, name) of every forbidden name in ``source``'s code (strings and comments skipped)."""
    found, previous = [], None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            attribute = previous is not None and previous.type == tokenize.OP and previous.string == "."
            if tok.string in FORBIDDEN_ANYWHERE or (tok.string in FORBIDDEN_BUILTINS and not attribute):
                found.append((tok.start[0], tok.string))
        if tok.type not in (
            tokenize.NL,
            tokenize.NEWLINE,
            tokenize.COMMENT,
            tokenize.INDENT,
            tokenize.DEDENT,
        ):
            previous = tok
    return found


@pytest.mark.parametrize(
    "source, names",
    [
        ("import pickle\nx = pickle.loads(b)\n", ["pickle", "pickle"]),
        ("from yaml import load\n", ["yaml"]),
        ("import yaml\nyaml.load(s)\n", ["yaml", "yaml"]),
        ("eval(text)\n", ["eval"]),
        ("f = exec\n", ["exec"]),
        ("code = compile(s, 'f', 'exec')\n", ["compile"]),
        ("m = __import__(name)\n", ["__import__"]),
        ("import importlib\nimportlib.import_module(n)\n", ["import_module"]),
        ("np.load(p, allow_pickle=True)\n", ["allow_pickle"]),
        ("import marshal, shelve\n", ["marshal", "shelve"]),
        ("subprocess.run(c, shell=True)\nos.system(c)\n", ["shell", "system"]),
        ("re.compile('x')\nprogram.compile('cubin')\n# eval(x)\ns = 'pickle'\n", []),
    ],
)
def test_the_scanner_finds_what_it_must(source, names):
    assert [name for _, name in code_from_data_uses(source)] == names


def test_no_code_from_data_in_the_package():
    package = ROOT / "cublas_grouped"
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        for line, name in code_from_data_uses(path.read_text()):
            if (rel, name) not in ALLOWED:
                found.append(f"cublas_grouped/{rel}:{line}: {name}")
    assert not found, "code from data (see docs/security.md):\n" + "\n".join(found)
    assert len(ALLOWED) == 0, "every allowed use needs a reason in docs/security.md"


@posix_only
def test_a_file_where_a_cache_folder_should_be_is_refused(tmp_path):
    """A regular file (ours, 0600) planted where an entry's folder goes: the
    folder check names it; nothing is read through it or written beside it."""
    cache = kc.KernelCache(tmp_path / "kernels")
    path = cache.path_for(b"key")
    path.parent.parent.mkdir(parents=True, mode=0o700)
    path.parent.write_bytes(b"not a folder")
    os.chmod(path.parent, 0o600)
    with pytest.raises(
        kc.UntrustedCacheError, match=f"the kernel cache folder {path.parent} is not a folder$"
    ):
        cache.check_folders(path)
    with pytest.raises(kc.UntrustedCacheError, match="is not a folder"):
        cache.put(b"key", b"\x7fELF")
    assert path.parent.read_bytes() == b"not a folder"


def test_entries_sit_in_a_folder_named_by_the_first_two_hex_digits(tmp_path):
    """The entry layout: entries/<first 2 hex digits of SHA-256(key)>/<the other 62>.cubin."""
    import hashlib

    cache = kc.KernelCache(tmp_path)
    digest = hashlib.sha256(b"some key").hexdigest()
    path = cache.path_for(b"some key")
    assert path.parent.name == digest[:2] and path.name == digest[2:] + ".cubin"
    assert path.parent.parent == cache.entries
