"""Expert parallelism without a GPU: the TCP store, the launcher's environment
and exit codes, the process group's environment checks and timeouts, and the
layer's argument checks (a faked group, fake GPU arrays)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cublas_grouped import launch
from cublas_grouped.distributed import (
    CollectiveTimeoutError,
    DistributedError,
    ExpertParallelMoE,
    ProcessGroup,
    StoreTimeoutError,
    TCPStore,
    read_launch_env,
)

ROOT = Path(__file__).resolve().parent.parent


def test_store_set_get_between_clients_and_waiting_get():
    server = TCPStore("127.0.0.1", 0, is_server=True, timeout=5)
    client = TCPStore("127.0.0.1", server.port, is_server=False, timeout=5)
    try:
        server.set("id", bytes(range(128)))
        assert client.get("id") == bytes(range(128))
        assert client.get("id") == bytes(range(128))  # a get does not consume
        threading.Timer(0.3, lambda: client.set("late", b"")).start()
        start = time.monotonic()
        assert server.get("late", timeout=5) == b""  # empty values are values
        assert 0.2 < time.monotonic() - start < 4
        client.set("id", b"new")
        assert server.get("id") == b"new"
        big = np.random.default_rng(0).bytes(3 << 20)
        client.set("big", big)
        assert server.get("big") == big
    finally:
        client.close()
        server.close()


def test_store_timeouts_name_what_was_awaited():
    server = TCPStore("127.0.0.1", 0, is_server=True, timeout=5)
    try:
        start = time.monotonic()
        with pytest.raises(StoreTimeoutError, match="waited 0.3 s for store key 'nobody', which no rank set"):
            server.get("nobody", timeout=0.3)
        assert time.monotonic() - start < 3
        with pytest.raises(StoreTimeoutError, match=r"rank 0: ranks \[1, 2\] of 3 did not reach 'init'"):
            server.barrier("init", 0, 3, timeout=0.3)
    finally:
        server.close()
    port = launch.free_port()
    with pytest.raises(
        StoreTimeoutError, match=f"could not reach rank 0's store at 127.0.0.1:{port} within 0.5 s"
    ):
        TCPStore("127.0.0.1", port, is_server=False, timeout=0.5)
    with pytest.raises(ValueError, match="timeout must be positive"):
        TCPStore("127.0.0.1", port, is_server=False, timeout=0)


def test_store_barrier_of_four_threads():
    server = TCPStore("127.0.0.1", 0, is_server=True, timeout=10)
    clients = [TCPStore("127.0.0.1", server.port, is_server=False, timeout=10) for _ in range(3)]
    errors = []

    def arrive(store, rank):
        try:
            store.barrier("b", rank, 4)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=arrive, args=(s, r)) for r, s in enumerate([server, *clients])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for s in clients:
        s.close()
    server.close()
    assert not errors and not any(t.is_alive() for t in threads)


def test_read_launch_env():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}
    info = read_launch_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (
        1,
        2,
        1,
        "127.0.0.1",
        29500,
    )
    assert read_launch_env({**env, "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1"}).local_rank == 0
    with pytest.raises(
        ValueError, match="environment variable WORLD_SIZE is not set; start the processes with"
    ):
        read_launch_env({"RANK": "0", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="environment variable MASTER_PORT is not set"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "1"})
    with pytest.raises(ValueError, match="environment variable RANK must be an integer; got 'x'"):
        read_launch_env({**env, "RANK": "x"})
    with pytest.raises(ValueError, match=r"RANK must be in \[0, WORLD_SIZE=2\); got 2"):
        read_launch_env({**env, "RANK": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be >= 1; got 0"):
        read_launch_env({**env, "WORLD_SIZE": "0"})
    with pytest.raises(ValueError, match="LOCAL_RANK must be >= 0; got -1"):
        read_launch_env({**env, "LOCAL_RANK": "-1"})
    with pytest.raises(ValueError, match=r"MASTER_PORT must be in \[1, 65535\]; got 70000"):
        read_launch_env({**env, "MASTER_PORT": "70000"})


def test_rank_env_sets_the_variables_and_keeps_multicast_off():
    env = launch.rank_env({"PATH": "/bin"}, 2, 4, "127.0.0.1", 1234)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "2",
        "LOCAL_RANK": "2",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1234",
    }
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["PATH"] == "/bin"
    assert launch.rank_env({"NCCL_NVLS_ENABLE": "1"}, 0, 1, "h", 1)["NCCL_NVLS_ENABLE"] == "1"


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _run_launcher(*args, timeout=60):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cublas_grouped.launch", *args],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - start


def test_launcher_runs_every_rank_and_passes_arguments(tmp_path):
    script = _script(
        tmp_path,
        """
        import os, sys
        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "NCCL_NVLS_ENABLE")
        print(" ".join(os.environ[k] for k in keys), os.environ["MASTER_PORT"].isdigit(), sys.argv[1:], flush=True)
        """,
    )
    proc, _ = _run_launcher("--nproc", "3", script, "--flag", "x")
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert lines == [f"{r} {r} 3 127.0.0.1 0 True ['--flag', 'x']" for r in range(3)]


def test_launcher_forwards_a_failure_and_stops_the_others(tmp_path):
    script = _script(
        tmp_path,
        """
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(3)
        time.sleep(60)
        """,
    )
    proc, elapsed = _run_launcher("--nproc", "3", "--grace", "1", script)
    assert proc.returncode == 3
    assert "rank 1 exited with 3; the other ranks were stopped" in proc.stderr
    assert elapsed < 30


def test_launcher_reports_a_signal_and_needs_a_script(tmp_path):
    script = _script(
        tmp_path,
        """
        import os, signal
        if os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    proc, _ = _run_launcher("--nproc", "2", script)
    assert proc.returncode == 128 + 9
    proc, _ = _run_launcher("--nproc", "2")
    assert proc.returncode == 2 and "give a script" in proc.stderr
    proc, _ = _run_launcher("--nproc", "0", script)
    assert proc.returncode == 2 and "--nproc must be >= 1; got 0" in proc.stderr


class _Event:
    def __init__(self, polls_until_done):
        self.left = polls_until_done

    @property
    def done(self):
        self.left -= 1
        return self.left < 0


class _Comm:
    def __init__(self, error=None):
        self.error, self.aborted = error, False

    def check_async_error(self):
        if self.error:
            raise RuntimeError(self.error)

    def abort(self):
        self.aborted = True


def test_group_wait_times_out_and_aborts():
    comm = _Comm()
    group = ProcessGroup(0, 2, 0, comm, None, timeout=0.2)
    group.wait(_Event(3), "a quick step")
    start = time.monotonic()
    with pytest.raises(
        CollectiveTimeoutError, match="rank 0: the counts exchange did not finish within 0.2 s"
    ):
        group.wait(_Event(10**9), "the counts exchange")
    assert comm.aborted and time.monotonic() - start < 2
    with pytest.raises(DistributedError, match="the NCCL communicator was aborted earlier"):
        group.wait(_Event(0), "the next step")


def test_group_wait_reports_nccl_errors():
    group = ProcessGroup(1, 2, 0, _Comm("NCCL_ERROR_REMOTE_ERROR"), None, timeout=5)
    with pytest.raises(
        DistributedError, match="rank 1: NCCL failed during dispatch: NCCL_ERROR_REMOTE_ERROR"
    ):
        group.wait(_Event(10**9), "dispatch")


def test_layer_refuses_bad_construction(fake):
    group = ProcessGroup(1, 4, 0, _Comm(), None, timeout=5)
    w1, w2 = fake((2, 16, 8)), fake((2, 4, 16))
    layer = ExpertParallelMoE(group, w1, w2, 8, 2)
    assert layer.placement.experts_per_rank == 2 and layer.first_expert == 2
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by world_size=4"):
        ExpertParallelMoE(group, w1, w2, 6, 2)
    with pytest.raises(
        ValueError, match="w1 holds 2 experts; with num_experts=12 over 4 ranks each rank holds 3"
    ):
        ExpertParallelMoE(group, w1, w2, 12, 2)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 8\]; got 9"):
        ExpertParallelMoE(group, w1, w2, 8, 9)
    with pytest.raises(ValueError, match="w1 is on device 1; this rank's device is 0"):
        ExpertParallelMoE(group, fake((2, 16, 8), device=1), w2, 8, 2)
    with pytest.raises(ValueError, match="w2 must map back to hidden=16"):
        ExpertParallelMoE(group, w1, fake((2, 4, 15)), 8, 2)


def test_layer_refuses_bad_calls_before_any_gpu_work(fake):
    group = ProcessGroup(0, 2, 0, _Comm(), None, timeout=5)
    # check_shapes=False: a refused call raises at once (with it, the rank first tells the others).
    layer = ExpertParallelMoE(group, fake((2, 16, 8)), fake((2, 4, 16)), 4, 2, check_shapes=False)
    ids, w = fake((5, 2), np.int32), fake((5, 2))
    with pytest.raises(ValueError, match="x has 15 columns; the layer's hidden size is 16"):
        layer.forward(fake((5, 15)), ids, w)
    with pytest.raises(TypeError, match="x must have dtype float32 like the weights; got float16"):
        layer.forward(fake((5, 16), np.float16), ids, w)
    with pytest.raises(ValueError, match="x is on device 1; this rank's device is 0"):
        layer.forward(fake((5, 16), device=1), ids, w)
    with pytest.raises(ValueError, match="give either topk_ids .* or router_logits, not both"):
        layer.forward(fake((5, 16)), ids, w, router_logits=fake((5, 4)))
    with pytest.raises(ValueError, match="give either topk_ids"):
        layer.forward(fake((5, 16)))
    with pytest.raises(ValueError, match=r"router_logits must have shape \(5, 4\) \[T, E\]; got \(5, 3\)"):
        layer.forward(fake((5, 16)), router_logits=fake((5, 3)))
    with pytest.raises(ValueError, match="topk_ids has 4 rows but x has 5 tokens"):
        layer.forward(fake((5, 16)), fake((4, 2), np.int32), None)
    with pytest.raises(ValueError, match="topk_ids has k=3; the layer was built with top_k=2"):
        layer.forward(fake((5, 16)), fake((5, 3), np.int32), None)
    with pytest.raises(TypeError, match="topk_ids must be int32"):
        layer.forward(fake((5, 16)), fake((5, 2), np.int64), None)


def test_launcher_argument_split():
    assert launch.split_argv(["--nproc", "2", "s.py", "--nproc", "x"]) == (
        ["--nproc", "2", "s.py"],
        ["--nproc", "x"],
    )
    assert launch.split_argv(["--nproc", "2", "--grace", "1", "-m", "pkg.mod", "--worker", "-m", "y"]) == (
        ["--nproc", "2", "--grace", "1", "-m", "pkg.mod"],
        ["--worker", "-m", "y"],
    )
    assert launch.split_argv(["--nproc", "2"]) == (["--nproc", "2"], [])


def test_launcher_runs_a_module_with_its_own_options(tmp_path):
    (tmp_path / "ep_probe_mod.py").write_text(
        "import os, sys\nprint(os.environ['RANK'], sys.argv[1:], flush=True)\n"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cublas_grouped.launch",
            "--nproc",
            "2",
            "-m",
            "ep_probe_mod",
            "--nproc",
            "-m",
        ],
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["0 ['--nproc', '-m']", "1 ['--nproc', '-m']"]
    assert time.monotonic() - start < 60


def test_ep_bench_report_and_targets():
    from cublas_grouped.tools.ep_bench import format_report

    def run(world, ms, d_ms, c_ms, a2a, experts=256):
        rows = [
            {
                "tokens_per_rank": 4096,
                "layer_ms": ms,
                "stage_ms": {"dispatch": d_ms, "combine_exchange": c_ms},
                "dispatch_bytes": 100e6,
                "combine_bytes": 100e6,
                "dispatch_gbs": 100e6 / (d_ms * 1e6) if world > 1 else None,
                "combine_gbs": 100e6 / (c_ms * 1e6) if world > 1 else None,
                "alltoall_busbw": a2a,
                "allreduce_busbw": a2a,
            }
        ]
        return {"world": world, "experts": experts, "requested_experts": 256, "rows": rows}

    # 1 GPU: 10 ms. 2 GPUs: 11 ms -> scaling 1.82x; transfers 200 MB in 0.5 ms = 400 GB/s vs 500 -> 80%.
    lines = format_report(
        [run(1, 10.0, 0, 0, None, experts=128), run(2, 11.0, 0.25, 0.25, 500.0), run(4, 14.0, 1, 1, 500.0)]
    )
    text = "\n".join(lines)
    assert (
        "PASS dispatch+combine at 80% of the all-to-all bus bandwidth (target >= 70%), 2 GPUs, 4096 tokens/rank"
        in text
    )
    assert "PASS tokens/s scaling 1.82x on 2 GPUs (target >= 1.7x), 4096 tokens/rank" in text
    assert "MISS dispatch+combine at 20% of the all-to-all bus bandwidth" in text
    assert "MISS tokens/s scaling 2.86x on 4 GPUs (target >= 3.2x)" in text
    assert "note: E scaled down to 128 (of 256) on 1 GPU(s)" in text
    assert "fixed capacity" not in text  # no decode rows, no section
    runs = [run(2, 1.0, 0.1, 0.1, 500.0), run(4, 1.0, 0.1, 0.1, 500.0)]
    runs[0]["rows"][0]["fixed"] = {"capacity": 16, "eager_ms": 0.5, "graph_ms": 0.25, "overflow": 3}
    runs[1]["rows"][0]["fixed"] = {"capacity": 8, "error": "RuntimeError: capture failed"}
    text = "\n".join(format_report(runs))
    assert "  2     4096      16        0.500     0.250            3" in text
    assert "  4 GPUs, 4096 tokens/rank: RuntimeError: capture failed" in text


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_ranks_do_not_outlive_the_launcher(tmp_path, how):
    import os
    import signal

    script = _script(
        tmp_path,
        f"""
        import os, time
        open(os.path.join({str(tmp_path)!r}, "pid" + os.environ["RANK"]), "w").write(str(os.getpid()))
        time.sleep(60)
        """,
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "cublas_grouped.launch", "--nproc", "2", "--grace", "1", script],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"pid{r}").exists() for r in range(2)) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # the pid files are complete
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
    launcher.send_signal(getattr(signal, how))
    launcher.wait(timeout=20)

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie no one reaps yet counts as gone.
        status = Path(f"/proc/{pid}/stat")
        return status.exists() and status.read_text().split()[2] != "Z"

    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), f"ranks {pids} outlived the launcher ({how})"
