"""CPU tests of the benchmark and tuner: arguments, cases, routing generators, FLOP and
byte counts, targets and table formatting, and the CUDA-event timer's bookkeeping
(against a fake ``cupy``). Nothing here needs a GPU."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from cublas_grouped.runtime import timing as _timing
from cublas_grouped.tools import bench as bench
from cublas_grouped.tools import tune as tune
from cublas_grouped.tools.bench import Case, Result


# -- arguments and cases -------------------------------------------------------------------------------------
def test_defaults_cover_every_model_token_count_and_routing():
    args = bench.parse_args([])
    assert (args.warmup, args.repeat, args.routings) == (5, 30, ["uniform", "skewed"])
    cases = bench.build_cases(args)
    assert len(cases) == 3 * 4 * 2
    assert {c.model for c in cases} == {"mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"}
    assert sorted({c.tokens for c in cases}) == [16, 64, 4096, 16384]
    # Grouped by model, so one set of weights serves all of a model's cases.
    models = [c.model for c in cases]
    assert models == sorted(models, key=models.index)


@pytest.mark.parametrize(
    "model, experts, top_k, hidden, inter",
    [
        ("mixtral-8x7b", 8, 2, 4096, 14336),
        ("qwen3-30b-a3b", 128, 8, 2048, 768),
        ("deepseek-v3", 256, 8, 7168, 2048),
    ],
)
def test_model_case_shapes(model, experts, top_k, hidden, inter):
    cases = [c for c in bench.build_cases(bench.parse_args([])) if c.model == model]
    assert cases
    for c in cases:
        assert (c.experts, c.top_k, c.hidden, c.inter, c.dtype) == (experts, top_k, hidden, inter, "bfloat16")
        assert c.n1 == 2 * inter
        assert c.pairs == c.tokens * top_k
        assert c.phase == ("decode" if c.tokens in (16, 64) else "prefill")
        assert c.name == f"{model}/T{c.tokens}/{c.routing}"


def test_quick_keeps_4096_prefill_and_decode():
    args = bench.parse_args(["--quick"])
    assert (args.warmup, args.repeat) == (3, 20)
    cases = bench.build_cases(args)
    assert sorted({c.tokens for c in cases}) == [16, 64, 4096]
    assert len(cases) == 3 * 3 * 2


def test_tokens_accept_commas_and_words():
    args = bench.parse_args(["--tokens", "64,16", "4096", "--tokens", "16"])
    assert args.tokens == [16, 64, 4096]
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "a,b"])


def test_routing_selection():
    assert bench.parse_args(["--routing", "uniform"]).routings == ["uniform"]
    assert bench.parse_args(["--skew"]).routings == ["skewed"]
    cases = bench.build_cases(bench.parse_args(["--skew", "--quick"]))
    assert {c.routing for c in cases} == {"skewed"}
    with pytest.raises(SystemExit):
        bench.parse_args(["--skew", "--routing", "uniform"])


def test_cases_filter_by_substring():
    cases = bench.build_cases(bench.parse_args(["--cases", "qwen,mixtral", "--tokens", "16"]))
    assert {c.model for c in cases} == {"qwen3-30b-a3b", "mixtral-8x7b"}
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "llama"])


def test_custom_case_from_flags():
    args = bench.parse_args(
        [
            "--experts",
            "64",
            "--topk",
            "4",
            "--hidden",
            "1024",
            "--inter",
            "512",
            "--tokens",
            "128",
            "--dtype",
            "float16",
            "--skew",
        ]
    )
    (case,) = bench.build_cases(args)
    assert (case.experts, case.top_k, case.hidden, case.inter, case.tokens) == (64, 4, 1024, 512, 128)
    assert (case.dtype, case.routing, case.itemsize) == ("float16", "skewed", 2)
    assert case.model == "custom-e64k4h1024i512"


@pytest.mark.parametrize(
    "argv",
    [
        ["--experts", "64", "--topk", "4", "--hidden", "1024"],  # no --inter
        ["--experts", "4", "--topk", "8", "--hidden", "64", "--inter", "64"],  # k > E
        ["--hidden", "1024"],  # custom flags without --experts
        ["--experts", "0", "--topk", "1", "--hidden", "8", "--inter", "8"],
        ["--hbm-gbs", "-1"],
        ["--warmup", "-1"],
    ],
)
def test_bad_arguments_exit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


# -- routing generators ------------------------------------------------------------------------------------
def _assert_distinct_rows(ids: np.ndarray, num_experts: int, top_k: int, tokens: int) -> None:
    assert ids.shape == (tokens, top_k) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < num_experts
    assert all(len(set(row)) == top_k for row in ids.tolist())


@pytest.mark.parametrize("experts, top_k, min_ratio", [(8, 2, 2.0), (128, 8, 4.0), (256, 8, 4.0)])
def test_skewed_routing_has_a_hot_expert(experts, top_k, min_ratio):
    tokens = 4096
    ids = bench.skewed_routing(tokens, experts, top_k, np.random.default_rng(1), sigma=1.0)
    _assert_distinct_rows(ids, experts, top_k, tokens)
    counts = bench.expert_counts(ids, experts)
    assert counts.sum() == tokens * top_k
    mean = tokens * top_k / experts
    assert counts.max() >= min_ratio * mean, (counts.max(), mean)
    # A hot expert is also one most tokens could not pick: some experts stay far below the mean.
    assert counts.min() < 0.5 * mean


def test_uniform_routing_is_balanced():
    tokens, experts, top_k = 4096, 128, 8
    ids = bench.uniform_routing(tokens, experts, top_k, np.random.default_rng(2))
    _assert_distinct_rows(ids, experts, top_k, tokens)
    counts = bench.expert_counts(ids, experts)
    assert counts.max() < 1.5 * tokens * top_k / experts
    assert counts.min() > 0


def test_top_k_equal_to_experts_picks_all():
    ids = bench.skewed_routing(5, 8, 8, np.random.default_rng(0))
    assert all(sorted(row) == list(range(8)) for row in ids.tolist())
    with pytest.raises(ValueError):
        bench.uniform_routing(5, 4, 5, np.random.default_rng(0))


def test_popularity_is_lognormal_with_fixed_spread():
    p1 = bench.expert_popularity(8, 1.0, np.random.default_rng(0))
    p2 = bench.expert_popularity(8, 1.0, np.random.default_rng(99))
    assert p1.sum() == pytest.approx(1.0) and (p1 > 0).all()
    np.testing.assert_allclose(np.sort(p1), np.sort(p2))  # only the assignment to experts varies
    # log-popularity has the lognormal's sigma (stratified quantiles come close to 1).
    assert np.log(p1).std() == pytest.approx(0.85, abs=0.1)
    # Hand check: the busiest of 8 sits at the 15/16 quantile, exp(1.534) / mean of all.
    z = np.array([-1.534, -0.887, -0.489, -0.157, 0.157, 0.489, 0.887, 1.534])
    assert p1.max() / p1.mean() == pytest.approx(np.exp(1.534) / np.exp(z).mean(), rel=1e-3)


def test_routing_weights_and_reproducibility():
    w = bench.routing_weights(100, 4, np.random.default_rng(0))
    assert w.dtype == np.float32 and (w > 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    case = Case("qwen3-30b-a3b", 64, 128, 8, 2048, 768, "skewed")
    w1, ids1 = bench.make_routing(case, seed=3)
    w2, ids2 = bench.make_routing(case, seed=3)
    np.testing.assert_array_equal(ids1, ids2)
    np.testing.assert_array_equal(w1, w2)
    _, ids3 = bench.make_routing(case, seed=4)
    assert not np.array_equal(ids1, ids3)


# -- FLOPs and bytes ---------------------------------------------------------------------------------------
def test_flops_by_hand():
    mixtral = Case("mixtral-8x7b", 4096, 8, 2, 4096, 14336)
    # 2 * (4096 * 2) * 4096 * (2 * 14336)
    assert bench.gemm1_flops(mixtral) == 1_924_145_348_608
    # plus 2 * 8192 * 14336 * 4096 for the down projection
    assert bench.layer_flops(mixtral) == 1_924_145_348_608 + 962_072_674_304
    ungated = Case("x", 10, 4, 2, 8, 16, gated=False)
    assert bench.gemm1_flops(ungated) == 2 * 20 * 8 * 16
    assert bench.layer_flops(ungated) == 2 * 20 * 8 * 16 * 2


def test_bytes_and_rates_by_hand():
    qwen = Case("qwen3-30b-a3b", 16, 128, 8, 2048, 768)
    # 100 active experts, bf16: w1 slices [2048, 1536]; w2 slices [768, 2048]
    assert bench.gemm1_weight_bytes(qwen, 100) == 629_145_600
    assert bench.layer_weight_bytes(qwen, 100) == 943_718_400
    fp32 = Case("x", 16, 4, 1, 8, 8, dtype="float32")
    assert bench.gemm1_weight_bytes(fp32, 2) == 2 * 8 * 16 * 4
    assert bench.tflops(1e12, 1.0) == pytest.approx(1000.0)
    assert bench.tflops(1.924e12, 4.0) == pytest.approx(481.0)
    assert bench.gbs(3.35e9, 1.0) == pytest.approx(3350.0)
    assert bench.gbs(629_145_600, 0.25) == pytest.approx(2516.5824)


def test_layout_rows():
    counts = np.array([100, 0, 37, 3], dtype=np.int64)
    assert bench.layout_rows("cublas_grouped", counts) == 140
    assert bench.layout_rows("sequential", counts) == 140
    assert bench.layout_rows("padded_strided", counts) == 4 * 104  # capacity rounds 100 up to 8s
    chunked = bench.layout_rows("chunked_batched", counts)
    assert chunked >= 140 and chunked % 32 == 0


def test_overhead_formula():
    stages = {"plan": 0.1, "gather": 0.2, "gemm1": 2.0, "activation": 0.3, "gemm2": 1.0, "combine": 0.4}
    assert bench.overhead_pct(stages, route_ms=0.5) == pytest.approx(100 * 1.5 / 3.0)
    assert bench.overhead_pct({"plan": 1.0}, 0.1) is None


# -- results: table, targets, JSON -------------------------------------------------------------------------
def _r(case, section, method, ms=None, **kw):
    tokens = int(case.split("/T")[1].split("/")[0])
    phase = "decode" if tokens <= 128 else "prefill"
    return Result(case, case.split("/")[0], tokens, case.split("/")[-1], phase, section, method, ms=ms, **kw)


def _sample_results():
    pre, dec = "qwen3-30b-a3b/T4096/uniform", "qwen3-30b-a3b/T16/skewed"
    return [
        _r(pre, "gemm1", "cublas_grouped", 1.00, tflops=400.0),
        _r(pre, "gemm1", "sequential", 2.00, tflops=200.0),
        _r(pre, "gemm1", "chunked_batched", 0.80, tflops=500.0),
        _r(
            pre, "gemm1", "padded_strided", error="skipped: needs ~50.0 GB with the weights, over --mem-gb 40"
        ),
        _r(pre, "gemm1", "auto", 0.83, tflops=482.0, algorithm="chunked_batched"),
        _r(pre, "gemm1", "torch", 0.90, tflops=444.0),
        _r(pre, "gemm1", "dense", 0.40, tflops=1000.0, note="cupy.matmul"),
        _r(pre, "layer", "cublas_grouped", 3.0),
        _r(pre, "layer", "auto", 3.3, algorithm="chunked_batched"),
        _r(
            pre,
            "split",
            "auto",
            3.0,
            extra={
                "stages_ms": {
                    "plan": 0.05,
                    "gather": 0.1,
                    "gemm1": 1.0,
                    "activation": 0.1,
                    "gemm2": 0.6,
                    "combine": 0.1,
                },
                "route_ms": 0.05,
                "overhead_pct": 23.5,
                "gemm_ms": 1.6,
                "non_gemm_ms": 0.4,
            },
        ),
        _r(dec, "gemm1", "cublas_grouped", 0.30, gbs=2100.0, pct_hbm=62.7),
        _r(dec, "gemm1", "auto", error="RuntimeError: " + "x" * 200),
        _r(dec, "graph", "static-graph", 0.40, gbs=2900.0, pct_hbm=86.6),
    ]


def test_table_rows_and_columns():
    text = bench.format_table(_sample_results())
    lines = text.splitlines()
    assert lines[0].split() == [
        "case",
        "tokens",
        "routing",
        "method",
        "ms",
        "TFLOP/s",
        "GB/s",
        "%HBM",
        "note",
    ]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + 12  # the split row has its own section
    auto = next(line for line in lines if "gemm1:auto->chunked_batched" in line)
    assert "0.830" in auto and "482.0" in auto
    decode = next(
        line for line in lines if "gemm1:cublas_grouped" in line and "T16" not in line and " 16 " in line
    )
    assert "2100" in decode and "62.7" in decode
    err = next(line for line in lines if "/T16" not in line and "error: RuntimeError" in line)
    assert err.rstrip().endswith("...") and len(err) < 200
    skipped = next(line for line in lines if "padded_strided" in line)
    assert "skipped: needs" in skipped and "error:" not in skipped
    # Columns are aligned: every row puts the method column at the same offset.
    offset = lines[0].index("method")
    assert all(line[offset:].startswith(("gemm1:", "layer:", "graph:")) for line in lines[2:])


def test_split_section():
    text = bench.format_split(_sample_results())
    assert text.startswith("Layer stage split")
    assert "23.5" in text and "0.600" in text


def test_targets_pass_and_miss():
    lines = bench.evaluate_targets(_sample_results(), hbm_gbs=3350)
    text = "\n".join(lines)
    # gemm1: auto 0.83 vs best 0.80 (chunked) is +3.75%: within 5%.
    assert "AUTO within 5% of the best single algorithm (gemm1): 1/2 PASS" in text
    assert (
        "PASS qwen3-30b-a3b/T4096/uniform: auto 0.830 ms (chunked_batched) vs best 0.800 ms "
        "(chunked_batched), +3.7%" in text
    )
    assert "MISS qwen3-30b-a3b/T16/skewed: AUTO has no time (RuntimeError: xxx" in text
    # layer: 3.3 vs 3.0 is +10%.
    assert "(layer): 0/1 PASS" in text and "+10.0%" in text
    assert "PASS qwen3-30b-a3b/T4096/uniform: auto 482.0 TFLOP/s vs torch 444.0 TFLOP/s" in text
    assert "PASS qwen3-30b-a3b/T16/skewed (layer graph, w1+w2 bytes): 2900 GB/s = 86.6% of 3350" in text
    assert "MISS qwen3-30b-a3b/T16/skewed (gemm1 auto, w1 bytes): RuntimeError" in text
    assert "MISS qwen3-30b-a3b/T4096/uniform: overhead 23.5%" in text


def test_targets_skip_torch_when_missing():
    results = [r for r in _sample_results() if r.method != "torch"]
    text = "\n".join(bench.evaluate_targets(results))
    assert "AUTO >= torch._grouped_mm on prefill (gemm1): 0/0 PASS" in text
    assert "SKIP qwen3-30b-a3b/T4096/uniform: torch n/a (not run)" in text


def test_json_keeps_every_number(tmp_path):
    args = bench.parse_args(["--quick"])
    path = tmp_path / "sub" / "bench.json"
    results = _sample_results()
    results[0].samples = [1.0, 0.9, 1.1]
    bench.write_json(str(path), {"gpu": "fake"}, args, [{"name": "c"}], results, ["t"])
    doc = json.loads(path.read_text())
    assert doc["environment"] == {"gpu": "fake"}
    assert doc["settings"]["quick"] is True and doc["targets"] == ["t"]
    assert len(doc["results"]) == len(results)
    assert doc["results"][0]["samples"] == [1.0, 0.9, 1.1]
    assert doc["results"][3]["error"].startswith("skipped")


def test_plot_writes_or_explains(tmp_path):
    message = bench.plot(str(tmp_path / "b.png"), _sample_results())
    if message is None:
        assert (tmp_path / "b.png").stat().st_size > 0
    else:
        assert "matplotlib" in message


def test_main_without_gpu_exits_cleanly(monkeypatch, capsys):
    monkeypatch.setattr(bench, "no_gpu_reason", lambda: "no CUDA device found")
    assert bench.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "cannot run: no CUDA device found" in err and "Traceback" not in err
    monkeypatch.setattr(tune, "no_gpu_reason", lambda: "no CUDA device found")
    assert tune.main(["--quick"]) == 2
    assert "Tuning needs an NVIDIA GPU" in capsys.readouterr().err


# -- timing helper -------------------------------------------------------------------------------------------
def test_summarize_and_rotation_count():
    s = _timing.summarize([float(v) for v in range(1, 11)])
    assert s["median"] == 5.5 and s["p10"] == pytest.approx(1.9) and s["p90"] == pytest.approx(9.1)
    assert len(s["samples"]) == 10
    with pytest.raises(ValueError):
        _timing.summarize([])
    assert _timing.rotation_count(10_000_000) == 10  # 2 x 50 MB / 10 MB
    assert _timing.rotation_count(1_000_000) == 16  # capped by max_sets
    assert _timing.rotation_count(300_000_000) == 1
    assert _timing.rotation_count(1_000_000, budget_bytes=4_000_000) == 4
    assert _timing.rotation_count(1_000_000, budget_bytes=10) == 1
    assert _timing.rotation_count(0) == 1


class _FakeClock:
    """A stand-in for ``cupy.cuda``: events read a clock that the timed function advances."""

    def __init__(self):
        self.now = 0.0
        clock = self

        class Event:
            def __init__(self):
                self.t = None

            def record(self, stream=None):
                self.t = clock.now

            def synchronize(self):
                pass

        class Stream:
            def synchronize(self):
                pass

        self.module = types.SimpleNamespace(
            cuda=types.SimpleNamespace(
                Event=Event,
                get_current_stream=lambda: Stream(),
                get_elapsed_time=lambda a, b: b.t - a.t,
            )
        )


def test_time_ms_rotates_warms_up_and_times_each_call(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    calls = []

    def fn(i):
        calls.append(i)
        fake.now += 1.0 + i  # set i takes 1 + i ms

    out = _timing.time_ms(fn, warmup=2, repeat=6, rotate=3)
    assert calls == [0, 1, 2, 0, 1, 2, 0, 1]  # 2 warm-up, then 6 timed, rotating
    assert out["samples"] == [3.0, 1.0, 2.0, 3.0, 1.0, 2.0]
    assert out["median"] == 2.0 and out["p10"] == 1.0 and out["p90"] == 3.0


def test_time_ms_budget_never_drops_below_min_repeat(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    calls = []

    def slow(i):
        calls.append(i)
        fake.now += 100.0

    out = _timing.time_ms(slow, warmup=1, repeat=30, min_repeat=20, budget_ms=500.0)
    assert len(out["samples"]) == 20 and len(calls) == 1 + 1 + 20  # warm-up, probe, timed
    assert out["median"] == 100.0
    out = _timing.time_ms(slow, warmup=0, repeat=30)  # no budget: all repeats
    assert len(out["samples"]) == 30


# -- tuner -----------------------------------------------------------------------------------------------
def test_tune_grid():
    grid = tune.build_grid(quick=True)
    labels = {(s.label, s.dtype) for s in grid}
    assert ("deepseek-v3 gemm1 T=4096 uniform", "bfloat16") in labels
    assert ("deepseek-v3 gemm1 T=4096 skewed", "bfloat16") in labels
    assert ("qwen3-30b-a3b gemm2 T=16 uniform", "float16") in labels
    ds1 = next(s for s in grid if s.label == "deepseek-v3 gemm1 T=16 uniform")
    ds2 = next(s for s in grid if s.label == "deepseek-v3 gemm2 T=16 skewed")
    assert (ds1.routing, ds2.routing) == ("uniform", "skewed")
    assert (ds1.n, ds1.k, ds1.experts, ds1.top_k) == (4096, 7168, 256, 8)
    assert (ds2.n, ds2.k) == (7168, 2048)
    synth = [s for s in grid if s.label.startswith("E=")]
    assert {s.experts for s in synth} == {8, 32, 64, 128, 256}
    for s in synth:  # tokens chosen so rows per expert average the labelled value
        rows = int(s.label.split("rows=")[1].split()[0])
        assert s.tokens * s.top_k / s.experts == pytest.approx(rows, rel=0.01)
    # Shapes sharing weights are adjacent: each weight tensor is made once.
    keys = [s.weight_key for s in grid]
    assert len({k for k in keys}) == sum(1 for a, b in zip([None] + keys, keys) if a != b)
    assert len(tune.build_grid(quick=False)) > len(grid)
    assert {s.dtype for s in tune.build_grid(True, ["float16"])} == {"float16"}


def test_tune_arguments():
    args = tune.parse_args(["--quick", "--out", "t.json", "--dtypes", "bfloat16"])
    assert (args.warmup, args.repeat, args.max_minutes, args.dtypes) == (2, 10, 10.0, ["bfloat16"])
    assert tune.parse_args([]).repeat == 20
    with pytest.raises(SystemExit):
        tune.parse_args(["--dtypes", "int8"])


def test_tune_summary():
    def entry(dtype, times):
        return {
            "dtype": dtype,
            "num_experts": 8,
            "active_experts": 8,
            "mean_rows": 512.0,
            "max_rows": 600,
            "n": 1024,
            "k": 1024,
            "times_ms": times,
        }

    entries = [
        entry("bfloat16", {"cublas_grouped": 1.0, "sequential": 2.0, "chunked_batched": None}),
        entry("bfloat16", {"cublas_grouped": 3.0, "sequential": 1.5, "chunked_batched": 1.0}),
        entry("float16", {"cublas_grouped": None, "sequential": None}),
    ]
    lines = tune.summarize_entries(entries, rule_choice=lambda e: "sequential")
    assert lines[0] == "bfloat16: 2 shapes measured; fastest: cublas_grouped 1, chunked_batched 1"
    # sequential: 2.0 vs 1.0 (+100%) and 1.5 vs 1.0 (+50%)
    assert "picked the fastest in 0/2" in lines[1] and "75.0% slower on average, 100.0% at worst" in lines[1]
    assert lines[2] == "float16: 0 shapes measured; fastest: none"


def test_random_normal_rounds_to_bfloat16_on_the_device_side(monkeypatch):
    import ml_dtypes

    class Rng:
        def __init__(self, seed):
            self.rng = np.random.default_rng(seed)

        def standard_normal(self, size, dtype):
            return self.rng.standard_normal(size).astype(dtype)

    # NumPy stands in for CuPy: the same array calls, run on the host.
    fake = types.SimpleNamespace(
        empty=np.empty,
        uint16=np.uint16,
        uint32=np.uint32,
        float32=np.float32,
        random=types.SimpleNamespace(default_rng=Rng),
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    w = bench.random_normal((3, 64, 32), "bfloat16", 0.125, seed=7)
    assert w.shape == (3, 64, 32) and w.dtype == np.dtype(ml_dtypes.bfloat16)
    expected = (Rng(7).standard_normal((3, 64 * 32), np.float32) * np.float32(0.125)).astype(
        ml_dtypes.bfloat16
    )
    np.testing.assert_array_equal(w.reshape(3, -1), expected)  # round to nearest even, like a cast
    assert 0.1 < float(w.astype(np.float32).std()) < 0.15
    h = bench.random_normal((5, 8), "float16", 1.0, seed=1)
    assert h.dtype == np.float16 and h.shape == (5, 8) and np.abs(h).max() > 0


def test_merge_passes_pools_samples_and_rescales_rates():
    from cublas_grouped.tools.bench import Result, merge_passes

    def res(method, samples, **kw):
        ms = float(np.median(samples))
        return Result(
            "c",
            "m",
            16,
            "uniform",
            "decode",
            "gemm1",
            method,
            ms=ms,
            tflops=100.0 / ms,
            gbs=1000.0 / ms,
            samples=list(samples),
            **kw,
        )

    first = res("auto", [1.0, 1.0, 1.0])
    second = res("auto", [3.0, 3.0, 3.0, 3.0])
    failed = Result("c", "m", 16, "uniform", "decode", "gemm1", "dense", error="boom")
    ok = res("dense", [2.0, 2.0])
    graph = Result(
        "c",
        "m",
        16,
        "uniform",
        "decode",
        "graph",
        "static-graph",
        ms=2.0,
        samples=[2.0],
        extra={"floor_ms": 1.0, "floor_ratio": 0.5},
    )
    graph2 = Result(
        "c",
        "m",
        16,
        "uniform",
        "decode",
        "graph",
        "static-graph",
        ms=1.0,
        samples=[1.0, 1.0],
        extra={"floor_ms": 1.0},
    )
    merged = merge_passes([first, failed, graph, second, ok, graph2])
    by = {(r.section, r.method): r for r in merged}
    auto = by[("gemm1", "auto")]
    assert auto.ms == 3.0 and len(auto.samples) == 7  # median of 1,1,1,3,3,3,3
    assert auto.tflops == pytest.approx(100.0 / 3.0) and auto.gbs == pytest.approx(1000.0 / 3.0)
    assert by[("gemm1", "dense")].error is None and by[("gemm1", "dense")].ms == 2.0
    g = by[("graph", "static-graph")]
    assert g.ms == 1.0 and g.extra["floor_ratio"] == 1.0 and g.note == "floor 1.000 ms = 100% of it"
    assert len(merged) == 3


def test_tune_quick_grid_covers_the_benchmark_and_orders_dtypes():
    grid = tune.build_grid(quick=True)
    bench_tokens = {c.tokens for c in bench.build_cases(bench.parse_args([]))}
    for model in bench.MODELS:
        assert bench_tokens <= {s.tokens for s in grid if s.label.startswith(model)}
    # bfloat16 first: a run cut short by --max-minutes loses float16 shapes, not a model.
    dtypes = [s.dtype for s in grid]
    assert dtypes == sorted(dtypes, key=["bfloat16", "float16"].index)
    assert [s.dtype for s in tune.build_grid(True, ["float16", "bfloat16"])][0] == "float16"


def test_tune_output_path_and_table_record_the_gpu(tmp_path, monkeypatch):
    from cublas_grouped import DeviceInfo

    monkeypatch.setenv("CUBLAS_GROUPED_TUNING_DIR", str(tmp_path / "user"))
    h200 = DeviceInfo(sm=(9, 0), cublas_version=130200, name="NVIDIA H200")
    canonical = "nvidia-h200-cublas130200.json"
    assert tune.output_path(None, h200) == tmp_path / "user" / canonical
    assert tune.output_path("cublas_grouped/tuning/", h200).as_posix() == f"cublas_grouped/tuning/{canonical}"
    assert tune.output_path(str(tmp_path), h200) == tmp_path / canonical  # an existing folder
    assert tune.output_path(str(tmp_path / "t.json"), h200) == tmp_path / "t.json"
    table = tune.make_table(h200, [])
    assert (table.gpu, table.cublas_version, table.sm) == ("NVIDIA H200", 130200, (9, 0))
    table.save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["sm"] == [9, 0]


# -- HBM bandwidth and what AUTO uses ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", (3350.0, "H100 SXM")),
        ("NVIDIA H100 NVL", (3900.0, "H100 NVL")),
        ("NVIDIA H100 PCIe", (2000.0, "H100 PCIe")),
        ("NVIDIA H200", (4800.0, "H200")),
        ("NVIDIA H200 NVL", (4800.0, "H200")),
        ("NVIDIA GH200 480GB", None),  # HBM3 or HBM3e by memory size: measured instead
        ("NVIDIA A100-SXM4-80GB", None),
        ("", None),
    ],
)
def test_hbm_datasheet_by_name(name, expected):
    assert bench.datasheet_hbm_gbs(name) == expected


def test_copy_bandwidth_counts_bytes_read_and_written():
    # 1 GiB read and 1 GiB written in 0.5 ms.
    assert bench.copy_gbs(1 << 30, 0.5) == pytest.approx(2 * 2**30 / 0.5e-3 / 1e9)


def test_hbm_source_precedence():
    assert bench.resolve_hbm(4000.0, "NVIDIA H200", 4100.0) == (4000.0, "--hbm-gbs")
    gbs, source = bench.resolve_hbm(None, "NVIDIA H200", 4100.0)
    assert gbs == 4800.0 and source == "datasheet figure of the H200, known by the GPU name"
    gbs, source = bench.resolve_hbm(None, "NVIDIA B200", 6900.0)
    assert gbs == 6900.0 and source.startswith("measured: device-to-device copy of 1 GiB, median of 5")
    gbs, source = bench.resolve_hbm(None, "NVIDIA B200", None)
    assert gbs == bench.FALLBACK_HBM_GBS and source.startswith("assumed (H100 SXM)")
    assert bench.parse_args([]).hbm_gbs is None and bench.parse_args(["--hbm-gbs", "4800"]).hbm_gbs == 4800.0


def test_hbm_lines():
    lines = bench.hbm_lines(4800.0, "datasheet", 4100.0)
    assert lines == [
        "HBM bandwidth for %HBM and the decode floor: 4800 GB/s (datasheet)",
        "measured device-to-device copy: 4100 GB/s = 85% of 4800",
    ]
    assert bench.hbm_lines(3350.0, "--hbm-gbs", None, "OutOfMemoryError")[1] == (
        "device-to-device copy not measured: OutOfMemoryError"
    )


def test_copy_is_measured_with_events_device_to_device(monkeypatch):
    fake = _FakeClock()
    copies = []

    class Array:
        def __init__(self, ptr):
            self.data = types.SimpleNamespace(ptr=ptr)

        def fill(self, value):
            pass

    ptrs = iter([0x1000, 0x2000])

    def memcpy(dst, src, nbytes, kind, stream):
        copies.append((dst, src, nbytes, kind, stream))
        fake.now += 0.5

    pool = types.SimpleNamespace(free_all_blocks=lambda: None)
    stream = types.SimpleNamespace(ptr=7, synchronize=lambda: None)
    fake.module.cuda.get_current_stream = lambda: stream
    fake.module.cuda.runtime = types.SimpleNamespace(memcpyAsync=memcpy, memcpyDeviceToDevice=3)
    fake.module.uint8 = np.uint8
    fake.module.empty = lambda n, dtype: Array(next(ptrs))
    fake.module.get_default_memory_pool = lambda: pool
    fake.module.get_default_pinned_memory_pool = lambda: pool
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    gbs = bench.measure_copy_gbs()
    assert copies[0] == (0x2000, 0x1000, 1 << 30, 3, 7)  # dst, src: one GiB device to device, on the stream
    assert len(copies) == 1 + bench.COPY_REPEAT  # one untimed, then the timed ones
    assert gbs == pytest.approx(bench.copy_gbs(1 << 30, 0.5))


def test_main_prints_bandwidth_and_tuning_table(monkeypatch, capsys):
    monkeypatch.setattr(bench, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(bench, "_load_api", lambda: object())
    monkeypatch.setattr(bench, "environment", lambda argv: {"gpu": "NVIDIA H200", "cublas_version": 130100})
    monkeypatch.setattr(bench, "measure_copy_gbs", lambda: 4150.0)
    monkeypatch.setattr(bench, "run_all", lambda cases, args, api: ([], []))
    monkeypatch.setattr(
        bench, "_auto_lines", lambda: ["AUTO tuning table: shipped table x.json: same architecture"]
    )
    assert bench.main(["--quick", "--no-torch"]) == 0
    captured = capsys.readouterr()
    for text in (captured.err, captured.out):
        assert "HBM bandwidth for %HBM and the decode floor: 4800 GB/s (datasheet figure of the H200" in text
        assert "measured device-to-device copy: 4150 GB/s = 86% of 4800" in text
        assert "AUTO tuning table: shipped table x.json: same architecture" in text
    monkeypatch.setattr(bench, "measure_copy_gbs", lambda: (_ for _ in ()).throw(MemoryError("no room")))
    assert bench.main(["--quick", "--hbm-gbs", "3000"]) == 0
    out = capsys.readouterr().out
    assert "3000 GB/s (--hbm-gbs)" in out and "copy not measured: MemoryError: no room" in out


def test_auto_lines_say_why_when_the_library_cannot_tell(monkeypatch):
    import cublas_grouped as cg

    def no_device():
        raise RuntimeError("no CUDA device")

    monkeypatch.setattr(cg, "device_info", no_device)
    assert bench._auto_lines() == ["AUTO tuning table: unknown (RuntimeError: no CUDA device)"]
