"""The process group: one process per GPU, its NCCL communicator, and checked waits.

:func:`init_process_group` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` (what ``python -m cublas_grouped.launch``,
torchrun and most MPI wrappers set), meets the other ranks through the TCP
store of rank 0, shares the NCCL unique id there, waits at a barrier (so a
rank that never starts is reported by number instead of hanging NCCL's
initialisation), and creates the communicator with ``cupy.cuda.nccl``.

Every host wait on NCCL work goes through :meth:`ProcessGroup.wait`: it polls
an event and the communicator's asynchronous error, and past the timeout it
aborts the communicator and raises :class:`CollectiveTimeoutError`, because a
peer that died leaves NCCL kernels waiting forever on the survivors.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .store import TOKEN_ENV, StoreTimeoutError, TCPStore

__all__ = [
    "CollectiveTimeoutError",
    "DistributedError",
    "ProcessGroup",
    "LaunchEnv",
    "read_launch_env",
    "init_process_group",
]

DEFAULT_TIMEOUT_S = 300.0
_NCCL_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES


class DistributedError(RuntimeError):
    """A failure of the process group (NCCL error, a peer that is gone)."""


class CollectiveTimeoutError(DistributedError, TimeoutError):
    """NCCL work did not finish within the timeout: a peer is gone or stuck."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher said about this process (from the environment)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    store_token: str | None = field(default=None, repr=False)  # never printed


def _env_int(env, name: str, default: int | None = None) -> int:
    text = env.get(name)
    if text is None:
        if default is None:
            raise ValueError(
                f"environment variable {name} is not set; start the processes with "
                "`python -m cublas_grouped.launch --nproc N script.py` (or torchrun / an MPI launcher "
                "that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
            )
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {text!r}") from None


def read_launch_env(env=None) -> LaunchEnv:
    """Parse the launcher's variables; ``ValueError`` names the one that is missing or wrong.

    ``LOCAL_RANK`` defaults to ``RANK`` (one host), ``MASTER_ADDR`` to 127.0.0.1
    (an empty one is refused: it would make rank 0 listen on every interface).
    ``CUBLAS_GROUPED_STORE_TOKEN``, when set, is the store's shared token.
    """
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE")
    rank = _env_int(env, "RANK")
    local = _env_int(env, "LOCAL_RANK", rank)
    port = _env_int(env, "MASTER_PORT")
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1; got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}); got {rank}")
    if local < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0; got {local}")
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT must be in [1, 65535]; got {port}")
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if not addr:
        raise ValueError("MASTER_ADDR is empty; name rank 0's address (127.0.0.1 on one host)")
    return LaunchEnv(rank, world, local, addr, port, env.get(TOKEN_ENV) or None)


class ProcessGroup:
    """This rank's view of the group: rank, size, device and NCCL communicator.

    Build one with :func:`init_process_group`. ``timeout`` (seconds) bounds
    every :meth:`wait`. Call :meth:`close` at the end (or use ``with``).
    """

    def __init__(
        self, rank: int, world_size: int, device_id: int, comm, store: TCPStore | None, timeout: float
    ):
        self.rank, self.world_size, self.device_id = rank, world_size, device_id
        self.comm, self.store, self.timeout = comm, store, float(timeout)
        self._aborted = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait(self, event, what: str, timeout: float | None = None) -> None:
        """Block the host until ``event`` (a recorded CuPy event) completes.

        Polls NCCL's asynchronous error meanwhile; raises
        :class:`DistributedError` on one, and :class:`CollectiveTimeoutError`
        (after aborting the communicator, which ends its stuck kernels) when
        ``timeout`` (default: the group's) passes. ``what`` names the step.
        """
        limit = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        pause = 1e-5
        while not event.done:
            self.check_async_error(what)
            if time.monotonic() > deadline:
                self.abort()
                raise CollectiveTimeoutError(
                    f"rank {self.rank}: {what} did not finish within {limit:g} s; a peer rank is gone or "
                    "stuck (the NCCL communicator was aborted: this group cannot be used again)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)  # short waits stay short; long ones do not spin
        self.check_async_error(what)

    def all_reduce(self, buf, op: str, stream_ptr: int) -> None:
        """In-place NCCL all-reduce of a contiguous int32/int64/float32 CuPy array (``op``: sum, max, min)."""
        from cupy.cuda import nccl

        dtypes = {"int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64, "float32": nccl.NCCL_FLOAT32}
        ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}
        ptr = buf.data.ptr
        self.comm.allReduce(ptr, ptr, buf.size, dtypes[buf.dtype.name], ops[op], stream_ptr)

    def exchange(self, send_ptr: int, send_spans, recv_ptr: int, recv_spans, stream_ptr: int) -> None:
        """Variable-size all-to-all of bytes: grouped ``ncclSend``/``ncclRecv``, one pair per peer.

        ``send_spans[d]`` = (byte offset, byte count) of what goes to rank d
        (from ``send_ptr``), ``recv_spans[s]`` where rank s's bytes land (from
        ``recv_ptr``). Both sides must agree on every count; empty spans are
        skipped on both sides, so they need no message. Enqueued on the stream; no wait.
        """
        from cupy.cuda import nccl

        if self._aborted:
            raise DistributedError(f"rank {self.rank}: the NCCL communicator was aborted earlier")
        nccl.groupStart()
        try:
            for peer in range(self.world_size):
                off, count = send_spans[peer]
                if count:
                    self.comm.send(send_ptr + int(off), int(count), nccl.NCCL_UINT8, peer, stream_ptr)
                off, count = recv_spans[peer]
                if count:
                    self.comm.recv(recv_ptr + int(off), int(count), nccl.NCCL_UINT8, peer, stream_ptr)
        finally:
            nccl.groupEnd()

    def check_async_error(self, what: str = "NCCL work") -> None:
        """Raise :class:`DistributedError` if NCCL reported an asynchronous error."""
        if self._aborted:
            raise DistributedError(f"rank {self.rank}: the NCCL communicator was aborted earlier")
        try:
            self.comm.check_async_error()
        except Exception as exc:  # cupy's NcclError names the status
            raise DistributedError(f"rank {self.rank}: NCCL failed during {what}: {exc}") from exc

    def abort(self) -> None:
        """Abort the communicator (ends pending NCCL work; the group is unusable after)."""
        if not self._aborted:
            self._aborted = True
            try:
                self.comm.abort()
            except Exception:
                pass  # already broken: nothing more to free

    def close(self) -> None:
        """Destroy the communicator and close the store connection."""
        if self.comm is not None and not self._aborted:
            self.comm.destroy()
        self.comm = None
        self._aborted = True
        if self.store is not None:
            self.store.close()
            self.store = None


def init_process_group(
    *, timeout: float = DEFAULT_TIMEOUT_S, env=None, device_id: int | None = None
) -> ProcessGroup:
    """Join the group the launcher started; one process per GPU.

    Parameters
    ----------
    timeout : seconds allowed for meeting the other ranks and for every later
        :meth:`ProcessGroup.wait` (a rank that died is reported after it).
    env : mapping read instead of ``os.environ`` (tests).
    device_id : the GPU of this rank; default ``LOCAL_RANK``.

    Rank 0's store binds ``MASTER_ADDR`` and, when ``CUBLAS_GROUPED_STORE_TOKEN``
    is set, admits only ranks holding the same token (docs/security.md).
    Sets ``NCCL_NVLS_ENABLE=0`` when unset (NVLink multicast off, as the
    launcher does). Raises ``ValueError`` for a bad environment,
    :class:`cublas_grouped.distributed.StoreTimeoutError` when ranks do not meet.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive; got {timeout!r}")
    info = read_launch_env(env)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import cupy
    from cupy.cuda import nccl

    if not nccl.available:
        raise DistributedError(
            "NCCL is not available to CuPy; install the NCCL wheel with the package's extra: "
            'pip install "cublas_grouped[cu12,nccl-cu12]" (or "cublas_grouped[cu13,nccl-cu13]")'
        )
    device = info.local_rank if device_id is None else int(device_id)
    count = cupy.cuda.runtime.getDeviceCount()
    if not 0 <= device < count:
        raise ValueError(
            f"rank {info.rank}: device {device} (LOCAL_RANK) does not exist; {count} GPUs are visible"
        )
    cupy.cuda.Device(device).use()
    store = TCPStore(
        info.master_addr, info.master_port, is_server=info.rank == 0, timeout=timeout, token=info.store_token
    )
    try:
        if info.rank == 0:
            store.set("nccl_unique_id", bytes(nccl.get_unique_id()))
        uid = store.get("nccl_unique_id")
        if len(uid) != _NCCL_ID_BYTES:  # only rank 0 writes it; anything else is not an NCCL id
            store.close()
            raise DistributedError(f"rank {info.rank}: the store's NCCL id has {len(uid)} bytes, not 128")
        store.barrier("init", info.rank, info.world_size)
        comm = nccl.NcclCommunicator(info.world_size, uid, info.rank)
    except StoreTimeoutError:
        store.close()
        raise
    group = ProcessGroup(info.rank, info.world_size, device, comm, store, timeout)
    _warm_up(group)
    return group


def _warm_up(group: ProcessGroup) -> None:
    """One all-reduce and one byte to and from every peer while all ranks are here.

    NCCL connects peers lazily, inside the host call of the first operation
    that needs them; a peer missing then would block that host call, out of
    reach of :meth:`ProcessGroup.wait`'s timeout. Connecting at start-up keeps
    the first calls of a layer from blocking that way.
    """
    import cupy

    stream = cupy.cuda.get_current_stream()
    one = cupy.ones(1, dtype=cupy.int32)
    group.all_reduce(one, "sum", stream.ptr)
    send = cupy.zeros(group.world_size, dtype=cupy.uint8)
    recv = cupy.empty_like(send)
    spans = [(peer, 1) for peer in range(group.world_size)]
    group.exchange(send.data.ptr, spans, recv.data.ptr, spans, stream.ptr)
    group.wait(stream.record(), "the start-up exchange")
    if int(one[0]) != group.world_size:
        raise DistributedError(
            f"rank {group.rank}: the start-up all-reduce gave {int(one[0])}, not {group.world_size}"
        )
