"""A GPU-less stand-in for the host side of eager calls, and a counter of the calls they make.

Everything that would reach the GPU is replaced for the duration of
:func:`stub_gpu` (CuPy's allocator hands out made-up addresses, the cuBLAS entry
points and the driver launch record their arguments and succeed, the copies
and events do nothing), so the library's own host code runs unchanged on a CPU
machine. :func:`count_calls` then counts the Python and C function calls one
eager call makes, leaving out the stand-ins' own: the number the host cost of a
slow CPU follows (about 1 us per Python call on the GPU machine's host).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from types import SimpleNamespace

import numpy as np

H100 = dict(sm=(9, 0), cublas_version=130100, name="NVIDIA H100 80GB HBM3", multiprocessors=132)
STREAM = 0x5000  # the made-up handle of CuPy's current stream
HERE = __file__


class _Context:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class _Pinned(bytearray):
    @property
    def ptr(self):
        return 0x6F0000000000  # never read: the copies are stand-ins too


class TensorMapStandIn:
    """What ``tma.tiled_map`` would describe to TMA: (address, shape, box,
    dtype, L2 promotion)."""

    def __init__(self, ptr, shape, box, dtype, promotion=0):
        self.fields = (int(ptr), tuple(shape), tuple(box), np.dtype(dtype).name, int(promotion))

    def __eq__(self, other):
        return isinstance(other, TensorMapStandIn) and other.fields == self.fields

    __hash__ = None


class HolderStandIn:
    """cuda.core's argument block for a prepared launch: 8 bytes per argument
    (a tensor map's 8 hold 0; the maps are kept in ``args``), ``ptr`` the
    address of the pointer array, as ``runtime.launch.FixedLaunch`` reads it."""

    def __init__(self, args):
        self.args = args
        self.values = (ctypes.c_int64 * max(len(args), 1))(
            *[0 if isinstance(x, TensorMapStandIn) else int(x) for x in args]
        )
        base = ctypes.addressof(self.values)
        self.pointers = (ctypes.c_void_p * max(len(args), 1))(*[base + 8 * i for i in range(len(args))])
        self.ptr = ctypes.addressof(self.pointers)
        _holders[self.ptr] = self


_holders: dict = {}  # the pointer-array address of each HolderStandIn -> it


def _argument_values(L, params) -> tuple:
    """The values a launch passed: from the packer of ``runtime.launch`` whose
    pointer array ``params`` is (launch_signed, launch_scalars), or from the
    stand-in argument block at that address (a FixedLaunch; tensor maps as
    their TensorMapStandIn fields)."""
    if isinstance(params, ctypes.c_void_p):
        holder = _holders[params.value]
        return tuple(
            x.fields if isinstance(x, TensorMapStandIn) else int(v)
            for x, v in zip(holder.args, holder.values)
        )
    for packers in (getattr(L._local, "signed", {}), getattr(L._local, "packers", {})):
        for packer in packers.values():
            if packer.pointers is params:
                return packer.fmt.unpack_from(packer.buffer)
    raise AssertionError("a launch with arguments from no known packer")


def _no_opt_in(kernel, device_id, nbytes=0):
    pass  # the shared-memory opt-in: a driver attribute, nothing on the host


class Recorder:
    """What the stand-ins saw: cuBLAS calls (name, args), kernel launches, copies, memsets."""

    def __init__(self):
        self.cublas: list[tuple] = []
        self.launches: list[tuple] = []
        self.copies: list[tuple] = []
        self.memsets: list[tuple] = []
        # Every driver launch: (kernel handle, grid and block, shared memory,
        # stream, the argument values it passed: see _argument_values).
        self.decoded: list[tuple] = []
        # Indices into launches/decoded of the programmatic dependent launches
        # (cuLaunchKernelEx with the serialization attribute).
        self.overlapped: list[int] = []
        self.host_values = lambda arr: np.zeros(arr.shape, arr.dtype)
        # Streams the host waited for (a StreamResources' cupy_stream.synchronize()).
        self.syncs: list[int] = []

    def clear(self):
        for name in ("cublas", "launches", "copies", "memsets", "decoded", "overlapped", "syncs"):
            getattr(self, name).clear()


@contextlib.contextmanager
def stub_gpu(monkeypatch, info=None):
    """Replace the GPU side for the library's host code; yields a :class:`Recorder`."""
    import cupy

    from cublas_grouped.gemm import call_cache
    from cublas_grouped.runtime import cublas as C
    from cublas_grouped.runtime import device as D
    from cublas_grouped.runtime import launch as L

    rec = Recorder()
    base = [0x7F0000000000]

    def alloc(size):
        mem = cupy.cuda.UnownedMemory(base[0], max(size, 1), None, 0)
        base[0] += -(-max(size, 1) // 512) * 512
        return cupy.cuda.MemoryPointer(mem, 0)

    info = D.DeviceInfo(**(info or H100))
    monkeypatch.setattr(D, "_query_device", lambda device_id: info)
    monkeypatch.setattr(D, "current_device", lambda: 0)
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda device_id=-1: SimpleNamespace(ptr=STREAM))
    monkeypatch.setattr(cupy.cuda, "Device", _Context)
    monkeypatch.setattr(cupy.cuda, "Event", _Event)
    monkeypatch.setattr(cupy.cuda, "alloc_pinned_memory", _Pinned)
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 0)
    monkeypatch.setattr(cupy.cuda.runtime, "memcpyAsync", lambda *a: rec.copies.append(a))
    monkeypatch.setattr(cupy.cuda.runtime, "memsetAsync", lambda *a: rec.memsets.append(a))
    # cupy.zeros memsets through cupy's own stream state, which no stand-in
    # reaches: allocated as empty here (the host code reads no device values).
    monkeypatch.setattr(cupy, "zeros", lambda shape, dtype=float, order="C": cupy.empty(shape, dtype, order))
    monkeypatch.setattr(cupy.cuda.runtime, "streamIsCapturing", lambda stream: 0)  # no graph is captured

    def fake_function(name):
        def call(*args):
            rec.cublas.append((name, args))
            return 0

        return call

    functions = {name: fake_function(name) for name in C.PROTOTYPES}
    monkeypatch.setattr(C, "_lib", object())
    monkeypatch.setattr(C, "_functions", functions)
    monkeypatch.setattr(C, "_missing", frozenset())
    monkeypatch.setattr(C, "version", lambda: info.cublas_version)
    monkeypatch.setattr(D, "_bound", {})

    def launch(handle, *args):
        rec.launches.append(args)
        rec.decoded.append((handle, args[:6], args[6], args[7], _argument_values(L, args[8])))
        return 0

    def launch_ex(config, handle, params, extra):
        # cuLaunchKernelEx: recorded as the cuLaunchKernel call it stands for.
        c = config._obj
        attrs = [c.attrs[i] for i in range(c.num_attrs)]
        assert [(a.id, a.value[0]) for a in attrs] == [(6, 1)], "only the programmatic attribute is used"
        rec.overlapped.append(len(rec.launches))
        return launch(handle, *c.grid, *c.block, c.shared_bytes, c.stream or 0, params, extra)

    monkeypatch.setattr(L, "_driver", SimpleNamespace(cuLaunchKernel=launch, cuLaunchKernelEx=launch_ex))
    # Kernels: compiled nowhere, launched through the stand-in driver above.
    from cublas_grouped.gemm import pointers as P
    from cublas_grouped.moe import kernels as K
    from cublas_grouped.runtime import nvrtc as N

    handles = {}

    class Kernel:
        def __init__(self, handle):
            self.handle = handle

    def get_kernel(name, kernel, arch, *, defines=None):
        return handles.setdefault((name, kernel, arch), Kernel(0x1000 + len(handles)))

    monkeypatch.setattr(N, "get_kernel", get_kernel)
    monkeypatch.setattr(K, "_found", {})
    monkeypatch.setattr(P, "_kernel_for", {})
    monkeypatch.setattr(L, "_handles", {})
    # The Hopper kernel's host side (SM 9.0 paths): the SM count, the shared
    # memory opt-in and the TMA descriptors are asked of no driver; a launch
    # through cuda.core (tensor-map arguments) is recorded like the others.
    from cublas_grouped.gemm.backends import hopper as H

    monkeypatch.setattr(H, "_sm_counts", {0: info.multiprocessors})
    monkeypatch.setattr(H, "_shared_set", set())
    monkeypatch.setattr(H, "_allow_shared_memory", _no_opt_in)
    from cublas_grouped.gemm.backends import tma

    monkeypatch.setattr(tma, "tiled_map", TensorMapStandIn)
    monkeypatch.setattr(tma, "_maps", type(tma._maps)())
    monkeypatch.setattr(H, "_scan_kernels", {})
    monkeypatch.setattr(H, "_local", threading.local())
    from cublas_grouped.gemm.backends import hopper_fp8 as H8

    monkeypatch.setattr(H8, "_local", threading.local())
    monkeypatch.setattr(L, "param_holder", HolderStandIn)
    import cuda.core

    def core_launch(stream, config, kernel, *args):
        rec.launches.append(("core", config.grid, config.block, config.shmem_size, kernel.handle, args))

    monkeypatch.setattr(cuda.core, "launch", core_launch)
    monkeypatch.setattr(cuda.core, "LaunchConfig", SimpleNamespace)
    monkeypatch.setattr(cuda.core, "Stream", SimpleNamespace(from_handle=lambda handle: handle))
    # Device-to-host copies answer with rec.host_values(array) (default: zeros).
    monkeypatch.setattr(cupy, "asnumpy", lambda arr, stream=None, **kw: rec.host_values(arr))

    def make_resources(device_id, stream):
        res = D.StreamResources(device_id, stream, 0x51)
        # A context manager (made current by the library) whose waits are recorded.
        res.cupy_stream = _Context()
        res.cupy_stream.synchronize = lambda: rec.syncs.append(stream)
        res.cupy_stream.ptr = stream  # what a CuPy stream's handle reads as
        res.launch_stream = stream
        return res

    class Streams(dict):
        # Every thread's (device, stream) resources, made on first sight.
        def get(self, key, default=None):
            if key not in self:
                self[key] = make_resources(*key)
            return self[key]

    class Local(threading.local):
        def __init__(self):
            self.streams = Streams()

    old_local = D._local
    D._local = Local()

    old_allocator = cupy.cuda.get_allocator()
    cupy.cuda.set_allocator(alloc)
    call_cache.clear()
    try:
        yield rec
    finally:
        _holders.clear()
        call_cache.clear()
        cupy.cuda.set_allocator(old_allocator)
        D._local = old_local


def fake_array(shape, dtype="bfloat16", *, ptr=None, strides=None, device=0):
    """A real ``cupy.ndarray`` over made-up device memory (never read)."""
    import cupy

    dtype = np.dtype(dtype)
    nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
    address = ptr if ptr is not None else 0x7E0000000000 + 4096 * (fake_array.counter % 4096)
    fake_array.counter += 1
    mem = cupy.cuda.UnownedMemory(address, nbytes * 4, None, device)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0), strides=strides)


fake_array.counter = 0


def count_calls(fn, repeat: int = 1) -> int:
    """Python and C function calls ``fn()`` makes, per call (the stand-ins' own left out).

    Under mutation testing (mutmut sets ``MUTANT_UNDER_TEST``, also while it
    collects which tests call what) every mutated function runs through a
    trampoline that adds calls, so a budget cannot hold: the caller's test is
    skipped there. Budgets guard host cost, not behaviour.
    """
    import os

    import pytest

    if "MUTANT_UNDER_TEST" in os.environ:  # set (even to "") for every run mutmut makes
        pytest.skip("call budgets do not hold under mutmut's trampolines")
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        # "call": frame is the callee's; "c_call": the caller's. Either way a
        # frame of this file is a stand-in's.
        if event in ("call", "c_call") and frame.f_code.co_filename != HERE:
            count += 1

    sys.setprofile(profile)
    try:
        for _ in range(repeat):
            fn()
    finally:
        sys.setprofile(None)
    return count // repeat
