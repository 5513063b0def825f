"""Security on the GPU: a tampered or untrusted kernel cache entry never reaches the GPU.

``gmm`` with group sizes on the device and CUBLAS_GROUPED builds its pointer
arrays with the NVRTC ``pointers`` kernel, so its first call stores that kernel
in the disk cache. The entry is then tampered with in one of three ways (a
flipped bit with the trailer kept; another kernel's cubin, well framed, in a
group-writable file; the same under another owner, faked), the process state is
reset as in a new process, and the next call must: warn naming the entry,
never hand the entry's bytes to the driver (``ObjectCode.from_cubin`` is
watched), recompile, replace the entry with a sound one, and match float64.
"""

from __future__ import annotations

import os
import stat
import warnings

import cuda.core
import ml_dtypes
import numpy as np
import pytest
from gpu_util import TOLERANCE, check_close, device_random, poisoned

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm import pointers as _pointers
from cublas_grouped.moe.kernels import DEFINES as MOE_DEFINES
from cublas_grouped.runtime import kernel_cache as kc
from cublas_grouped.runtime import nvrtc

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16


def _fresh_process(monkeypatch):
    """nvrtc and the pointer kernel as a new process finds them."""
    for name, value in (
        ("_compiled", {}),
        ("_from_disk", {}),
        ("_kernels", {}),
        ("_disk_cache", None),
        ("_disk_cache_ready", False),
        ("_disk_warned", False),
    ):
        monkeypatch.setattr(nvrtc, name, value)
    monkeypatch.setattr(_pointers, "_kernel_for", {})


class _Watched:
    """Stands in for ``cuda.core.ObjectCode`` inside nvrtc: records every cubin handed to the driver."""

    real = cuda.core.ObjectCode
    seen: list[bytes] = []

    @classmethod
    def from_cubin(cls, data, *args, **kwargs):
        cls.seen.append(bytes(data))
        return cls.real.from_cubin(data, *args, **kwargs)


def _gmm_on_device_sizes(rng):
    """One gmm whose pointers the NVRTC kernel builds; returns (out, float64 reference)."""
    import cupy

    sizes = np.array([40, 0, 3, 77, 1, 0, 25], dtype=np.int64)
    a, a64 = device_random(rng, (int(sizes.sum()), 128), BF16)
    b, b64 = device_random(rng, (len(sizes), 128, 256), BF16, 128**-0.5)
    out = poisoned((int(sizes.sum()), 256), BF16)
    cg.gmm(a, b, cupy.asarray(sizes), out=out, algorithm="cublas_grouped")
    cupy.cuda.get_current_stream().synchronize()
    return out, ref.gmm_ref(a64, b64, sizes)


def _tamper(kind, path, monkeypatch) -> str:
    """Spoil ``path`` one way; returns what the warning must say about it."""
    if kind == "flipped-bit":
        data = bytearray(path.read_bytes())
        data[(len(data) - kc.TRAILER_BYTES) // 2] ^= 0x10
        path.write_bytes(bytes(data))
        return "is damaged (the SHA-256 checksum does not match the contents)"
    items = nvrtc.define_items(MOE_DEFINES["routing"])  # compiled aside: not through the cache under test
    other = bytes(
        nvrtc._compile(
            "routing", "sm_90", items, nvrtc.load_source("routing"), nvrtc._options("routing", "sm_90", items)
        ).code
    )
    path.write_bytes(kc.frame(other))  # passes the integrity check: only the owner check stops it
    if kind == "group-writable":
        os.chmod(path, 0o664)
        return "is writable by its group or by others (mode 664)"
    real = os.fstat
    uid = os.getuid()
    monkeypatch.setattr(
        kc, "_fstat", lambda fd: type("S", (), {"st_uid": uid + 1, "st_mode": real(fd).st_mode})
    )
    return f"is owned by uid {uid + 1}, not by this user (uid {uid})"


@pytest.mark.parametrize("kind", ["flipped-bit", "group-writable", "foreign-owner"])
def test_a_tampered_cache_entry_never_reaches_the_gpu(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("CUBLAS_GROUPED_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(cuda.core, "ObjectCode", _Watched)
    _fresh_process(monkeypatch)
    rng = np.random.default_rng(18)
    out, expected = _gmm_on_device_sizes(rng)
    check_close(out, expected, TOLERANCE["bfloat16"], "first call (compiled, stored)")
    entries = sorted((tmp_path / "kernels").rglob("*.cubin"))
    assert entries, "the first call cached no kernel"
    sound = {path: path.read_bytes() for path in entries}

    _fresh_process(monkeypatch)
    reasons = {path: _tamper(kind, path, monkeypatch) for path in entries}
    tampered = {path.read_bytes()[: -kc.TRAILER_BYTES] for path in entries}
    compiled = []
    real_compile = nvrtc._compile
    monkeypatch.setattr(nvrtc, "_compile", lambda *a: compiled.append(a[0]) or real_compile(*a))
    _Watched.seen = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, expected = _gmm_on_device_sizes(rng)
    check_close(out, expected, TOLERANCE["bfloat16"], f"after a {kind} entry")
    messages = [str(w.message) for w in record if issubclass(w.category, kc.KernelCacheWarning)]
    assert len(messages) == len(entries), messages
    for path, reason in reasons.items():
        assert any(f"{path} {reason}" in m for m in messages), (path, messages)
    assert _Watched.seen == [], "a cache entry was handed to the driver"
    assert not tampered & set(_Watched.seen)
    assert "pointers" in compiled and len(compiled) == len(entries)

    monkeypatch.setattr(kc, "_fstat", os.fstat)
    for path in entries:  # healed: this user's own sound entry, private
        assert path.read_bytes() == sound[path] and stat.S_IMODE(path.stat().st_mode) == 0o600
    _fresh_process(monkeypatch)
    out, expected = _gmm_on_device_sizes(rng)
    check_close(out, expected, TOLERANCE["bfloat16"], "next process (from the healed entries)")
    assert sorted(_Watched.seen) == sorted(data[: -kc.TRAILER_BYTES] for data in sound.values())
