"""Device arrays of A/B/C pointers, one entry per GEMM problem, for the batched
and grouped cuBLAS calls (which read their operands' addresses from the device).

Two ways to fill them: :func:`build_pointers` runs ``kernels/pointers.cu`` on
the device from the per-expert row counts (no count travels to the host; it
also writes the row offsets of a grouped-contiguous or chunk-aligned layout);
:func:`upload_pointers` computes them on the host when the problems are known
there already. Addresses, not array views, are passed around because slicing
device arrays costs host time on every call.
"""

from __future__ import annotations

import numpy as np

from ..runtime import device as _device
from ..runtime import nvrtc as _kernels
from .plan import GemmPlan, Operands, RowLayout

__all__ = [
    "build_pointers",
    "upload_pointers",
    "device_sizes",
    "pointer_kernel",
    "POINTER_THREADS",
    "DEFINES",
    "SIGNATURE",
]

# Threads of build_pointers' one block (a multiple of 32, at most 1024). The
# only copy: kernels/pointers.cu gets it as an NVRTC define.
POINTER_THREADS = 1024
#: NVRTC defines of kernels/pointers.cu.
DEFINES = {"POINTER_THREADS": POINTER_THREADS}
_kernel_for: dict[str, object] = {}  # arch -> the build_pointers Kernel (DEFINES never change)
# build_pointers' parameter widths (struct codes, runtime/launch.py): the sizes'
# address, five int32, then (address uint64, row and expert strides int64) for
# rows, weights and out, the scratch address, and the four output addresses.
SIGNATURE = "qiiiii" + "Qqq" * 3 + "Q" + "qqqq"


def pointer_kernel(arch: str):
    """The ``build_pointers`` kernel for ``arch`` (compiled once; DEFINES never change)."""
    kernel = _kernel_for.get(arch)
    if kernel is None:
        kernel = _kernel_for[arch] = _kernels.get_kernel("pointers", "build_pointers", arch, defines=DEFINES)
    return kernel


def device_sizes(plan: GemmPlan, res, sizes_dev=None):
    """int32 row counts on the device: ``sizes_dev`` (cast if needed), else
    ``plan.sizes`` uploaded on ``res``'s stream."""
    import cupy

    if sizes_dev is not None:
        return sizes_dev if sizes_dev.dtype == cupy.int32 else sizes_dev.astype(cupy.int32)
    return res.upload("sizes", plan.sizes.astype(np.int32))


def build_pointers(
    res,
    sizes_dev,
    ops: Operands,
    layout: RowLayout,
    *,
    arch: str | None = None,
    chunk_rows: int = 0,
    num_problems: int,
    num_fixed: int = 0,
    scratch_c: int = 0,
    row_offsets=None,
    pointer_arrays=None,
) -> tuple[int, int, int]:
    """Fill device arrays of A/B/C pointers, one entry per problem, with the
    ``build_pointers`` kernel on ``res``'s stream; returns the three arrays'
    device addresses (rows, weights, out).

    Parameters
    ----------
    res : the stream's resources (``runtime.device.resources``)
    sizes_dev : int32 device array [E], rows per expert
    ops : Operands
    layout : RowLayout
        Grouped-contiguous or chunk-aligned (padded capacity needs no pointers).
    arch : str, optional
        Architecture to compile for; default that of ``res``'s device.
    chunk_rows : int
        0: one problem per non-empty expert; C > 0: ceil(rows / C) problems
        per expert, each C rows.
    num_problems : int
        Problems the arrays must hold.
    num_fixed : int
        Entries from the last real problem up to ``num_fixed`` become idle
        GEMMs writing to ``scratch_c`` (the fixed-capacity step's fixed count).
    row_offsets : int32 device array [E + 1], optional
        Also written: the layout's first row of each expert, then the total.
    pointer_arrays : three uint64 device arrays, optional
        Written when given, else a reused per-stream buffer. The kernel never
        writes past the entries the arrays hold (given arrays: their length,
        which must be at least ``max(num_problems, num_fixed)`` or ``ValueError``
        is raised; the per-stream buffer: that maximum), whatever the device
        counts say.
    """
    if layout.stride:
        raise ValueError("the padded strided layout needs no pointer arrays")
    num_entries = max(num_problems, num_fixed)
    if pointer_arrays is None:
        capacity = num_entries
        base = res.buffer("pointers", 3 * 8 * max(capacity, 1)).data.ptr
        a_arr, b_arr, c_arr = base, base + 8 * capacity, base + 16 * capacity
    else:
        shape = getattr(pointer_arrays, "shape", None)
        if shape is not None and len(shape) == 2 and shape[0] == 3 and pointer_arrays.flags.c_contiguous:
            # One [3, n] array (the fixed-capacity step's): no per-row views to make.
            capacity = shape[1]
            base = pointer_arrays.data.ptr
            a_arr, b_arr, c_arr = base, base + 8 * capacity, base + 16 * capacity
        else:
            capacity = min(int(p.size) for p in pointer_arrays)
            a_arr, b_arr, c_arr = (int(p.data.ptr) for p in pointer_arrays)
        if capacity < num_entries:
            raise ValueError(f"pointer arrays hold {capacity} entries but {num_entries} problems need them")
    if arch is None:
        # The device of this call's stream, not whichever device was used first.
        arch = _kernels.arch_for(_device.device_info(res.device_id).sm)
    kernel = _kernel_for.get(arch) or pointer_kernel(arch)
    args = (
        sizes_dev.data.ptr,
        len(sizes_dev),
        layout.align,
        int(chunk_rows),
        int(num_fixed),
        capacity,
        ops.a,
        ops.a_row_bytes,
        ops.a_expert_bytes,
        ops.b,
        ops.b_row_bytes,
        ops.b_expert_bytes,
        ops.c,
        ops.c_row_bytes,
        ops.c_expert_bytes,
        int(scratch_c),
        a_arr,
        b_arr,
        c_arr,
        row_offsets.data.ptr if row_offsets is not None else 0,
    )
    _kernels.launch_signed(res.launch_stream, kernel, 1, POINTER_THREADS, SIGNATURE, args)
    return a_arr, b_arr, c_arr


def upload_pointers(res, name: str, ops: Operands, rows: np.ndarray, experts: np.ndarray):
    """Device pointer arrays (rows, weights, out) for problems at ``rows`` of
    ``experts``, computed on the host and uploaded in one asynchronous copy into
    ``res``'s buffer ``name``; returns the three arrays' device addresses."""
    table = np.array(ops.at(rows, experts), dtype=np.uint64)  # [3, problems]
    base = res.upload(name, table).data.ptr
    return base, base + 8 * len(rows), base + 16 * len(rows)
