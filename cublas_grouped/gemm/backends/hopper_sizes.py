"""Device-resident group sizes for our Hopper kernel, made safe on the device
(``kernels/group_sizes.cu``): what a ``gmm`` call with sizes on the GPU
guarantees when nothing is copied to the host.

The kernel path reads the sizes where they are, so no check can run on the
host without a synchronizing copy (what every cuBLAS path pays). Instead one
tiny kernel turns the caller's sizes (int32 or int64) into the int32 sizes the
schedule reads: negative sizes count as 0, and sizes are cut where their
running sum reaches M (the rows of ``a``), so no row at or past M is ever read
or written and no offset overflows, whatever the sizes hold. Valid sizes
(non-negative, summing to M) pass unchanged. What is not checked: a sum short
of M leaves the rows past it unwritten (a fresh output holds whatever that
memory held), and a sum past M or a negative size raises nothing. Set
``CUBLAS_GROUPED_CHECK_DEVICE_SIZES=1`` to have AUTO copy and check device
sizes as the cuBLAS paths do (a ``ValueError`` for each of those).
"""

from __future__ import annotations

import os

import numpy as np

from ...runtime import nvrtc as _kernels

__all__ = [
    "SOURCE",
    "SIZES_THREADS",
    "DEFINES",
    "SIZE_DTYPES",
    "STREAM_SIZE_GROUPS",
    "CHECK_ENV",
    "checks_device_sizes",
    "READ_DTYPES",
    "clamp_kernel",
    "sizes_buffer",
    "clamped_sizes",
]

SOURCE = "group_sizes"
SIZES_THREADS = 256  # the kernel's one block (E of 128 or 256 groups: one or two tiles of the scan)
DEFINES = {"SIZES_THREADS": SIZES_THREADS}
# The sizes' dtypes the kernel reads directly; others are cast to int64 first.
SIZE_DTYPES = {"int32": "i32", "int64": "i64"}
# Groups the stream's buffer holds from its first use, so that a graph
# captured on the stream keeps its address up to this many groups.
STREAM_SIZE_GROUPS = 1024
# Opt-in: AUTO copies device sizes to the host and checks them (and runs
# cuBLAS on them, as before the kernel path took them).
CHECK_ENV = "CUBLAS_GROUPED_CHECK_DEVICE_SIZES"


def checks_device_sizes() -> bool:
    """Whether :data:`CHECK_ENV` asks AUTO to copy and check device sizes."""
    return os.environ.get(CHECK_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


_found: dict = {}  # (dtype, arch) -> kernel
_SUFFIX = {np.dtype(name): suffix for name, suffix in SIZE_DTYPES.items()}  # by dtype: no name property read
READ_DTYPES = frozenset(_SUFFIX)  # the dtypes the clamp reads (others are cast to int64 first)


def clamp_kernel(dtype, arch: str):
    """The clamp kernel reading sizes of ``dtype`` (int32 or int64), compiled for ``arch`` (found once)."""
    kernel = _found.get((dtype, arch))
    if kernel is None:
        name = f"clamp_group_sizes_{_SUFFIX[np.dtype(dtype)]}"
        kernel = _found[(dtype, arch)] = _kernels.get_kernel(SOURCE, name, arch, defines=DEFINES)
    return kernel


def sizes_buffer(res, num_groups: int) -> int:
    """The device address of the stream's int32 buffer the clamp writes (its
    address stays put up to :data:`STREAM_SIZE_GROUPS` groups)."""
    buf = res.buffers.get("sm90-sizes")
    if buf is None or buf.nbytes < 4 * num_groups:
        buf = res.buffer("sm90-sizes", 4 * max(num_groups, STREAM_SIZE_GROUPS))
    return buf.data.ptr


def clamped_sizes(res, sizes, num_groups: int, total_rows: int, arch: str) -> int:
    """Queue the clamp of ``sizes`` (an integer CuPy array [E] on the device)
    on ``res``'s stream; returns the device address of the int32 [E] result
    (:func:`sizes_buffer`, valid until the next call on this stream). See the
    module notes for what it guarantees."""
    if sizes.dtype not in _SUFFIX:
        sizes = sizes.astype(np.int64)  # int8/16, unsigned: a cast kernel first
    out = sizes_buffer(res, num_groups)
    args = (sizes.data.ptr, num_groups, total_rows, out)
    _kernels.launch_signed(res.stream, clamp_kernel(sizes.dtype, arch), 1, SIZES_THREADS, "qiiq", args)
    return out
