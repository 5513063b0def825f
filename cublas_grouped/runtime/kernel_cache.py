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
file, deleted, and the caller recompiles and stores a new one.

Who wrote an entry matters as much as whether it is whole: a cubin is code
that runs in this process. Folders the cache creates are private (mode
0700) and entries are written 0600. Before an entry is read, the root, the
``v1`` folder, the entry's folder and the opened file itself must each be
owned by the current user and writable by nobody else (:func:`trust_problem`);
a folder that fails raises :class:`UntrustedCacheError` (the caller then
compiles in memory for the process), a file that fails is treated as a
damaged entry (as is a symbolic link or anything but a regular file). The
folders above the root are trusted as they are.

Writes go to a temporary file in the entry's folder, are flushed to disk, then
``os.replace``-d over the entry: a reader, in this process or another, sees the
old entry or the new one, never half of one, and writers of the same entry
(several processes compiling the same kernel at once) each replace it whole.

Why not ``cuda.core.utils.FileStreamProgramCache``: it stores the bytes as they
are and does no check on reading (its documentation leaves that to the caller),
and it does not say which file an entry is, which the warning must.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import struct
import tempfile
import warnings
from pathlib import Path

__all__ = [
    "KernelCache",
    "KernelCacheWarning",
    "UntrustedCacheError",
    "MAGIC",
    "TRAILER_BYTES",
    "cubin_problem",
    "frame",
    "trust_problem",
]

MAGIC = b"CGKCACHE"
TRAILER_BYTES = len(MAGIC) + 8 + 32
_EM_CUDA = 190
_ELF64_HEADER = 64
_SHT_NOBITS = 8


class KernelCacheWarning(RuntimeWarning):
    """The kernel cache could not be used as it is: a damaged entry (recompiled and
    replaced), or an unusable location (kernels then compile in memory only)."""


class UntrustedCacheError(PermissionError):
    """A folder of the kernel cache is owned by another user or writable by others:
    nothing in it is loaded and nothing is written there."""


_fstat = os.fstat  # the status of an opened entry (tests stand in another owner here)


def _current_uid() -> int | None:
    """The user the cache must belong to; None where there are no POSIX owners."""
    return os.getuid() if hasattr(os, "getuid") else None


def trust_problem(st, uid: int | None) -> str | None:
    """Why a file or folder with ``os.stat`` result ``st`` must not be trusted by
    user ``uid``, or None when it may be.

    Only ``st_uid`` and ``st_mode`` are read, so tests can pass a stand-in. It
    must be owned by ``uid`` and carry no group or other write bit (a
    group-writable entry is one that anyone in the group can replace with
    their own code). ``uid=None`` (no POSIX owners) trusts everything.
    """
    if uid is None:
        return None
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


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
    construction. Every method may raise ``OSError`` from the file system;
    :meth:`get` treats a missing or unreadable entry as a miss (the write that
    follows then says whether the location is usable) and raises only
    :class:`UntrustedCacheError`, for a folder that is not trusted.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.entries = self.root / "v1"
        self.uid = _current_uid()

    def _folders(self, path: Path) -> tuple[Path, Path, Path]:
        """The folders an entry's trust rests on: the root, ``v1`` and its own."""
        return (self.root, self.entries, path.parent)

    def check_folders(self, path: Path) -> None:
        """Raise :class:`UntrustedCacheError` when a folder of ``path`` (that exists)
        is owned by another user, is writable by others, or is not a folder."""
        for folder in self._folders(path):
            try:
                st = os.stat(folder)
            except (FileNotFoundError, NotADirectoryError):
                return  # not created yet (a miss; a write then says whether the place is usable)
            problem = trust_problem(st, self.uid)
            if problem is None and not stat.S_ISDIR(st.st_mode):
                problem = "is not a folder"
            if problem is not None:
                raise UntrustedCacheError(f"the kernel cache folder {folder} {problem}")

    def _read(self, path: Path) -> tuple[bytes, str | None]:
        """The bytes of ``path`` and why its owner or mode is not trusted (None: trusted).

        The check reads the opened file's own status (``fstat``), so the file
        that is checked is the file that is read; a symbolic link is refused.
        """
        # O_NONBLOCK: a FIFO planted as an entry must not block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = _fstat(fd)
            problem = trust_problem(st, self.uid)
            if problem is None and not stat.S_ISREG(st.st_mode):
                problem = "is not a regular file"
            return (b"", problem) if problem else (f.read(), None)

    def path_for(self, key: bytes) -> Path:
        """The entry file of ``key``."""
        digest = hashlib.sha256(key).hexdigest()
        return self.entries / digest[:2] / f"{digest[2:]}.cubin"

    def get(self, key: bytes) -> bytes | None:
        """The cubin stored under ``key``; None when there is none, it is damaged or
        not trusted (then a :class:`KernelCacheWarning` names the file, which is deleted).

        Raises :class:`UntrustedCacheError` when a folder of the cache is not
        trusted (:meth:`check_folders`).
        """
        path = self.path_for(key)
        self.check_folders(path)
        try:
            data, distrust = self._read(path)
        except OSError as exc:
            if getattr(os, "O_NOFOLLOW", 0) and exc.errno == errno.ELOOP:
                self.discard(key, "is a symbolic link")
            return None  # missing, or unreadable: the caller compiles and stores
        if distrust is not None:
            self.discard(key, distrust)
            return None
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
        read-only, full), :class:`UntrustedCacheError` when it is not trusted;
        no partial entry is left behind. The entry is written mode 0600.
        """
        path = self.path_for(key)
        self._make_folders(path)
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

    def _make_folders(self, path: Path) -> None:
        """Create the missing folders of ``path`` (the root's missing parents too),
        each mode 0700 (less what the umask takes), then check the cache's own."""
        missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        for folder in reversed(missing):
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                continue  # another process made it meanwhile; checked below like any folder
        self.check_folders(path)
