"""``python -m cublas_grouped.launch --nproc N script.py [args]``: one process per GPU on one host.

Each process gets ``RANK`` = ``LOCAL_RANK`` = its index, ``WORLD_SIZE`` = N,
``MASTER_ADDR`` (default 127.0.0.1) and ``MASTER_PORT`` (default: a free
port), and ``NCCL_NVLS_ENABLE=0`` unless the caller set it (NVLink multicast
stays off). Unless ``CUBLAS_GROUPED_STORE_TOKEN`` is set already, every launch
gives its ranks a fresh random one, so that other users of the host cannot
join the start-up store on the loopback port. ``-m module`` runs a module instead of a script. When a process
fails (non-zero exit or a signal), the others are terminated (SIGTERM, then
SIGKILL after ``--grace`` seconds) and the launcher exits with the first
failure's code (128 + signal number for a signal); when all succeed, with 0.
Output is not captured: every rank writes to the launcher's stdout/stderr.

Standard library only; it starts the processes and does not touch a GPU itself.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

__all__ = ["build_parser", "free_port", "rank_env", "launch", "split_argv", "main", "STORE_TOKEN_ENV"]

# The store's token variable (cublas_grouped.distributed.store.TOKEN_ENV; named
# again here so that the launcher imports nothing but the standard library).
STORE_TOKEN_ENV = "CUBLAS_GROUPED_STORE_TOKEN"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_env(base, rank: int, nproc: int, addr: str, port: int) -> dict[str, str]:
    """The environment of process ``rank``: ``base`` plus the launcher's variables."""
    env = dict(base)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    return env


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the launcher dies (even by SIGKILL),
    so no rank outlives it holding a GPU. Best effort: elsewhere nothing happens."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def launch(command: list[str], nproc: int, *, addr="127.0.0.1", port=None, grace=5.0, env=None) -> int:
    """Run ``command`` (an argv list) ``nproc`` times with rank variables; return the exit code."""
    port = free_port(addr) if port is None else port
    base = os.environ if env is None else env
    if not base.get(STORE_TOKEN_ENV):
        base = {**base, STORE_TOKEN_ENV: secrets.token_hex(32)}  # one per launch, shared by its ranks
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(
            signal.SIGTERM, _raise_interrupt
        )  # a terminated launcher stops its ranks too
    procs = [
        subprocess.Popen(command, env=rank_env(base, r, nproc, addr, port), preexec_fn=_die_with_parent)
        for r in range(nproc)
    ]
    failure = None
    try:
        while failure is None and any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    failure = (rank, p.returncode)
                    break
            time.sleep(0.05)
        if failure is None:  # all ended: a failure may have been the last to end
            failure = next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode), None)
    except KeyboardInterrupt:
        failure = (-1, -signal.SIGINT)
    finally:
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + grace
        for p in alive:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if failure is None:
        return 0
    rank, code = failure
    if rank >= 0:
        print(
            f"cublas_grouped.launch: rank {rank} exited with {code}; the other ranks were stopped",
            file=sys.stderr,
        )
    return _exit_code(code)


def build_parser() -> argparse.ArgumentParser:
    """The command line of the launcher."""
    p = argparse.ArgumentParser(
        prog="python -m cublas_grouped.launch",
        description="Start one process per GPU on this host with RANK, WORLD_SIZE, LOCAL_RANK, "
        "MASTER_ADDR and MASTER_PORT set; stop them all when one fails.",
    )
    p.add_argument("--nproc", type=int, required=True, help="processes to start (one per GPU)")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of rank 0's store (default 127.0.0.1)")
    p.add_argument(
        "--master-port", type=int, default=None, help="port of rank 0's store (default: a free one)"
    )
    p.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL (default 5)")
    p.add_argument(
        "-m", dest="module", default=None, help="run a module (like python -m) instead of a script"
    )
    p.add_argument("script", nargs="?", help="the script each process runs, then its arguments")
    return p


_VALUED = ("--nproc", "--master-addr", "--master-port", "--grace")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's own arguments, the child's arguments after ``-m MODULE`` or the script).

    Everything after the script (or the module name) belongs to the child,
    options included, as with ``python`` itself.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return argv[: i + 2], argv[i + 2 :]
        if arg in _VALUED:
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return argv[: i + 1], argv[i + 1 :]
    return argv, []


def main(argv=None) -> int:
    """Parse the command line, start the ranks, return the exit code."""
    own, rest = split_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    if args.nproc < 1:
        print(f"cublas_grouped.launch: --nproc must be >= 1; got {args.nproc}", file=sys.stderr)
        return 2
    if args.module:
        command = [sys.executable, "-m", args.module, *rest]
    elif args.script:
        command = [sys.executable, args.script, *rest]
    else:
        print("cublas_grouped.launch: give a script (or -m module) to run", file=sys.stderr)
        return 2
    return launch(command, args.nproc, addr=args.master_addr, port=args.master_port, grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
