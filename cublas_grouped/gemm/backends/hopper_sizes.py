"""Device-resident group sizes for our Hopper kernel, made safe on the device
by its offsets kernel (``grouped_tile_offsets`` in
``kernels/grouped_gemm_sm90.cu``): what a ``gmm`` call with sizes on the GPU
guarantees when nothing is copied to the host.

The kernel path reads the sizes where they are, so no check can run on the
host without a synchronizing copy (what every cuBLAS path pays). Instead the
offsets kernel reads the caller's sizes (int32 or int64 in place; other
integer dtypes are cast to int64 first) and, before it computes the
schedule, makes them safe: negative sizes count as 0, and sizes are cut
where their running sum reaches M (the rows of ``a``), so no row at or past
M is ever read or written and no offset overflows, whatever the sizes hold.
Valid sizes (non-negative, summing to M) pass unchanged. What is not
checked: a sum short of M leaves the rows past it unwritten (a fresh output
holds whatever that memory held), and a sum past M or a negative size
raises nothing. Set ``CUBLAS_GROUPED_CHECK_DEVICE_SIZES=1`` to have AUTO
copy and check device sizes as the cuBLAS paths do (a ``ValueError`` for
each of those).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["SIZE_DTYPES", "READ_DTYPES", "CHECK_ENV", "checks_device_sizes"]

# The sizes' dtypes the offsets kernel reads in place (its two entry points).
SIZE_DTYPES = ("int32", "int64")
READ_DTYPES = frozenset(np.dtype(name) for name in SIZE_DTYPES)
# Opt-in: AUTO copies device sizes to the host and checks them (and runs
# cuBLAS on them, as before the kernel path took them).
CHECK_ENV = "CUBLAS_GROUPED_CHECK_DEVICE_SIZES"


def checks_device_sizes() -> bool:
    """Whether :data:`CHECK_ENV` asks AUTO to copy and check device sizes."""
    return os.environ.get(CHECK_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")
