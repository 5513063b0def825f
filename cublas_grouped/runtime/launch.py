"""Kernel launches with little host work: ``cuLaunchKernel`` through ctypes.

A launch through ``cuda.core.launch`` costs about 11 us of host time (measured
on the GPU machine's host, 2026-11-26, ``tools/host_probe.py``); calling the
driver's ``cuLaunchKernel`` directly with the arguments packed into a reused
buffer costs about 5 us. An eager MoE layer launches about ten kernels, so this
is worth having.

How: every kernel parameter of ours is a scalar (an integer, a pointer or a
float) passed as a NumPy scalar whose width is the parameter's. The values are
packed with one ``struct.pack_into`` into a buffer owned by (thread, kernel
signature), and ``kernelParams`` points at each value in it; the driver copies
the values during the call, so reusing the buffer for the next launch is safe.
Launches with any other argument (a tensor map, say) go through
``cuda.core``. The kernel runs in the driver's current context, as with
``cuda.core``: the callers make it the device's primary context.

Programmatic dependent launch (SM 9.0+; :meth:`FixedLaunch.launch_overlapped`):
``cuLaunchKernelEx`` with the attribute
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` lets the driver
start the kernel's blocks before the previous kernel in the stream has
finished, once every block of that kernel has run ``griddepcontrol.
launch_dependents`` (``allow_next_grid`` in kernels/common.cuh) or exited.
Such a kernel must run ``griddepcontrol.wait`` (``wait_for_previous_grid``)
before it touches memory an earlier kernel writes or reads: the wait returns
once the previous kernel has completed and its writes are visible. A CUDA
graph captured from such launches keeps the overlap (a programmatic edge).
"""

from __future__ import annotations

import ctypes
import struct
import threading

import numpy as np

__all__ = [
    "launch_scalars",
    "launch_signed",
    "LaunchError",
    "driver",
    "param_holder",
    "FixedLaunch",
    "prepared_per_thread",
]


class LaunchError(RuntimeError):
    """``cuLaunchKernel`` returned an error; the message names the kernel and the CUresult."""


_driver = None
_driver_lock = threading.Lock()


def driver():
    """The CUDA driver library (``libcuda``), loaded once."""
    global _driver
    if _driver is None:
        with _driver_lock:
            if _driver is None:
                lib = ctypes.CDLL("libcuda.so.1")
                lib.cuLaunchKernel.restype = ctypes.c_int
                lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
                lib.cuGetErrorName.restype = ctypes.c_int
                lib.cuLaunchKernelEx.restype = ctypes.c_int
                lib.cuLaunchKernelEx.argtypes = [ctypes.c_void_p] * 4
                _driver = lib
    return _driver


def _error_name(status: int) -> str:
    name = ctypes.c_char_p()
    if driver().cuGetErrorName(status, ctypes.byref(name)) == 0 and name.value:
        return name.value.decode()
    return f"CUresult {status}"


# NumPy scalar type -> struct code of the same width (native byte order).
_CODES = {
    np.int32: "i",
    np.uint32: "I",
    np.int64: "q",
    np.uint64: "Q",
    np.float32: "f",
    np.float64: "d",
}
_CODES[np.intp] = "q" if np.dtype(np.intp).itemsize == 8 else "i"


class _Packer:
    """A reusable argument buffer for one argument signature, and its pointer array."""

    __slots__ = ("fmt", "buffer", "pointers")

    def __init__(self, codes: tuple[str, ...]):
        # Each value at an offset aligned to its size, as the kernel's ABI would place it.
        fmt, offsets, size = "=", [], 0
        for code in codes:
            width = struct.calcsize("=" + code)
            pad = -size % width
            fmt += "x" * pad + code
            offsets.append(size + pad)
            size += pad + width
        self.fmt = struct.Struct(fmt)
        self.buffer = ctypes.create_string_buffer(max(size, 8))
        base = ctypes.addressof(self.buffer)
        self.pointers = (ctypes.c_void_p * max(len(codes), 1))(*[base + o for o in offsets])


_local = threading.local()
# cuda.core Kernel -> its raw CUkernel handle (the kernels live as long as the process's cache).
_handles: dict = {}


def _packer_for(types: tuple) -> _Packer | None:
    packers = getattr(_local, "packers", None)
    if packers is None:
        packers = _local.packers = {}
    packer = packers.get(types)
    if packer is None:
        try:
            codes = tuple(_CODES[t] for t in types)
        except KeyError:
            return None
        packer = packers[types] = _Packer(codes)
    return packer


def launch_scalars(stream: int, kernel, grid, block, args, shmem: int = 0) -> bool:
    """Launch ``kernel`` (a ``cuda.core`` Kernel) on the raw stream handle ``stream``
    when every argument is a NumPy scalar of a known width; returns False, having
    done nothing, when one is not (the caller then launches another way).

    ``grid`` and ``block`` are ints or tuples of up to three ints.

    Raises
    ------
    LaunchError
        If the driver refuses the launch.
    """
    packer = _packer_for(tuple(map(type, args)))
    if packer is None:
        return False
    gx, gy, gz = (grid, 1, 1) if isinstance(grid, int) else (tuple(grid) + (1, 1))[:3]
    bx, by, bz = (block, 1, 1) if isinstance(block, int) else (tuple(block) + (1, 1))[:3]
    handle = _handles.get(kernel)
    if handle is None:
        handle = _handles[kernel] = int(kernel.handle)
    packer.fmt.pack_into(packer.buffer, 0, *args)
    status = driver().cuLaunchKernel(handle, gx, gy, gz, bx, by, bz, shmem, stream, packer.pointers, None)
    if status != 0:
        raise LaunchError(
            f"cuLaunchKernel failed for a kernel with {len(args)} arguments, grid {grid}, block {block}, "
            f"{shmem} bytes of shared memory: {_error_name(status)}"
        )
    return True


def launch_signed(stream: int, kernel, grid: int, block: int, signature: str, args, shmem: int = 0) -> None:
    """:func:`launch_scalars` for hot paths: ``signature`` holds the struct code
    of each parameter (``"q"`` int64 or pointer, ``"i"`` int32, ``"Q"``, ``"I"``,
    ``"f"``, ``"d"``; a constant of the caller), so ``args`` may be plain Python
    ints and floats and nothing is inspected per argument. One-dimensional
    ``grid`` and ``block`` only.

    Raises
    ------
    LaunchError
        If the driver refuses the launch.
    """
    packers = getattr(_local, "signed", None)
    if packers is None:
        packers = _local.signed = {}
    packer = packers.get(signature)
    if packer is None:
        packer = packers[signature] = _Packer(tuple(signature))
    handle = _handles.get(kernel)
    if handle is None:
        handle = _handles[kernel] = int(kernel.handle)
    packer.fmt.pack_into(packer.buffer, 0, *args)
    lib = _driver if _driver is not None else driver()  # loaded: no call to ask for it
    status = lib.cuLaunchKernel(handle, grid, 1, 1, block, 1, 1, shmem, stream, packer.pointers, None)
    if status != 0:
        raise LaunchError(
            f"cuLaunchKernel failed for a kernel with {len(args)} arguments, grid {grid}, block {block}, "
            f"{shmem} bytes of shared memory: {_error_name(status)}"
        )


def prepared_per_thread(local, key, build, limit: int):
    """What ``build()`` returns (a prepared launch), kept under ``key`` in this
    thread's ``prepared`` dict on ``local`` (a ``threading.local``): a
    prepared launch's slots are written before each call, so threads never
    share one. At most ``limit`` entries, then the dict starts over."""
    prepared = local.__dict__.setdefault("prepared", {})
    found = prepared.get(key)
    if found is None:
        if len(prepared) >= limit:
            prepared.clear()
        found = prepared[key] = build()
    return found


def param_holder(args):
    """cuda.core's kernel-argument block for ``args`` (NumPy scalars, tensor
    maps...): the array of pointers ``cuLaunchKernel`` takes is at its ``ptr``,
    and it keeps every value (and the objects they came from) alive.
    The one place that names cuda.core's (private) argument packer: cuda.core's
    own launch packs its arguments with it, so a block built here holds the
    bytes that launch would pass."""
    from cuda.core._kernel_arg_handler import ParamHolder

    return ParamHolder(args)


# cuda.h's CUlaunchAttribute (an id, padding to 8 bytes, a 64-byte value
# union) and CUlaunchConfig, for cuLaunchKernelEx.
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_bytes", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


def _overlapped_config(grid: int, block: int, shmem: int) -> _LaunchConfig:
    """A 1-D launch's CUlaunchConfig with the programmatic-serialization
    attribute on (the stream is set per launch)."""
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1  # programmaticStreamSerializationAllowed
    config = _LaunchConfig(grid=(grid, 1, 1), block=(block, 1, 1), shared_bytes=shmem, num_attrs=1)
    config.attrs = ctypes.pointer(attr)  # ctypes keeps attr alive with the config (its _objects)
    return config


class FixedLaunch:
    """A kernel launch whose arguments are packed once (tensor maps included)
    and replayed by one ``cuLaunchKernel`` call: for hot paths whose launches
    repeat with the same arguments (a cached layer's or call's GEMMs).

    ``args`` as for ``cuda.core.launch`` (typed: NumPy scalars, tensor maps);
    ``slots``: indices of 64-bit arguments (pointers) that change from call
    to call: :meth:`__call__` writes their values into the block before the
    launch (the driver copies the block during the call, so the next write
    cannot reach a queued launch). Not thread-safe: keep one per thread.
    """

    __slots__ = ("handle", "grid", "block", "shmem", "params", "holder", "slots", "label", "_config")

    def __init__(
        self, kernel, grid: int, block: int, args, *, shmem: int = 0, slots=(), label: str = "a kernel"
    ):
        self.handle = int(kernel.handle)
        self.grid, self.block, self.shmem = int(grid), int(block), int(shmem)
        self.holder = param_holder(tuple(args))
        self.params = ctypes.c_void_p(self.holder.ptr)
        pointers = (ctypes.c_void_p * max(len(args), 1)).from_address(self.holder.ptr)
        self.slots = tuple(ctypes.c_int64.from_address(pointers[i]) for i in slots)
        self.label = label
        self._config = None  # launch_overlapped's (config, reference), made at its first call

    def __call__(self, stream: int, *values) -> None:
        """Launch on the raw stream handle ``stream``, with ``values`` in the slots (in order).

        Raises
        ------
        LaunchError
            If the driver refuses the launch.
        """
        if values:
            for slot, value in zip(self.slots, values):
                slot.value = value
        lib = _driver if _driver is not None else driver()
        status = lib.cuLaunchKernel(
            self.handle, self.grid, 1, 1, self.block, 1, 1, self.shmem, stream, self.params, None
        )
        if status != 0:
            raise self._error("cuLaunchKernel", status)

    def launch_overlapped(self, stream: int, *values) -> None:
        """As a call, but as a programmatic dependent launch (the module
        docstring): the kernel may start while the previous kernel in the
        stream still runs. Only for kernels that run ``griddepcontrol.wait``
        before touching memory an earlier kernel uses; SM 9.0 and later.

        Raises
        ------
        LaunchError
            If the driver refuses the launch.
        """
        # The slots are written inline, as in __call__: a shared method would add
        # a Python call to every launch of the hot paths (their call budgets).
        if values:
            for slot, value in zip(self.slots, values):
                slot.value = value
        config = self._config
        if config is None:  # (the config, a reference to it): made once, at the first launch
            made = _overlapped_config(self.grid, self.block, self.shmem)
            config = self._config = (made, ctypes.byref(made))
        config[0].stream = stream
        lib = _driver if _driver is not None else driver()
        status = lib.cuLaunchKernelEx(config[1], self.handle, self.params, None)
        if status != 0:
            raise self._error("cuLaunchKernelEx (programmatic dependent launch)", status)

    def _error(self, call: str, status: int) -> LaunchError:
        """The error of a refused launch: the driver call, the kernel, its shape, the CUresult."""
        return LaunchError(
            f"{call} failed for {self.label}, grid {self.grid}, block {self.block}, "
            f"{self.shmem} bytes of shared memory: {_error_name(status)}"
        )
