"""A small TCP key-value store that ranks use to meet before NCCL exists.

Rank 0 serves it on ``MASTER_ADDR:MASTER_PORT`` (stdlib sockets, one thread
per connection); every rank, rank 0 included, is a client. It carries the
NCCL unique id (128 bytes) and the start-up barrier, nothing else, so it is
plain: ``set(key, bytes)`` and ``get(key)``, which waits until the key exists.
Every wait has a deadline and ends in :class:`StoreTimeoutError` naming what
was awaited, so a rank that never comes is reported rather than waited on.

Wire format (one request per message): a 1-byte op (``S`` set, ``G`` get), a
4-byte big-endian key length, the key, and for ``S`` an 8-byte length and
the value. ``G`` is answered with an 8-byte length and the value, or with
length 2**64 - 1 when the server gave up waiting (its own deadline).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

__all__ = ["StoreTimeoutError", "TCPStore"]

_MISSING = 2**64 - 1


class StoreTimeoutError(TimeoutError):
    """A rank waited longer than its timeout for the store or a key in it."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the store's peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _Server:
    """The store's data and the thread that accepts connections (rank 0 only)."""

    def __init__(self, host: str, port: int):
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, name="cublas_grouped-store", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    op = conn.recv(1)
                    if not op:
                        return
                    (klen,) = struct.unpack("!I", _recv_exact(conn, 4))
                    key = _recv_exact(conn, klen).decode()
                    if op == b"S":
                        (vlen,) = struct.unpack("!Q", _recv_exact(conn, 8))
                        value = _recv_exact(conn, vlen)
                        with self.cond:
                            self.data[key] = value
                            self.cond.notify_all()
                        conn.sendall(b"\x01")
                    elif op == b"G":
                        (wait_ms,) = struct.unpack("!Q", _recv_exact(conn, 8))
                        with self.cond:
                            self.cond.wait_for(lambda k=key: k in self.data or self.closed, wait_ms / 1000)
                            value = self.data.get(key)
                        if value is None:
                            conn.sendall(struct.pack("!Q", _MISSING))
                        else:
                            conn.sendall(struct.pack("!Q", len(value)) + value)
                    else:
                        return  # not our protocol: drop the connection
            except (ConnectionError, OSError):
                return

    def close(self) -> None:
        self.closed = True
        with self.cond:
            self.cond.notify_all()
        self.sock.close()


class TCPStore:
    """Client of the store (and its server on the rank with ``is_server``).

    Parameters
    ----------
    host, port : where rank 0 serves the store. Port 0 with ``is_server``
        picks a free port (read it back from :attr:`port`).
    is_server : serve the store from this process (rank 0).
    timeout : seconds that connecting, and every :meth:`get`, may wait.
    """

    def __init__(self, host: str, port: int, *, is_server: bool, timeout: float = 300.0):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive; got {timeout!r}")
        self.host, self.timeout = host, float(timeout)
        self._server = _Server(host, port) if is_server else None
        self.port = self._server.port if self._server else int(port)
        self._lock = threading.Lock()
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=min(5.0, self.timeout))
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:  # rank 0 not listening yet: retry until the deadline
                last = exc
                time.sleep(0.1)
        raise StoreTimeoutError(
            f"could not reach rank 0's store at {self.host}:{self.port} within {self.timeout:g} s "
            f"(MASTER_ADDR/MASTER_PORT; is rank 0 running?): {last}"
        )

    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (replacing any earlier value)."""
        k = key.encode()
        with self._lock:
            self._sock.sendall(b"S" + struct.pack("!I", len(k)) + k + struct.pack("!Q", len(value)) + value)
            _recv_exact(self._sock, 1)

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """The value of ``key``, waiting until some rank sets it (at most ``timeout`` s)."""
        wait = self.timeout if timeout is None else float(timeout)
        k = key.encode()
        with self._lock:
            self._sock.settimeout(wait + 30.0)  # the server answers by its own deadline
            try:
                self._sock.sendall(b"G" + struct.pack("!I", len(k)) + k + struct.pack("!Q", int(wait * 1000)))
                (n,) = struct.unpack("!Q", _recv_exact(self._sock, 8))
                value = None if n == _MISSING else _recv_exact(self._sock, n)
            except (TimeoutError, ConnectionError) as exc:
                raise StoreTimeoutError(
                    f"the store at {self.host}:{self.port} stopped answering: {exc}"
                ) from exc
            finally:
                self._sock.settimeout(None)
        if value is None:
            raise StoreTimeoutError(f"waited {wait:g} s for store key {key!r}, which no rank set")
        return value

    def barrier(self, name: str, rank: int, world_size: int, timeout: float | None = None) -> None:
        """Wait until all ``world_size`` ranks reached the barrier ``name``.

        Raises :class:`StoreTimeoutError` listing the ranks that did not come.
        """
        self.set(f"{name}/{rank}", b"1")
        wait = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + wait
        missing = []
        for other in range(world_size):
            try:
                self.get(f"{name}/{other}", timeout=max(0.001, deadline - time.monotonic()))
            except StoreTimeoutError:
                missing.append(other)
        if missing:
            raise StoreTimeoutError(
                f"rank {rank}: ranks {missing} of {world_size} did not reach {name!r} within {wait:g} s"
            )

    def close(self) -> None:
        """Close the connection (and the server, on rank 0)."""
        self._sock.close()
        if self._server is not None:
            self._server.close()
