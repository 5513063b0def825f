"""Layer 3b: what the device can do, and the per-device state we own.

- :class:`DeviceInfo`: SM version, name, multiprocessor count and the cuBLAS
  version; built from the real device, or by hand in tests to fake one.
- :func:`resources`: one cuBLAS handle per (device, thread), and per stream
  the cuBLAS workspace and reusable scratch buffers. Buffers are keyed by
  stream because work queued on one stream may still be reading a buffer when
  the next call, on another stream, would overwrite it.
- :func:`resolve_stream`: ``None``, CuPy streams, ``cuda.core`` streams,
  ``__cuda_stream__`` objects and raw integer handles, all to one handle.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass, field
from functools import cache

from . import cublas as _cublas

__all__ = [
    "DeviceInfo",
    "device_info",
    "current_device",
    "resolve_stream",
    "resources",
    "stream_resources",
    "known_resources",
    "StreamResources",
]


@dataclass(frozen=True)
class DeviceInfo:
    """Capabilities that decide which code paths can run.

    Build one by hand (``DeviceInfo(sm=(8, 0), cublas_version=120400)``) to
    ask the planner what it would do on another GPU.
    """

    sm: tuple[int, int]
    cublas_version: int
    name: str = "unknown"
    multiprocessors: int = 0
    device_id: int = 0

    @property
    def sm_version(self) -> int:
        """Compute capability as one number: (9, 0) -> 90."""
        return self.sm[0] * 10 + self.sm[1]

    def supports_grouped_gemm(self) -> bool:
        """cublasGemmGroupedBatchedEx exists from cuBLAS 12.5 on."""
        return self.cublas_version >= _cublas.GROUPED_GEMM_MIN_VERSION

    def supports_bfloat16(self) -> bool:
        """bfloat16 tensor-core GEMMs need SM 8.0 (Ampere) or newer."""
        return self.sm >= (8, 0)


def current_device() -> int:
    """Ordinal of CuPy's current device."""
    from .deps import cupy_on_gpu  # without a GPU: an error that says why

    cupy = cupy_on_gpu()
    return cupy.cuda.runtime.getDevice()


def device_info(device_id: int | None = None) -> DeviceInfo:
    """Capabilities of device ``device_id`` (``None``: CuPy's current device).

    Cached per ordinal, never under ``None``: in a process that uses several
    GPUs, ``None`` means whichever device is current at this call.
    """
    return _query_device(current_device() if device_id is None else int(device_id))


@cache
def _query_device(device_id: int) -> DeviceInfo:
    from .deps import cupy_on_gpu  # without a GPU: an error that says why

    cupy = cupy_on_gpu()

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    if isinstance(name, bytes):
        name = name.decode()
    return DeviceInfo(
        sm=(int(props["major"]), int(props["minor"])),
        cublas_version=_cublas.version(),
        name=name,
        multiprocessors=int(props["multiProcessorCount"]),
        device_id=device_id,
    )


def resolve_stream(stream, device_id: int | None = None) -> int:
    """The raw ``cudaStream_t`` behind ``stream`` (0 is the legacy default stream).

    Accepts ``None`` (CuPy's current stream of ``device_id``, default the
    current device: CuPy keeps one current stream per device), a CuPy stream,
    a ``cuda.core`` stream or anything with ``__cuda_stream__``, or an integer
    handle.
    """
    if stream is None:
        import cupy

        current = cupy.cuda.get_current_stream(-1 if device_id is None else device_id)
        return int(current.ptr)
    if isinstance(stream, bool):
        raise TypeError("stream must be None, a stream object or an integer handle; got bool")
    if isinstance(stream, int):
        if stream < 0:
            raise ValueError(f"stream handle must be non-negative; got {stream}")
        return stream
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        value = protocol() if callable(protocol) else protocol
        return int(value[1])
    ptr = getattr(stream, "ptr", None)  # older CuPy streams
    if isinstance(ptr, int):
        return ptr
    handle = getattr(stream, "handle", None)
    if handle is not None:
        return int(handle)
    raise TypeError(
        "stream must be None, a CuPy or cuda.core stream, an object with "
        f"__cuda_stream__, or an integer handle; got {type(stream).__name__}"
    )


def finish_setup_work() -> None:
    """Wait for the device work a constructor queued on the current stream
    (buffers zeroed, counters set), unless that stream is capturing a graph.

    Why: the object's calls may run on any stream, and one made with
    ``non_blocking=True`` does not wait for the legacy default stream, where
    construction usually runs: its first step could read a counter before
    its zeros landed. Objects are built once, so the wait costs little.
    """
    import cupy

    stream = cupy.cuda.get_current_stream()
    if cupy.cuda.runtime.streamIsCapturing(stream.ptr) == 0:
        stream.synchronize()


def stream_resources(device_id: int, stream) -> StreamResources:
    """:func:`resources` for a call on ``device_id`` with the caller's ``stream``
    (``None``: that device's current stream, whichever device is current)."""
    return resources(device_id, resolve_stream(stream, device_id))


class _StreamProtocol:
    """Presents a raw stream handle through ``__cuda_stream__`` (for CuPy)."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


@dataclass
class StreamResources:
    """Workspace and scratch buffers owned by one (device, thread, stream)."""

    device_id: int
    stream: int
    handle: int
    workspace: object = None
    buffers: dict = field(default_factory=dict)
    launch_stream: object = None  # cuda.core Stream for kernel launches
    cupy_stream: object = None
    staging: list = field(default_factory=list)
    next_staging: int = 0

    def buffer(self, name: str, nbytes: int):
        """A device buffer of at least ``nbytes`` (uint8), grown only when too small.

        Reused across calls on this stream; stream order makes the reuse safe.
        """
        import cupy

        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            # Grow geometrically so slowly rising sizes do not reallocate every call.
            size = max(nbytes, 2 * (buf.nbytes if buf is not None else 0), 256)
            # The old buffer goes first (stream order keeps queued work safe: CuPy's
            # pool hands its memory out again only behind that work), and where the
            # doubled size does not fit, the exact size is tried.
            self.buffers.pop(name, None)
            buf = None
            with cupy.cuda.Device(self.device_id):
                try:
                    buf = cupy.empty(size, dtype=cupy.uint8)
                except MemoryError:
                    if size <= max(nbytes, 256):
                        raise
                    buf = cupy.empty(max(nbytes, 256), dtype=cupy.uint8)
            self.buffers[name] = buf
        return buf

    def upload(self, name: str, host) -> object:
        """Copy a small NumPy array to a reusable device buffer, asynchronously;
        returns the device copy (a CuPy view of buffer ``name``).

        The data goes through a ring of pinned host buffers, each guarded by an
        event, so the host waits only if it gets ``STAGING_SLOTS`` uploads ahead
        of the GPU (a plain pageable copy would wait for the stream every time).
        """
        import numpy as np

        host = np.ascontiguousarray(host)
        self.upload_address(name, host.reshape(-1))
        return self.buffers[name][: host.nbytes].view(host.dtype)

    def upload_address(self, name: str, host) -> int:
        """:meth:`upload` of a 1-D C-contiguous NumPy array, returning the device
        address of the copy (no CuPy view is built: the cheaper form for hot paths)."""
        dev = self.buffers.get(name)
        if dev is None or dev.nbytes < host.nbytes:
            dev = self.buffer(name, host.nbytes)
        ptr = dev.data.ptr
        self.copy_to_device(ptr, host)
        return ptr

    def copy_to_device(self, ptr: int, host) -> None:
        """Copy the 1-D C-contiguous NumPy array ``host`` to device address ``ptr``
        on this stream, asynchronously, through the pinned staging ring (see :meth:`upload`)."""
        import cupy
        import numpy as np

        nbytes = host.nbytes
        staging = self.staging
        if len(staging) < STAGING_SLOTS:
            staging.append([None, None, 0, None])  # pinned memory, event, capacity, its bytes
        slot = staging[self.next_staging % len(staging)]
        self.next_staging += 1
        if slot[1] is not None:
            slot[1].synchronize()  # the copy that last read this slot is done
        if slot[2] < nbytes:
            capacity = max(nbytes, 4096)
            pinned = cupy.cuda.alloc_pinned_memory(capacity)
            slot[0], slot[2] = pinned, capacity
            slot[3] = np.frombuffer(pinned, dtype=np.uint8, count=capacity)
        slot[3][:nbytes] = host.view(np.uint8)
        cupy.cuda.runtime.memcpyAsync(
            ptr, slot[0].ptr, nbytes, cupy.cuda.runtime.memcpyHostToDevice, self.stream
        )
        if slot[1] is None:
            slot[1] = cupy.cuda.Event(block=False, disable_timing=True)
        slot[1].record(self.cupy_stream)

    def bind(self, workspace_bytes: int) -> int:
        """Point the cuBLAS handle at this stream and its workspace; return the handle."""
        import cupy

        if self.workspace is None or self.workspace.nbytes < workspace_bytes:
            with cupy.cuda.Device(self.device_id):
                self.workspace = cupy.empty(max(workspace_bytes, 1), dtype=cupy.uint8)
        # The handle is shared by this thread's streams on the device: rebind
        # only when another stream or workspace was bound since (two cuBLAS
        # calls saved on every repeated call).
        wanted = (self.stream, self.workspace.data.ptr if workspace_bytes else 0, workspace_bytes)
        if _bound.get(self.handle) != wanted:
            _bound.pop(self.handle, None)  # unknown state if a call below raises
            _cublas.set_stream(self.handle, self.stream)
            # cublasSetStream resets the workspace to cuBLAS's own pool, so it is
            # set again after every stream change.
            if workspace_bytes:
                _cublas.set_workspace(self.handle, self.workspace.data.ptr, self.workspace.nbytes)
            _bound[self.handle] = wanted
        return self.handle


# Pinned staging buffers per stream for host-to-device uploads of sizes.
STAGING_SLOTS = 4
# cuBLAS handle -> (stream, workspace address, workspace bytes) it is bound to now.
_bound: dict[int, tuple[int, int, int]] = {}

_registry_lock = threading.Lock()
_all_handles: list[tuple[int, int]] = []  # (device, handle), destroyed at exit
_local = threading.local()


def _thread_handle(device_id: int) -> int:
    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = {}
    handle = handles.get(device_id)
    if handle is None:
        import cupy
        from cuda.core import Device

        with cupy.cuda.Device(device_id):
            # cuda.core launches use the driver's current context; make it the
            # device's primary context, the one CuPy and cuBLAS use.
            Device(device_id).set_current()
            handle = _cublas.create()
        handles[device_id] = handle
        with _registry_lock:
            _all_handles.append((device_id, handle))
    return handle


def resources(device_id: int, stream: int) -> StreamResources:
    """State for (device, current thread, stream), created on first use."""
    per_stream = getattr(_local, "streams", None)
    if per_stream is None:
        per_stream = _local.streams = {}
    key = (device_id, stream)
    res = per_stream.get(key)
    if res is None:
        import cupy

        res = StreamResources(device_id, stream, _thread_handle(device_id))
        from cuda.core import Stream

        res.launch_stream = Stream.from_handle(stream)
        if hasattr(cupy.cuda.Stream, "from_external"):
            res.cupy_stream = cupy.cuda.Stream.from_external(_StreamProtocol(stream))
        else:  # CuPy < 14
            res.cupy_stream = cupy.cuda.ExternalStream(stream, device_id)
        per_stream[key] = res
    return res


def known_resources(stream: int) -> list[StreamResources]:
    """This thread's :class:`StreamResources` made so far for the raw stream
    handle ``stream``, on any device (none are created here)."""
    per_stream = getattr(_local, "streams", None) or {}
    return [res for (_, handle), res in list(per_stream.items()) if handle == stream]


@atexit.register
def _destroy_handles() -> None:
    with _registry_lock:
        handles, _all_handles[:] = list(_all_handles), []
    for _, handle in handles:
        try:
            _cublas.destroy(handle)
        except Exception:
            pass  # the driver may already be shutting down
