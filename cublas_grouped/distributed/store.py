"""A small TCP key-value store that ranks use to meet before NCCL exists.

Rank 0 serves it on ``MASTER_ADDR:MASTER_PORT`` (stdlib sockets, one thread
per connection); every rank, rank 0 included, is a client. It carries the
NCCL unique id (128 bytes) and the start-up barrier, nothing else, so it is
plain: ``set(key, bytes)`` and ``get(key)``, which waits until the key exists.
Every wait has a deadline and ends in :class:`StoreTimeoutError` naming what
was awaited, so a rank that never comes is reported rather than waited on.

What it lets in (see docs/security.md):

- It listens on the address it is given and nowhere else (``MASTER_ADDR``,
  127.0.0.1 by default); an empty address, which would mean every
  interface, is refused.
- Every connection starts with a handshake: the server sends ``MAGIC`` and 32
  random bytes, the client answers with HMAC-SHA256 of them keyed by the
  shared token (``CUBLAS_GROUPED_STORE_TOKEN``; the empty key when unset),
  and the server answers one byte, accepted or refused. A client without the
  server's token is refused before it can read or write anything, and the
  token itself never crosses the network. ``python -m cublas_grouped.launch``
  gives its ranks a fresh random token when none is set.
- Messages have a fixed binary format and bounded sizes (``MAX_KEY_BYTES``,
  ``MAX_VALUE_BYTES``, ``MAX_KEYS``, ``MAX_STORED_BYTES``); keys are
  printable ASCII. Nothing received is deserialized beyond those integers and
  bytes. A message that breaks a rule ends its connection.
- A connection must finish its handshake within ``HANDSHAKE_TIMEOUT_S`` and
  each message once begun within ``MESSAGE_TIMEOUT_S``; at most
  ``MAX_HANDSHAKES`` connections may be in their handshake at once.

Wire format after the handshake (one request per message): a 1-byte op (``S``
set, ``G`` get), a 4-byte big-endian key length, the key, and for ``S`` an
8-byte length and the value (answered with one byte), for ``G`` an 8-byte
wait in ms. ``G`` is answered with an 8-byte length and the value, or with
length 2**64 - 1 when the server gave up waiting (its own deadline).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading
import time

__all__ = [
    "MAGIC",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "MAX_KEYS",
    "MAX_STORED_BYTES",
    "TOKEN_ENV",
    "StoreAuthError",
    "StoreProtocolError",
    "StoreTimeoutError",
    "TCPStore",
    "key_problem",
]

MAGIC = b"CGSTORE1"
TOKEN_ENV = "CUBLAS_GROUPED_STORE_TOKEN"
MAX_KEY_BYTES = 256
# The NCCL id is 128 bytes; a few MiB leave room for small start-up exchanges.
MAX_VALUE_BYTES = 4 << 20
MAX_KEYS = 1 << 16
MAX_STORED_BYTES = 64 << 20
MAX_WAIT_MS = 24 * 3600 * 1000
HANDSHAKE_TIMEOUT_S = 10.0
MESSAGE_TIMEOUT_S = 30.0
MAX_HANDSHAKES = 128
_NONCE_BYTES = 32
_ACCEPTED, _REFUSED = b"\x01", b"\x00"
_MISSING = 2**64 - 1


class StoreTimeoutError(TimeoutError):
    """A rank waited longer than its timeout for the store or a key in it."""


class StoreAuthError(PermissionError):
    """The store refused this client's token (``CUBLAS_GROUPED_STORE_TOKEN`` differs)."""


class StoreProtocolError(ConnectionError):
    """The peer does not speak the store's protocol, or broke one of its bounds."""


def key_problem(key: bytes) -> str | None:
    """Why ``key`` (encoded) cannot be a store key, or None: 1 to ``MAX_KEY_BYTES``
    bytes of printable ASCII (no spaces or control characters)."""
    if not 0 < len(key) <= MAX_KEY_BYTES:
        return f"a key must be 1 to {MAX_KEY_BYTES} bytes; got {len(key)}"
    if not all(0x21 <= b <= 0x7E for b in key):
        return "a key must be printable ASCII without spaces"
    return None


def _token_bytes(token: str | bytes | None) -> bytes:
    return token.encode() if isinstance(token, str) else (token or b"")


def _proof(token: bytes, challenge: bytes) -> bytes:
    return hmac.new(token, challenge, hashlib.sha256).digest()


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

    def __init__(self, host: str, port: int, token: bytes):
        self.data: dict[str, bytes] = {}
        self.stored = 0  # bytes of all values
        self.cond = threading.Condition()
        self.token = token
        self.handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.sock.settimeout(0.5)
        self.address = self.sock.getsockname()[:2]
        self.port = self.address[1]
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
            if not self.handshakes.acquire(blocking=False):
                conn.close()  # too many half-open connections: the client retries
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _admit(self, conn: socket.socket) -> bool:
        """The handshake: whether the client proved it holds the token."""
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            challenge = MAGIC + os.urandom(_NONCE_BYTES)
            conn.sendall(challenge)
            answer = _recv_exact(conn, 32)
            ok = hmac.compare_digest(answer, _proof(self.token, challenge))
            conn.sendall(_ACCEPTED if ok else _REFUSED)
            return ok
        finally:
            self.handshakes.release()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if not self._admit(conn):
                    return
                while self._request(conn):
                    pass
            except (OSError, ValueError, struct.error):
                return  # a broken or hostile peer: drop its connection, keep serving the others

    def _request(self, conn: socket.socket) -> bool:
        """Answer one request; False ends the connection (closed, or a rule broken)."""
        conn.settimeout(None)  # a rank may stay idle between requests
        op = conn.recv(1)
        if op not in (b"S", b"G"):
            return False  # closed, or not our protocol
        conn.settimeout(MESSAGE_TIMEOUT_S)  # a begun message must arrive whole
        (klen,) = struct.unpack("!I", _recv_exact(conn, 4))
        if klen > MAX_KEY_BYTES:
            return False
        raw = _recv_exact(conn, klen)
        if key_problem(raw) is not None:
            return False
        key = raw.decode("ascii")
        if op == b"S":
            (vlen,) = struct.unpack("!Q", _recv_exact(conn, 8))
            if vlen > MAX_VALUE_BYTES:
                return False
            value = _recv_exact(conn, vlen)
            with self.cond:
                old = self.data.get(key)
                grown = self.stored + len(value) - (len(old) if old is not None else 0)
                if (old is None and len(self.data) >= MAX_KEYS) or grown > MAX_STORED_BYTES:
                    return False
                self.data[key], self.stored = value, grown
                self.cond.notify_all()
            conn.sendall(_ACCEPTED)
            return True
        (wait_ms,) = struct.unpack("!Q", _recv_exact(conn, 8))
        with self.cond:
            self.cond.wait_for(lambda: key in self.data or self.closed, min(wait_ms, MAX_WAIT_MS) / 1000)
            value = self.data.get(key)
        if value is None:
            conn.sendall(struct.pack("!Q", _MISSING))
        else:
            conn.sendall(struct.pack("!Q", len(value)) + value)
        return True

    def close(self) -> None:
        self.closed = True
        with self.cond:
            self.cond.notify_all()
        self.sock.close()


class TCPStore:
    """Client of the store (and its server on the rank with ``is_server``).

    Parameters
    ----------
    host, port : where rank 0 serves the store; the server binds exactly
        ``host`` (an empty one, meaning every interface, is refused). Port 0
        with ``is_server`` picks a free port (read it back from :attr:`port`).
    is_server : serve the store from this process (rank 0).
    timeout : seconds that connecting, and every :meth:`get` and :meth:`set`, may wait.
    token : the shared secret every rank must hold (str or bytes); None or
        empty: no token. All ranks must pass the same one.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        is_server: bool,
        timeout: float = 300.0,
        token: str | bytes | None = None,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive; got {timeout!r}")
        if not host:
            raise ValueError(
                "host must name the address to serve on (MASTER_ADDR); an empty one would listen "
                "on every interface"
            )
        self.host, self.timeout = host, float(timeout)
        self._token = _token_bytes(token)
        self._server = _Server(host, port, self._token) if is_server else None
        self.port = self._server.port if self._server else int(port)
        self._lock = threading.Lock()
        self._sock = self._connect()

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` the server listens on (rank 0), else None."""
        return tuple(self._server.address) if self._server else None

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=min(5.0, self.timeout))
            except OSError as exc:  # rank 0 not listening yet: retry until the deadline
                last = exc
                time.sleep(0.1)
                continue
            try:
                self._handshake(sock)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except (StoreAuthError, StoreProtocolError):  # retrying cannot help: report it now
                sock.close()
                raise
            except OSError as exc:  # dropped while the server was busy, or not a store: retry
                sock.close()
                last = exc
                time.sleep(0.1)
        raise StoreTimeoutError(
            f"could not reach rank 0's store at {self.host}:{self.port} within {self.timeout:g} s "
            f"(MASTER_ADDR/MASTER_PORT; is rank 0 running?): {last}"
        )

    def _handshake(self, sock: socket.socket) -> None:
        challenge = _recv_exact(sock, len(MAGIC) + _NONCE_BYTES)
        if not challenge.startswith(MAGIC):
            raise StoreProtocolError(f"{self.host}:{self.port} is not a cublas_grouped store")
        sock.sendall(_proof(self._token, challenge))
        if _recv_exact(sock, 1) != _ACCEPTED:
            raise StoreAuthError(
                f"the store at {self.host}:{self.port} refused this rank: its token differs from "
                f"rank 0's (set the same {TOKEN_ENV} on every rank, or on none)"
            )

    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` (at most ``MAX_VALUE_BYTES``) under ``key`` (replacing any earlier value)."""
        k = _check_key(key)
        if len(value) > MAX_VALUE_BYTES:
            raise ValueError(f"value must be at most {MAX_VALUE_BYTES} bytes; got {len(value)}")
        with self._lock:
            self._sock.settimeout(self.timeout)
            try:
                self._sock.sendall(
                    b"S" + struct.pack("!I", len(k)) + k + struct.pack("!Q", len(value)) + value
                )
                _recv_exact(self._sock, 1)
            except (TimeoutError, ConnectionError) as exc:
                raise StoreTimeoutError(
                    f"the store at {self.host}:{self.port} did not take key {key!r}: {exc}"
                ) from exc
            finally:
                self._sock.settimeout(None)

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """The value of ``key``, waiting until some rank sets it (at most ``timeout`` s)."""
        wait = self.timeout if timeout is None else float(timeout)
        k = _check_key(key)
        with self._lock:
            self._sock.settimeout(wait + 30.0)  # the server answers by its own deadline
            try:
                self._sock.sendall(b"G" + struct.pack("!I", len(k)) + k + struct.pack("!Q", int(wait * 1000)))
                (n,) = struct.unpack("!Q", _recv_exact(self._sock, 8))
                if n != _MISSING and n > MAX_VALUE_BYTES:
                    raise StoreProtocolError(f"the store announced a value of {n} bytes")
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


def _check_key(key: str) -> bytes:
    k = key.encode()
    problem = key_problem(k)
    if problem is not None:
        raise ValueError(f"key {key[:40]!r}: {problem}")
    return k
