"""The backward section of the benchmark on the CPU: FLOP counts, model
selection, the memory guard, the table and the target verdicts (GPU timings faked)."""

from __future__ import annotations

import json

import pytest

from cublas_grouped.tools.bench import backward as bb
from cublas_grouped.tools.bench.cli import parse_args
from cublas_grouped.tools.bench.workloads import MODELS


def test_flop_counts_and_models():
    mixtral = MODELS["mixtral-8x7b"]
    fwd = 2.0 * 4096 * 2 * 4096 * (2 * 14336 + 14336)
    assert bb.forward_flops(4096, mixtral) == fwd
    assert bb.backward_flops(4096, mixtral) == 2 * fwd
    assert bb.backward_flops(4096, mixtral, recompute=True) == 2 * fwd + 2.0 * 4096 * 2 * 4096 * 2 * 14336
    assert list(bb.select_models(None)) == list(MODELS)
    assert list(bb.select_models("qwen, deepseek")) == ["qwen3-30b-a3b", "deepseek-v3"]
    # DeepSeek-V3: 22.5 GB of bf16 weights, as much for their gradients, and the rows.
    assert 45 < bb.needed_gb(4096, MODELS["deepseek-v3"], 2) < 48


def test_table_targets_and_json(monkeypatch, capsys, tmp_path):
    times = {"forward": 10.0, "forward+ctx": 10.5, "backward (recompute)": 30.0}
    monkeypatch.setattr(bb, "free_pool", lambda: None)
    monkeypatch.setattr(
        bb, "_ours", lambda api, m, t, args: {**times, "backward": 20.0 if m.experts == 8 else 25.0}
    )

    def no_torch(m, t, args):
        raise ImportError("No module named 'torch'")

    monkeypatch.setattr(bb, "_torch", no_torch)
    path = tmp_path / "bwd.json"
    args = parse_args(["--backward", "--cases", "mixtral,qwen,deepseek", "--json", str(path)])
    assert args.backward and args.mem_gb == 40.0
    assert bb.run_backward(args) == 0
    out = capsys.readouterr().out
    assert "PASS mixtral-8x7b T=4096: backward 20.000 ms = 2.00x forward 10.000 ms" in out
    assert "MISS qwen3-30b-a3b T=4096: backward 25.000 ms = 2.50x" in out
    assert "needs about 47 GB, more than --mem-gb 40" in out.split("deepseek-v3")[1]
    assert "torch n/a: ImportError: No module named 'torch'" in out
    rows = json.loads(path.read_text())["backward"]
    assert [r["model"] for r in rows] == ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"]
    assert rows[0]["ratio"] == pytest.approx(2.0) and "skipped" in rows[2]
