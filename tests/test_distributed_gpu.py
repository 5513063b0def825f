"""Expert parallelism on 2 and 4 GPUs of one host: the distributed layer,
started through the launcher, against single-GPU ``moe_forward`` holding all
experts and the float64 reference; bitwise repeatable; the overlapped
exchange (``overlap_chunks`` 2 and 3) with the same bits as one chunk;
refused calls raise on every rank; a rank that stops taking part ends in a
timeout, not a hang.

Each launch runs every case in one set of processes (tests/ep_worker.py), so
the whole file takes about a minute on 2 GPUs. World sizes: 2, and 4 where
four GPUs are present; ``CUBLAS_GROUPED_EP_WORLDS=2,4`` names them (a size
with too few GPUs then fails instead of being left out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "ep_worker.py"
CASES = [
    "fp32 uniform prefill",
    "bf16 uniform prefill",
    "bf16 skewed prefill",
    "bf16 decode",
    "fp32 decode one token",
    "bf16 all to the last rank",
    "fp32 a rank with no tokens",
]


def _device_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_device_count() < 2, reason="needs two GPUs")]
_NAMED = os.environ.get("CUBLAS_GROUPED_EP_WORLDS")
WORLDS = [int(w) for w in _NAMED.split(",")] if _NAMED else [2] + ([4] if _device_count() >= 4 else [])


def _launch(nproc: int, mode: str, out_dir: Path, timeout: float):
    # AUTOTUNE=0: algorithm choices from tables and rules, nothing measured or written by the ranks.
    env = dict(os.environ, PYTHONPATH=str(ROOT), NCCL_NVLS_ENABLE="0", CUBLAS_GROUPED_AUTOTUNE="0")
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cublas_grouped.launch",
            "--nproc",
            str(nproc),
            str(WORKER),
            mode,
            str(out_dir),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - start


@pytest.fixture(scope="module", params=WORLDS, ids=lambda r: f"{r}gpus")
def results(request, tmp_path_factory):
    nproc = request.param
    assert nproc <= _device_count(), (
        f"{nproc} GPUs named in CUBLAS_GROUPED_EP_WORLDS; {_device_count()} present"
    )
    out = tmp_path_factory.mktemp(f"ep{nproc}")
    proc, _ = _launch(nproc, "cases", out, timeout=300)
    assert proc.returncode == 0, (
        f"launcher exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return nproc, [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("case", CASES)
def test_distributed_layer_equals_one_gpu(results, case):
    nproc, ranks = results
    fp32 = case.startswith("fp32")
    for rank, got in enumerate(ranks):
        r = got[case]
        assert "exception" not in r, f"rank {rank}: {r.get('exception')}"
        where = f"{case}, rank {rank} of {nproc}"
        assert r["shape_ok"] and r["nan"] == 0, f"{where}: shape or unwritten elements ({r['nan']} NaN)"
        assert r["bitwise_repeat"], f"{where}: two runs differ"
        assert r["sent_ok"] and r["received_ok"], f"{where}: traffic differs from the NumPy plan"
        if fp32:
            assert r["err_single"] <= 1e-5 and r["err_ref"] <= 1e-5, f"{where}: {r}"
        else:
            assert r["err_single"] <= 2e-2, f"{where}: {r}"
            # Within about twice the error of the one-GPU layer against float64.
            assert r["err_ref"] <= 2 * r["err_single_ref"] + 1e-3, f"{where}: {r}"
    if case == "bf16 all to the last rank":
        assert [got[case]["received"] for got in ranks[:-1]] == [[0] * nproc] * (nproc - 1)
    if case == "fp32 a rank with no tokens":
        assert ranks[0][case]["tokens"] == 0


@pytest.mark.parametrize("case", CASES)
def test_overlap_chunks_give_the_bits_of_one_chunk(results, case):
    nproc, ranks = results
    fp32 = case.startswith("fp32")
    for rank, got in enumerate(ranks):
        overlap = got[case]["overlap"]
        assert "exception" not in overlap, f"rank {rank}: {overlap.get('exception')}"
        assert sorted(overlap) == ["2", "3"]
        for chunks, r in overlap.items():
            where = f"{case}, {chunks} chunks, rank {rank} of {nproc}: {r}"
            assert r["bitwise_repeat"] and r["nan"] == 0, where
            assert r["err_ref"] <= (1e-5 if fp32 else 2e-2), where
            if r["bits_required"]:
                assert r["same_bits"], where
    # The check above is not vacuous: fp32 always, bf16 prefill on the Hopper kernel (SM 9.0).
    if case == "fp32 uniform prefill" or (
        case == "bf16 uniform prefill" and ranks[0][case]["overlap"]["3"]["sm"] == [9, 0]
    ):
        assert all(got[case]["overlap"]["3"]["bits_required"] for got in ranks)
        assert all(got[case]["overlap"]["3"]["chunks"] >= 2 for got in ranks)


def test_fixed_capacity_layer(results):
    nproc, ranks = results
    for rank, got in enumerate(ranks):
        f = got["fixed"]
        assert "exception" not in f, f"rank {rank}: {f.get('exception')}"
        for case, r in f.items():
            where = f"fixed capacity, {case}, rank {rank} of {nproc}"
            assert "exception" not in r, f"{where}: {r.get('exception')}"
            assert r["bitwise_repeat"], where
            assert r["overflow"] == r["overflow_expected"], f"{where}: {r}"
            assert r["nan_rows"] == r["nan_rows_expected"], f"{where}: NaN rows {r}"
            assert r["err_ref_kept"] <= 2e-2, f"{where}: {r}"
        assert f["bf16 decode"]["overflow"] == 0
    # Capacity 72 rows with everything bound for the last rank: ranks with 64 tokens (128 pairs)
    # overflow, ranks with 17 (34 pairs) do not.
    over = [got["fixed"]["bf16 all to the last rank"]["overflow"] for got in ranks]
    assert over[0] == 2 * (128 - 72) and over[1] == 0, over


def test_refused_calls_raise_on_every_rank(results):
    nproc, ranks = results
    for rank, got in enumerate(ranks):
        e = got["errors"]
        assert "exception" not in e, f"rank {rank}: {e.get('exception')}"
        assert e["bad id"].startswith(
            f"ValueError: rank {rank}: topk_ids on ranks [{nproc - 1}] name experts outside"
        )
        assert e["mismatched k"].startswith(
            f"ValueError: rank {rank}: the ranks' layers or inputs disagree on "
        )
        assert "experts per token k" in e["mismatched k"]
        if rank == 0:
            assert e["refused on rank 0"].startswith("ValueError: x has 65 columns")
        else:
            assert (
                e["refused on rank 0"]
                == f"ValueError: rank {rank}: another rank refused its arguments to ExpertParallelMoE.forward"
            )
        assert e["usable after"] and e["router logits"]


def test_a_rank_that_stops_ends_in_a_timeout(tmp_path):
    proc, elapsed = _launch(2, "stall", tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["message"].startswith(
        "CollectiveTimeoutError: rank 0: the shape check (all-reduce) did not finish within 3 s"
    )
    assert got["seconds"] < 20 and elapsed < 90
