"""The on-disk cache of compiled kernels: entries checked before use, written atomically.

Each entry is one cubin under ``<root>/v1/<2 hex>/<62 hex>.cubin``, named by the
SHA-256 of a key that covers the source, the NVRTC options (the defines among
them) and the NVRTC version (``cuda.core.utils.make_program_cache_key``), so a
stale entry is never found. The cubin is followed by a 48-byte trailer:
``MAGIC``, the cubin's length (8 bytes, little endian) and its SHA-256, so the
file stays an ELF file that ``cuobjdump`` reads. Before an entry is used:

- the trailer must be there and agree with the length and the digest
  (an emptied, truncated, overwritten or partly rewritten file fails here);
- the cubin must be a 64-bit little-endian ELF for ``EM_CUDA`` whose header,
  program and section tables lie inside the file (:func:`cubin_problem`).

A failing entry is reported with a :class:`KernelCacheWarning` naming the
file, deleted, and the caller recompiles and stores a new one. Writes go to a
temporary file in the entry's folder, are flushed to disk, then
``os.replace``-d over the entry: a reader, in this process or another, sees the
old entry or the new one, never half of one, and writers of the same entry
(several processes compiling the same kernel at once) each replace it whole.

Why not ``cuda.core.utils.FileStreamProgramCache``: it stores the bytes as they
are and does no check on reading (its documentation leaves that to the caller),
and it does not say which file an entry is, which the warning must.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
import warnings
from pathlib import Path

__all__ = ["KernelCache", "KernelCacheWarning", "MAGIC", "TRAILER_BYTES", "cubin_problem", "frame"]

MAGIC = b"CGKCACHE"
TRAILER_BYTES = len(MAGIC) + 8 + 32
_EM_CUDA = 190
_ELF64_HEADER = 64
_SHT_NOBITS = 8


class KernelCacheWarning(RuntimeWarning):
    """The kernel cache could not be used as it is: a damaged entry (recompiled and
    replaced), or an unusable location (kernels then compile in memory only)."""


def frame(cubin: bytes) -> bytes:
    """The bytes of a cache entry holding ``cubin``: the cubin, then the trailer."""
    return cubin + MAGIC + struct.pack("<Q", len(cubin)) + hashlib.sha256(cubin).digest()


def cubin_problem(data: bytes) -> str | None:
    """What makes ``data`` no plausible cubin (None when it is one).

    A structural check, not a proof: a 64-bit little-endian ELF file for
    ``EM_CUDA`` whose program and section header tables, and every section
    with contents, lie inside ``data``.
    """
    if len(data) < _ELF64_HEADER:
        return f"{len(data)} bytes, shorter than an ELF header"
    if data[:4] != b"\x7fELF":
        return "no ELF magic"
    if data[4] != 2 or data[5] != 1:
        return "not a 64-bit little-endian ELF file"
    (machine,) = struct.unpack_from("<H", data, 18)
    if machine != _EM_CUDA:
        return f"ELF machine {machine}, not EM_CUDA ({_EM_CUDA})"
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    if shnum == 0 or shentsize < 64:
        return "no section header table"
    for what, offset, size in (("program", phoff, phentsize * phnum), ("section", shoff, shentsize * shnum)):
        if offset + size > len(data):
            return f"the {what} header table ends at byte {offset + size}, past the end ({len(data)})"
    for i in range(shnum):
        sh_type, _, _, sh_offset, sh_size = struct.unpack_from("<4xIQQQQ", data, shoff + i * shentsize)
        if sh_type != _SHT_NOBITS and sh_offset + sh_size > len(data):
            return f"section {i} ends at byte {sh_offset + sh_size}, past the end ({len(data)})"
    return None


def _unframe(data: bytes) -> tuple[bytes | None, str | None]:
    """(cubin, None) for a sound entry, else (None, what is wrong)."""
    if not data:
        return None, "empty file"
    if len(data) < TRAILER_BYTES or data[-TRAILER_BYTES : -TRAILER_BYTES + len(MAGIC)] != MAGIC:
        return None, f"{len(data)} bytes without the cache trailer (truncated or overwritten)"
    (length,) = struct.unpack_from("<Q", data, len(data) - 40)
    cubin = data[:-TRAILER_BYTES]
    if length != len(cubin):
        return None, f"the trailer gives {length} bytes of code but {len(cubin)} are there"
    if hashlib.sha256(cubin).digest() != data[-32:]:
        return None, "the SHA-256 checksum does not match the contents"
    problem = cubin_problem(cubin)
    if problem is not None:
        return None, f"not a cubin: {problem}"
    return cubin, None


class KernelCache:
    """A folder of checked, atomically written cubins (see the module notes).

    ``root`` is created on first write; nothing is created or checked at
    construction. Every method may raise ``OSError`` from the file system except
    :meth:`get`, which treats an unreadable entry as a miss (the write that
    follows then says whether the location is usable).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.entries = self.root / "v1"

    def path_for(self, key: bytes) -> Path:
        """The entry file of ``key``."""
        digest = hashlib.sha256(key).hexdigest()
        return self.entries / digest[:2] / f"{digest[2:]}.cubin"

    def get(self, key: bytes) -> bytes | None:
        """The cubin stored under ``key``; None when there is none or it is damaged
        (then a :class:`KernelCacheWarning` names the file, which is deleted)."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None  # missing, or unreadable: the caller compiles and stores
        cubin, problem = _unframe(data)
        if cubin is None:
            self.discard(key, f"is damaged ({problem})")
        return cubin

    def discard(self, key: bytes, why: str) -> None:
        """Warn that the entry of ``key`` ``why`` and delete it (best effort)."""
        path = self.path_for(key)
        warnings.warn(
            f"cublas_grouped kernel cache entry {path} {why}; it is ignored, recompiled and replaced",
            KernelCacheWarning,
            stacklevel=4,
        )
        with contextlib.suppress(OSError):
            path.unlink()

    def put(self, key: bytes, cubin: bytes) -> Path:
        """Store ``cubin`` under ``key`` atomically; returns the entry's path.

        Raises ``OSError`` when the location cannot be written (not a folder,
        read-only, full); no partial entry is left behind.
        """
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(frame(cubin))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path
