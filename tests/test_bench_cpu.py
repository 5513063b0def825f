"""CPU tests of the benchmark and tuner: arguments, cases, routing generators, FLOP and
byte counts, targets and table formatting, the CUDA-event timers' bookkeeping and the
round-robin order (against a fake ``cupy``), and how a section sets up, skips and
records its methods. Nothing here needs a GPU."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from cublas_grouped.runtime import timing as _timing
from cublas_grouped.runtime import timing as bench_timing
from cublas_grouped.tools import tune as tune
from cublas_grouped.tools.bench import Case, Result, cli, gpu, report, workloads
from cublas_grouped.tools.bench import section as bench_section


# -- arguments and cases -------------------------------------------------------------------------------------
def test_defaults_cover_every_model_token_count_and_routing():
    args = cli.parse_args([])
    assert (args.warmup, args.repeat, args.routings) == (5, 100, ["uniform", "skewed"])
    cases = workloads.build_cases(args)
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
    cases = [c for c in workloads.build_cases(cli.parse_args([])) if c.model == model]
    assert cases
    for c in cases:
        assert (c.experts, c.top_k, c.hidden, c.inter, c.dtype) == (experts, top_k, hidden, inter, "bfloat16")
        assert c.n1 == 2 * inter
        assert c.pairs == c.tokens * top_k
        assert c.phase == ("decode" if c.tokens in (16, 64) else "prefill")
        assert c.name == f"{model}/T{c.tokens}/{c.routing}"


def test_quick_keeps_4096_prefill_and_decode():
    args = cli.parse_args(["--quick"])
    assert (args.warmup, args.repeat) == (3, 20)
    cases = workloads.build_cases(args)
    assert sorted({c.tokens for c in cases}) == [16, 64, 4096]
    assert len(cases) == 3 * 3 * 2


def test_tokens_accept_commas_and_words():
    args = cli.parse_args(["--tokens", "64,16", "4096", "--tokens", "16"])
    assert args.tokens == [16, 64, 4096]
    with pytest.raises(SystemExit):
        cli.parse_args(["--tokens", "0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--tokens", "a,b"])


def test_routing_selection():
    assert cli.parse_args(["--routing", "uniform"]).routings == ["uniform"]
    assert cli.parse_args(["--skew"]).routings == ["skewed"]
    cases = workloads.build_cases(cli.parse_args(["--skew", "--quick"]))
    assert {c.routing for c in cases} == {"skewed"}
    with pytest.raises(SystemExit):
        cli.parse_args(["--skew", "--routing", "uniform"])


def test_cases_filter_by_substring():
    cases = workloads.build_cases(cli.parse_args(["--cases", "qwen,mixtral", "--tokens", "16"]))
    assert {c.model for c in cases} == {"qwen3-30b-a3b", "mixtral-8x7b"}
    with pytest.raises(SystemExit):
        cli.parse_args(["--cases", "llama"])


def test_custom_case_from_flags():
    args = cli.parse_args(
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
    (case,) = workloads.build_cases(args)
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
        cli.parse_args(argv)
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
    ids = workloads.skewed_routing(tokens, experts, top_k, np.random.default_rng(1), sigma=1.0)
    _assert_distinct_rows(ids, experts, top_k, tokens)
    counts = workloads.expert_counts(ids, experts)
    assert counts.sum() == tokens * top_k
    mean = tokens * top_k / experts
    assert counts.max() >= min_ratio * mean, (counts.max(), mean)
    # A hot expert is also one most tokens could not pick: some experts stay far below the mean.
    assert counts.min() < 0.5 * mean


def test_uniform_routing_is_balanced():
    tokens, experts, top_k = 4096, 128, 8
    ids = workloads.uniform_routing(tokens, experts, top_k, np.random.default_rng(2))
    _assert_distinct_rows(ids, experts, top_k, tokens)
    counts = workloads.expert_counts(ids, experts)
    assert counts.max() < 1.5 * tokens * top_k / experts
    assert counts.min() > 0


def test_top_k_equal_to_experts_picks_all():
    ids = workloads.skewed_routing(5, 8, 8, np.random.default_rng(0))
    assert all(sorted(row) == list(range(8)) for row in ids.tolist())
    with pytest.raises(ValueError):
        workloads.uniform_routing(5, 4, 5, np.random.default_rng(0))


def test_popularity_is_lognormal_with_fixed_spread():
    p1 = workloads.expert_popularity(8, 1.0, np.random.default_rng(0))
    p2 = workloads.expert_popularity(8, 1.0, np.random.default_rng(99))
    assert p1.sum() == pytest.approx(1.0) and (p1 > 0).all()
    np.testing.assert_allclose(np.sort(p1), np.sort(p2))  # only the assignment to experts varies
    # log-popularity has the lognormal's sigma (stratified quantiles come close to 1).
    assert np.log(p1).std() == pytest.approx(0.85, abs=0.1)
    # Hand check: the busiest of 8 sits at the 15/16 quantile, exp(1.534) / mean of all.
    z = np.array([-1.534, -0.887, -0.489, -0.157, 0.157, 0.489, 0.887, 1.534])
    assert p1.max() / p1.mean() == pytest.approx(np.exp(1.534) / np.exp(z).mean(), rel=1e-3)


def test_routing_weights_and_reproducibility():
    w = workloads.routing_weights(100, 4, np.random.default_rng(0))
    assert w.dtype == np.float32 and (w > 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    case = Case("qwen3-30b-a3b", 64, 128, 8, 2048, 768, "skewed")
    w1, ids1 = workloads.make_routing(case, seed=3)
    w2, ids2 = workloads.make_routing(case, seed=3)
    np.testing.assert_array_equal(ids1, ids2)
    np.testing.assert_array_equal(w1, w2)
    _, ids3 = workloads.make_routing(case, seed=4)
    assert not np.array_equal(ids1, ids3)


# -- FLOPs and bytes ---------------------------------------------------------------------------------------
def test_flops_by_hand():
    mixtral = Case("mixtral-8x7b", 4096, 8, 2, 4096, 14336)
    # 2 * (4096 * 2) * 4096 * (2 * 14336)
    assert workloads.gemm1_flops(mixtral) == 1_924_145_348_608
    # plus 2 * 8192 * 14336 * 4096 for the down projection
    assert workloads.layer_flops(mixtral) == 1_924_145_348_608 + 962_072_674_304
    ungated = Case("x", 10, 4, 2, 8, 16, gated=False)
    assert workloads.gemm1_flops(ungated) == 2 * 20 * 8 * 16
    assert workloads.layer_flops(ungated) == 2 * 20 * 8 * 16 * 2


def test_bytes_and_rates_by_hand():
    qwen = Case("qwen3-30b-a3b", 16, 128, 8, 2048, 768)
    # 100 active experts, bf16: w1 slices [2048, 1536]; w2 slices [768, 2048]
    assert workloads.gemm1_weight_bytes(qwen, 100) == 629_145_600
    assert workloads.layer_weight_bytes(qwen, 100) == 943_718_400
    fp32 = Case("x", 16, 4, 1, 8, 8, dtype="float32")
    assert workloads.gemm1_weight_bytes(fp32, 2) == 2 * 8 * 16 * 4
    assert workloads.tflops(1e12, 1.0) == pytest.approx(1000.0)
    assert workloads.tflops(1.924e12, 4.0) == pytest.approx(481.0)
    assert workloads.gbs(3.35e9, 1.0) == pytest.approx(3350.0)
    assert workloads.gbs(629_145_600, 0.25) == pytest.approx(2516.5824)


def test_layout_rows():
    counts = np.array([100, 0, 37, 3], dtype=np.int64)
    assert workloads.layout_rows("cublas_grouped", counts) == 140
    assert workloads.layout_rows("sequential", counts) == 140
    assert workloads.layout_rows("padded_strided", counts) == 4 * 104  # capacity rounds 100 up to 8s
    chunked = workloads.layout_rows("chunked_batched", counts)
    assert chunked >= 140 and chunked % 32 == 0


def test_overhead_formula():
    stages = {"plan": 0.1, "gather": 0.2, "gemm1": 2.0, "activation": 0.3, "gemm2": 1.0, "combine": 0.4}
    assert report.overhead_pct(stages, route_ms=0.5) == pytest.approx(100 * 1.5 / 3.0)
    assert report.overhead_pct({"plan": 1.0}, 0.1) is None


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
        _r(dec, "graph", "fixed-capacity", 0.40, gbs=2900.0, pct_hbm=86.6),
    ]


def test_table_rows_and_columns():
    text = report.format_table(_sample_results())
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
    text = report.format_split(_sample_results())
    assert text.startswith("Layer stage split")
    assert "23.5" in text and "0.600" in text


def test_targets_pass_and_miss():
    lines = report.evaluate_targets(_sample_results(), hbm_gbs=3350)
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
    text = "\n".join(report.evaluate_targets(results))
    assert "AUTO >= torch._grouped_mm on prefill (gemm1): 0/0 PASS" in text
    assert "SKIP qwen3-30b-a3b/T4096/uniform: torch n/a (not run)" in text


def test_json_keeps_every_number(tmp_path):
    args = cli.parse_args(["--quick"])
    path = tmp_path / "sub" / "bench.json"
    results = _sample_results()
    results[0].samples = [1.0, 0.9, 1.1]
    report.write_json(str(path), {"gpu": "fake"}, args, [{"name": "c"}], results, ["t"])
    doc = json.loads(path.read_text())
    assert doc["environment"] == {"gpu": "fake"}
    assert doc["settings"]["quick"] is True and doc["targets"] == ["t"]
    assert len(doc["results"]) == len(results)
    assert doc["results"][0]["samples"] == [1.0, 0.9, 1.1]
    assert doc["results"][3]["error"].startswith("skipped")


def test_plot_writes_or_explains(tmp_path):
    message = report.plot(str(tmp_path / "b.png"), _sample_results())
    if message is None:
        assert (tmp_path / "b.png").stat().st_size > 0
    else:
        assert "matplotlib" in message


def test_main_without_gpu_exits_cleanly(monkeypatch, capsys):
    monkeypatch.setattr(cli, "no_gpu_reason", lambda: "no CUDA device found")
    assert cli.main(["--quick"]) == 2
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


def test_time_ms_hold_comes_once_after_warm_up_and_is_not_timed(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    log = []

    def fn(i):
        log.append("call")
        fake.now += 2.0

    def hold():
        log.append("hold")
        fake.now += 50.0  # the stream kept busy: no timed call may include this

    out = _timing.time_ms(fn, warmup=3, repeat=4, hold=hold)
    assert log == ["call"] * 3 + ["hold"] + ["call"] * 4
    assert out["samples"] == [2.0] * 4


# -- round-robin timing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_round_order_balances_places_and_predecessors(count):
    rounds = [bench_timing.round_order(count, r) for r in range(2 * count)]
    assert all(sorted(order) == list(range(count)) for order in rounds)
    # Every method sits at every place exactly twice in 2 * count rounds ...
    for m in range(count):
        assert sorted(order.index(m) for order in rounds) == sorted(list(range(count)) * 2)
    # ... and, after the first place, follows each of its two neighbours alike.
    if count > 2:
        before = {
            m: [order[order.index(m) - 1] for order in rounds if order.index(m) > 0] for m in range(count)
        }
        for m, preds in before.items():
            assert set(preds) == {(m - 1) % count, (m + 1) % count}
            assert preds.count((m - 1) % count) == preds.count((m + 1) % count)
    assert bench_timing.round_order(3, 0) == [0, 1, 2] and bench_timing.round_order(3, 1) == [2, 1, 0]
    assert bench_timing.round_order(3, 2) == [1, 2, 0] and bench_timing.round_order(3, 3) == [0, 2, 1]


def _methods(fake, costs, log, fail_on=None):
    """Methods that advance the fake clock by their cost and log (method, input set)."""

    def make(m):
        def fn(i):
            if fail_on == (m, len([x for x in log if x[0] == m])):
                raise RuntimeError(f"method {m} broke")
            log.append((m, i))
            fake.now += costs[m]

        return fn

    return [make(m) for m in range(len(costs))]


def test_time_interleaved_calls_every_method_once_per_round(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    log = []
    out = bench_timing.time_interleaved(
        _methods(fake, [1.0, 2.0, 3.0], log), sets=[1, 2, 3], warmup=2, repeat=4
    )
    order = [m for m, _ in log]
    # 2 warm-up rounds, then 4 timed rounds, each one call per method in round_order.
    assert order == sum((bench_timing.round_order(3, r) for r in range(6)), [])
    # Each method walks its own input sets, warm-up included.
    assert [i for m, i in log if m == 2] == [0, 1, 2, 0, 1, 2]
    assert [i for m, i in log if m == 1] == [0, 1, 0, 1, 0, 1]
    # One event pair per call: each sample is that call alone.
    assert [o["samples"] for o in out] == [[1.0] * 4, [2.0] * 4, [3.0] * 4]
    assert bench_timing.time_interleaved([], warmup=1, repeat=1) == []


def test_time_interleaved_is_fair_under_clock_drift(monkeypatch):
    """Two methods of equal work on a GPU that slows down as it runs: timed one after
    the other the second looks 40% slower; interleaved they come out equal."""
    fake = _FakeClock()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)

    def drifting(m):
        def fn(i):
            fake.now += 1.0 + 0.01 * fake.now  # each call slower than the one before

        return fn

    fns = [drifting(0), drifting(1)]
    seq = bench_timing.time_sequential(fns, warmup=2, repeat=30)
    assert seq[1]["median"] / seq[0]["median"] > 1.3
    fake.now = 0.0
    inter = bench_timing.time_interleaved(fns, warmup=2, repeat=30)
    assert inter[1]["median"] / inter[0]["median"] == pytest.approx(1.0, abs=0.01)


def test_time_interleaved_drops_a_failing_method_and_times_the_rest(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    log = []
    out = bench_timing.time_interleaved(_methods(fake, [1.0, 2.0], log, fail_on=(0, 3)), warmup=1, repeat=5)
    assert isinstance(out[0], RuntimeError) and "method 0 broke" in str(out[0])
    assert len([m for m, _ in log if m == 0]) == 3  # never called again after it failed
    assert out[1]["samples"] == [2.0] * 5


def test_time_interleaved_budget_shrinks_rounds_not_below_min_repeat(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    log = []
    # Probe round: 100 + 300 ms; budget 1000 ms per method -> 2000 / 400 = 5 rounds, raised to 8.
    out = bench_timing.time_interleaved(
        _methods(fake, [100.0, 300.0], log), warmup=1, repeat=30, min_repeat=8, budget_ms=1000.0
    )
    assert [len(o["samples"]) for o in out] == [8, 8]
    assert len(log) == 2 * (1 + 1 + 8)  # warm-up, probe, timed rounds
    out = bench_timing.time_interleaved(
        _methods(fake, [1.0, 1.0], log), warmup=0, repeat=30, min_repeat=8, budget_ms=1000.0
    )
    assert [len(o["samples"]) for o in out] == [30, 30]  # cheap methods keep every repeat


class _Weights:
    """A stand-in for WeightCache: sizes only."""

    def __init__(self, **sizes):
        self.sizes = dict(sizes)

    def nbytes(self):
        return sum(self.sizes.values())

    def holds(self, which):
        return which in self.sizes

    def drop(self, which):
        self.sizes.pop(which, None)


def _section_runner(monkeypatch, fake, weights, mem_gb=1.0, timing="interleaved"):
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setattr(bench_section, "free_pool", lambda: None)
    args = cli.parse_args(["--warmup", "1", "--repeat", "3", "--timing", timing])
    args.mem_gb, args.hbm_gbs = mem_gb, 3350.0
    case = Case("qwen3-30b-a3b", 4096, 128, 8, 2048, 768)
    return bench_section.SectionRunner(case, args, weights)


def test_section_sets_up_padded_last_skips_what_does_not_fit_and_keeps_the_order(monkeypatch):
    fake = _FakeClock()
    runner = _section_runner(monkeypatch, fake, _Weights(w1=300_000_000, w2=200_000_000))
    setup_order, calls = [], []

    def method(name, nbytes, cost=1.0):
        def setup():
            setup_order.append(name)
            skip = runner.fits(nbytes)
            if skip:
                return runner.result("gemm1", name, error=skip)

            def fn(i):
                calls.append(name)
                fake.now += cost

            return bench_section.Timed(
                name, fn, 1, lambda t: runner.measured("gemm1", name, t, 10**12, None), nbytes
            )

        return name, setup

    def broken():
        raise MemoryError("out of memory")

    setups = [
        method("cublas_grouped", 100_000_000),
        method("padded_strided", 150_000_000),
        method("auto", 100_000_000, cost=2.0),
        ("dense", broken),
        method("torch", 400_000_000),
    ]
    runner.run_section("gemm1", setups, held=50_000_000, spare=("w2",))
    assert setup_order == ["cublas_grouped", "auto", "torch", "padded_strided"]
    by = {r.method: r for r in runner.results}
    assert [r.method for r in runner.results] == [
        "cublas_grouped",
        "padded_strided",
        "auto",
        "dense",
        "torch",
    ]
    assert by["cublas_grouped"].ms == 1.0 and by["auto"].ms == 2.0 and by["auto"].tflops == 500.0
    assert by["dense"].error == "MemoryError: out of memory"
    # torch did not fit beside w1 + w2 + inputs + the two methods; dropping the spare w2 made room.
    assert by["torch"].error is None and not runner.weights.holds("w2")
    # Then padded (set up last) no longer fits: 300 + 50 + 100 + 100 + 400 + 150 MB > 1 GB.
    assert by["padded_strided"].error.startswith("skipped: needs ~1.1 GB with the weights")
    assert set(calls) == {"cublas_grouped", "auto", "torch"}
    assert runner.held == 0 and runner.spare == ()


def test_section_sequential_timing_runs_each_method_whole(monkeypatch):
    fake = _FakeClock()
    runner = _section_runner(monkeypatch, fake, _Weights(), timing="sequential")
    calls = []

    def method(name):
        def fn(i):
            calls.append(name)
            fake.now += 1.0

        return name, lambda: bench_section.Timed(
            name, fn, 1, lambda t: runner.measured("layer", name, t, None, None)
        )

    runner.run_section("layer", [method("a"), method("b")])
    assert "".join(c[0] for c in calls) == "a" * 4 + "b" * 4  # warm-up 1, then 3 timed, each
    calls.clear()
    runner.reverse = True
    runner.run_section("layer", [method("a"), method("b")])
    assert "".join(c[0] for c in calls) == "b" * 4 + "a" * 4
    assert [r.method for r in runner.results] == ["a", "b", "a", "b"]


def test_passes_default_follows_the_timing_scheme():
    assert cli.parse_args([]).timing == "interleaved" and cli.parse_args([]).passes == 1
    assert cli.parse_args(["--timing", "sequential"]).passes == 2
    assert cli.parse_args(["--timing", "sequential", "--passes", "3"]).passes == 3
    with pytest.raises(SystemExit):
        cli.parse_args(["--timing", "alternating"])


class _FakeGpu(_FakeClock):
    """NumPy standing in for CuPy, and a fake library API that logs each call and
    advances the fake clock: enough to drive the whole runner on the CPU."""

    def __init__(self):
        super().__init__()
        gpu_self = self
        self.log = []

        class Rng:
            def __init__(self, seed):
                self.rng = np.random.default_rng(seed)

            def standard_normal(self, size, dtype):
                return self.rng.standard_normal(size).astype(dtype)

        class Stream:
            ptr = 0

            def synchronize(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def begin_capture(self):
                gpu_self.capturing = True

            def end_capture(self):
                gpu_self.capturing = False
                return types.SimpleNamespace(launch=lambda stream=None: gpu_self.call("graph"))

        pool = types.SimpleNamespace(free_all_blocks=lambda: None)

        def matmul(a, b, out=None):
            gpu_self.call("dense")
            out[...] = (a.astype(np.float32) @ b.astype(np.float32)).astype(out.dtype)
            return out

        self.capturing = False
        m = self.module
        m.cuda.get_current_stream = lambda: Stream()
        m.cuda.Stream = lambda non_blocking=False: Stream()
        m.cuda.runtime = types.SimpleNamespace(deviceSynchronize=lambda: None)
        m.asarray, m.empty, m.matmul = np.asarray, np.empty, matmul
        m.float32, m.uint16, m.uint32 = np.float32, np.uint16, np.uint32
        m.linalg = np.linalg
        m.random = types.SimpleNamespace(default_rng=Rng)
        m.get_default_memory_pool = m.get_default_pinned_memory_pool = lambda: pool
        # The split's hold of the stream (gpu.hold_stream): logged as "hold".
        m.RawKernel = lambda source, name: lambda grid, block, args: gpu_self.call("hold", ms=0.0)

    def call(self, what, ms=1.0):
        if not self.capturing:
            self.log.append(what)
            self.now += ms

    def api(self, sm=(8, 0)):
        from cublas_grouped.gemm.plan import layout_for

        gpu_self = self

        def prepare_input(x, routing, experts, algorithm, gemm_n):
            ids = np.asarray(routing[1])
            counts = np.bincount(ids.reshape(-1), minlength=experts)
            chosen = "cublas_grouped" if algorithm == "auto" else algorithm
            layout = layout_for(chosen, counts)
            rows = np.zeros((layout.rows(counts), x.shape[1]), dtype=x.dtype)
            starts = layout.offsets(counts)
            for e in range(experts):
                tokens = np.flatnonzero((ids == e).any(axis=1))
                rows[starts[e] : starts[e] + len(tokens)] = x[tokens]
            return types.SimpleNamespace(
                rows=rows, counts_host=counts, layout=layout, algorithm=chosen, tag=algorithm
            )

        def expert_gemm(inp, w, out=None):
            gpu_self.call(inp.tag)
            out = np.empty((inp.rows.shape[0], w.shape[2]), inp.rows.dtype) if out is None else out
            starts = inp.layout.offsets(inp.counts_host)
            for e, m in enumerate(inp.counts_host):
                rows = inp.rows[starts[e] : starts[e] + m].astype(np.float32)
                out[starts[e] : starts[e] + m] = (rows @ w[e].astype(np.float32)).astype(out.dtype)
            return out

        def moe_forward(
            x, ids, wts, w1, w2, algorithm="auto", timer=None, fixed_capacity=False, w1_layout="gate_up"
        ):
            packed = "+packed" if w1_layout == "gate_up_blocked" else ""
            gpu_self.call(("fixed-capacity" if fixed_capacity else f"layer:{algorithm}") + packed)
            return np.zeros_like(x)

        class StageTimer:
            def times_ms(self):
                return {
                    "plan": 0.1,
                    "gather": 0.1,
                    "gemm1": 1.0,
                    "activation": 0.1,
                    "gemm2": 0.5,
                    "combine": 0.1,
                }

        class FixedCapacityMoE:
            def __init__(self, w1, w2, top_k, max_tokens, gated=True, activation="silu", w1_layout="gate_up"):
                pass

            def forward(self, x, ids, wts):
                gpu_self.call("fixed-capacity-forward")

        return types.SimpleNamespace(
            prepare_input=prepare_input,
            expert_gemm=expert_gemm,
            moe_forward=moe_forward,
            route=lambda logits, k: gpu_self.call("route"),
            StageTimer=StageTimer,
            FixedCapacityMoE=FixedCapacityMoE,
            gmm=None,
            device_info=lambda: types.SimpleNamespace(sm=sm),
        )


def _run_on_fake_gpu(monkeypatch, tokens: str, inter: str = "16", sm=(8, 0), extra=()):
    """The benchmark's runner over the custom case (4 experts, k 2, H 8) on
    :class:`_FakeGpu`: the fake, the arguments, the results and the stats."""
    from cublas_grouped.tools.bench import runner

    fake = _FakeGpu()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    args = cli.parse_args(
        ["--experts", "4", "--topk", "2", "--hidden", "8", "--inter", inter, "--tokens", tokens]
        + ["--routing", "uniform", "--no-torch", "--warmup", "1", "--repeat", "3", *extra]
    )
    args.hbm_gbs = 3350.0
    results, stats = runner.run_all(workloads.build_cases(args), args, fake.api(sm=sm))
    return fake, args, results, stats


def test_run_all_times_every_method_round_robin_on_a_fake_gpu(monkeypatch):
    fake, args, results, stats = _run_on_fake_gpu(monkeypatch, "16,256")
    cases = workloads.build_cases(args)
    assert [s["name"] for s in stats] == [c.name for c in cases]
    # Not an SM 9.0 GPU: the sm90 kernel and the fused layer are recorded as skipped, nothing else fails.
    skipped = [r for r in results if r.error]
    kernel_rows = {("gemm1", "sm90_grouped"), ("layer", "sm90_grouped"), ("layer", "fused")}
    assert {(r.section, r.method) for r in skipped} == kernel_rows
    assert all(
        r.error.startswith("skipped: ") and "needs an SM 9.0 GPU (this one is SM 8.0)" in r.error
        for r in skipped
    )
    assert "sm90_grouped" not in fake.log and "layer:sm90_grouped" not in fake.log
    assert not any("packed" in call for call in fake.log)
    decode = [f"{r.section}:{r.method}" for r in results if r.tokens == 16]
    gemm1 = [f"gemm1:{m}" for m in (*workloads.ALGORITHMS, *workloads.KERNEL_ALGORITHMS, "auto", "dense")]
    layer = [f"layer:{m}" for m in (*workloads.ALGORITHMS, *workloads.KERNEL_ALGORITHMS, "auto")]
    decode_layer = layer + ["layer:fixed-capacity", "layer:fused"]
    assert decode == gemm1 + decode_layer + ["route:route", "split:auto", "graph:fixed-capacity"]
    prefill = [f"{r.section}:{r.method}" for r in results if r.tokens == 256]
    assert prefill == gemm1 + layer + ["layer:fused", "route:route", "split:auto"]
    assert all(r.note is None or "CHECK FAILED" not in r.note for r in results)
    # The first GEMM of the first case: one checked call per method at setup (padded
    # last), then warm-up and timed rounds, each calling every method once.
    methods = [*workloads.ALGORITHMS, "auto", "dense"]
    first = fake.log[: 6 * 5]
    assert first[:6] == ["cublas_grouped", "sequential", "chunked_batched", "auto", "dense", "padded_strided"]
    rounds = [first[i : i + 6] for i in range(6, 30, 6)]
    assert all(sorted(r) == sorted(methods) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order rotates
    assert "layer:fixed-capacity" not in fake.log and "fixed-capacity" in fake.log
    text = report.format_table(results)
    assert "layer:fixed-capacity" in text and "graph:fixed-capacity" in text and "sync-free" not in text
    targets = "\n".join(report.evaluate_targets(results, args.hbm_gbs))
    assert "(layer graph, w1+w2 bytes)" in targets


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_sm90_kernel_is_timed_on_sm90_in_both_sections(monkeypatch, dtype):
    """On SM 9.0 the sm90 kernel is timed beside the others (gemm1 and layer) for
    16-bit cases and skipped for float32; AUTO's targets compare with it (AUTO
    may choose it there)."""
    fake, args, results, _ = _run_on_fake_gpu(monkeypatch, "256", sm=(9, 0), extra=("--dtype", dtype))
    sm90 = {r.section: r for r in results if r.method == "sm90_grouped"}
    assert set(sm90) == {"gemm1", "layer"}
    if dtype == "float32":
        assert all(
            r.error == "skipped: sm90_grouped takes bfloat16 or float16, not float32" for r in sm90.values()
        )
        return
    assert all(r.error is None and r.ms > 0 for r in sm90.values())
    assert "sm90_grouped" in fake.log and "layer:sm90_grouped" in fake.log
    assert "sm90_grouped" in report.format_table(results)
    # Make the kernel the fastest of all: AUTO can choose it, so AUTO is judged against it.
    for r in sm90.values():
        r.ms = 1e-6
    targets = report.evaluate_targets(results, args.hbm_gbs)
    for section in ("gemm1", "layer"):
        block = targets[targets.index(next(t for t in targets if f"({section})" in t)) :]
        assert "vs best 0.000 ms (sm90_grouped)" in block[1], block[:2]


def test_the_fused_layer_rows_on_sm90(monkeypatch):
    """On SM 9.0, a gated layer with I a multiple of 128 gets the fused rows: the
    eager layer with w1 packed (timed with the layer section), its stage split,
    and at prefill its graph replays; at decode the fixed-capacity graph stays
    the graph row. The packed w1 is made once per model and dropped first when
    a later first-GEMM section needs room."""
    packs = []
    monkeypatch.setattr(gpu, "packed_w1", lambda w1: packs.append(w1.shape) or w1.copy())
    fake, _, results, _ = _run_on_fake_gpu(monkeypatch, "16,256", inter="128", sm=(9, 0))
    assert packs == [(4, 8, 256)]  # one packed copy for both cases of the model
    rows = {(r.tokens, r.section, r.method): r for r in results}
    assert not [r for r in results if r.error], [(r.method, r.error) for r in results if r.error]
    for tokens in (16, 256):
        fused = rows[(tokens, "layer", "fused")]
        assert fused.ms > 0 and fused.algorithm == "sm90_grouped"
        assert "rel.err 0 vs moe_forward" in fused.note  # checked against the unpacked layer
        assert rows[(tokens, "split", "fused")].extra["gemm_ms"] == pytest.approx(1.5)
    # Graphs: the fused layer at both sizes (at decode the FixedCapacityMoE step
    # with w1 packed, beside the plain one, with the floor), fixed capacity at decode.
    assert (256, "graph", "fused") in rows and rows[(16, "graph", "fused")].extra["floor_ratio"] > 0
    assert (16, "graph", "fixed-capacity") in rows and (256, "graph", "fixed-capacity") not in rows
    # At prefill the graph replays are timed round-robin with the eager layers
    # (the same power state for both), not alone after them.
    assert "timed with the layer section" in rows[(256, "graph", "fused")].note
    launches = [i for i, name in enumerate(fake.log) if name == "graph"]
    eager = [i for i, name in enumerate(fake.log) if name == "layer:auto+packed"]
    assert launches and eager and launches[0] < eager[-1] and eager[0] < launches[-1]
    assert "layer:auto+packed" in fake.log  # the fused row calls moe_forward with the packed layout
    text = report.format_split(results)
    assert " fused " in text and " auto " in text and "non-GEMM%" in text
    # The fused split alternates runs behind a hold of the stream (judged) with
    # runs as the host paces them (beside it); AUTO's split holds nothing.
    for tokens in (16, 256):
        split = rows[(tokens, "split", "fused")]
        assert len(split.extra["runs"]) == 10 and split.extra["unheld"]["gemm_ms"] == pytest.approx(1.5)
        assert "unheld" not in rows[(tokens, "split", "auto")].extra
    # The route row is timed behind a hold too (its GPU time, as the split's
    # other stages), once per case, right before its timed calls.
    holds = [i for i, name in enumerate(fake.log) if name == "hold"]
    after = [fake.log[i + 1] for i in holds]
    assert after.count("layer:auto+packed") == 20 and after.count("route") == 2 and len(holds) == 22


def test_fused_rows_skip_where_w1_cannot_be_packed(monkeypatch):
    _, _, results, _ = _run_on_fake_gpu(monkeypatch, "256", inter="96", sm=(9, 0))
    fused = [r for r in results if r.method == "fused"]
    assert [(r.section, r.error) for r in fused] == [
        ("layer", "skipped: fused packs a gated w1 in blocks of 128 columns (I = 96)")
    ]


def test_torch_block_is_the_layer_math():
    """The torch peer computes the layer: float64 NumPy reference, empty experts,
    a token naming one expert twice, rows in (token, choice) order."""
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    from cublas_grouped.tools.bench.fused_layer import torch_block

    rng = np.random.default_rng(7)
    tokens, k, e, h, inter = 9, 3, 5, 16, 32
    ids = rng.integers(0, e - 2, size=(tokens, k)).astype(np.int32)  # experts 3 and 4 stay empty
    ids[0] = [1, 1, 2]
    x = rng.standard_normal((tokens, h))
    w1 = rng.standard_normal((e, h, 2 * inter)) / 4
    w2 = rng.standard_normal((e, inter, h)) / 6
    wts = rng.random((tokens, k))
    ref = np.zeros((tokens, h))
    for t in range(tokens):
        for j in range(k):
            hh = x[t] @ w1[ids[t, j]]
            gate, up = hh[:inter], hh[inter:]
            ref[t] += wts[t, j] * ((gate / (1 + np.exp(-gate)) * up) @ w2[ids[t, j]])
    as_t = lambda a: torch.from_numpy(a).to(torch.bfloat16)  # noqa: E731
    bounds = torch.arange(1, e + 1, dtype=torch.int32)
    got = torch_block(torch, as_t(x), torch.from_numpy(ids), as_t(wts), as_t(w1), as_t(w2), bounds, inter)
    got = got.float().numpy()
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 2e-2, err
    # A wrong offset or a missed reorder is far off: swap two tokens' rows.
    assert np.linalg.norm(got[[1, 0]] - ref[:2]) / np.linalg.norm(ref[:2]) > 0.3


def test_fused_targets_pass_miss_and_skip():
    pre, big = "qwen3-30b-a3b/T4096/uniform", "qwen3-30b-a3b/T16384/skewed"
    split = {"gemm_ms": 0.6, "non_gemm_ms": 0.2, "stages_ms": {}, "route_ms": 0.04}
    results = [
        _r(pre, "layer", "fused", 0.8, tflops=300.0),
        _r(pre, "layer", "torch-block", 1.3),
        _r(pre, "split", "fused", 0.76, extra=split),
        _r(big, "layer", "fused", 2.5, tflops=520.0),
        _r(big, "layer", "torch-block", error="n/a: torch not importable (x)"),
        _r(big, "graph", "fused", 2.4, tflops=541.7),
        _r("qwen3-30b-a3b/T16/uniform", "layer", "fused", 0.3, tflops=1.0),  # decode: judged by its graph
        _r(
            "qwen3-30b-a3b/T16/uniform",
            "graph",
            "fused",
            0.2,
            extra={"floor_ratio": 0.912, "floor_ms": 0.1824},
        ),
        _r("qwen3-30b-a3b/T64/uniform", "graph", "fused", error="RuntimeError: capture"),
        _r("deepseek-v3/T4096/uniform", "layer", "fused", error="skipped: fused needs an SM 9.0 GPU"),
    ]
    text = "\n".join(report.evaluate_targets(results))
    assert "fused layer >= 1.5x the torch eager block (prefill): 1/1 PASS" in text
    assert "PASS qwen3-30b-a3b/T4096/uniform: 1.62x (0.800 vs torch block 1.300 ms)" in text
    assert "SKIP qwen3-30b-a3b/T16384/skewed: torch block n/a (n/a: torch not importable (x))" in text
    assert "fused layer TFLOP/s (eager; the graph replay beside it): 1/1 PASS" in text
    assert "PASS qwen3-30b-a3b/T16384/skewed: 520.0 TFLOP/s, graph 541.7 (target 500)" in text
    assert "fused layer non-GEMM share <= 20% at 4096 tokens: 0/1 PASS" in text
    assert "MISS qwen3-30b-a3b/T4096/uniform: 25.0% (non-GEMM 0.200 ms of 0.800 ms, route included)" in text
    # With the prefill graph: its share beside the verdict, (0.70 + 0.04 - 0.6) / 0.74.
    graph = _r(pre, "graph", "fused", 0.70, tflops=340.0)
    text = "\n".join(report.evaluate_targets([*results, graph]))
    assert (
        "MISS qwen3-30b-a3b/T4096/uniform: 25.0% (non-GEMM 0.200 ms of 0.800 ms; graph replay 18.9%" in text
    )
    # With the split as the host paces it (no hold): beside the verdict, not judged.
    split["unheld"] = {"gemm_ms": 0.6, "non_gemm_ms": 0.3}
    text = "\n".join(report.evaluate_targets([*results, graph]))
    assert "; graph replay 18.9%; host-paced split 33.3%, route included)" in text
    assert "fused decode graph >= 90% of the floor (w1 + w2 bytes): 1/2 PASS" in text
    assert "PASS qwen3-30b-a3b/T16/uniform: 91.2% (0.200 ms, floor 0.182 ms)" in text
    assert "MISS qwen3-30b-a3b/T64/uniform: no graph time (RuntimeError: capture)" in text
    assert "deepseek" not in text and "T16/uniform: 1.0" not in text
    # A fused layer that failed misses every target of its case.
    failed = [_r(pre, "layer", "fused", error="RuntimeError: boom")]
    lines = report.fused_targets(report._by_case(failed))
    assert (
        sum(line.startswith("  MISS") for line in lines) == 2
    )  # speed and share (no TFLOP/s target at 4096)


def test_non_gemm_share_by_hand():
    assert report.non_gemm_share_pct({"gemm_ms": 3.0, "non_gemm_ms": 1.0}) == pytest.approx(25.0)
    assert report.non_gemm_share_pct({"gemm_ms": 0.0, "non_gemm_ms": 1.0}) is None


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
    w = gpu.random_normal((3, 64, 32), "bfloat16", 0.125, seed=7)
    assert w.shape == (3, 64, 32) and w.dtype == np.dtype(ml_dtypes.bfloat16)
    expected = (Rng(7).standard_normal((3, 64 * 32), np.float32) * np.float32(0.125)).astype(
        ml_dtypes.bfloat16
    )
    np.testing.assert_array_equal(w.reshape(3, -1), expected)  # round to nearest even, like a cast
    assert 0.1 < float(w.astype(np.float32).std()) < 0.15
    h = gpu.random_normal((5, 8), "float16", 1.0, seed=1)
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
        "fixed-capacity",
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
        "fixed-capacity",
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
    g = by[("graph", "fixed-capacity")]
    assert g.ms == 1.0 and g.extra["floor_ratio"] == 1.0 and g.note == "floor 1.000 ms = 100% of it"
    assert len(merged) == 3


def test_tune_quick_grid_covers_the_benchmark_and_orders_dtypes():
    grid = tune.build_grid(quick=True)
    bench_tokens = {c.tokens for c in workloads.build_cases(cli.parse_args([]))}
    for model in workloads.MODELS:
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
    assert gpu.datasheet_hbm_gbs(name) == expected


def test_copy_bandwidth_counts_bytes_read_and_written():
    # 1 GiB read and 1 GiB written in 0.5 ms.
    assert gpu.copy_gbs(1 << 30, 0.5) == pytest.approx(2 * 2**30 / 0.5e-3 / 1e9)


def test_hbm_source_precedence():
    assert gpu.resolve_hbm(4000.0, "NVIDIA H200", 4100.0) == (4000.0, "--hbm-gbs")
    gbs, source = gpu.resolve_hbm(None, "NVIDIA H200", 4100.0)
    assert gbs == 4800.0 and source == "datasheet figure of the H200, known by the GPU name"
    gbs, source = gpu.resolve_hbm(None, "NVIDIA B200", 6900.0)
    assert gbs == 6900.0 and source.startswith("measured: device-to-device copy of 1 GiB, median of 5")
    gbs, source = gpu.resolve_hbm(None, "NVIDIA B200", None)
    assert gbs == gpu.FALLBACK_HBM_GBS and source.startswith("assumed (H100 SXM)")
    assert cli.parse_args([]).hbm_gbs is None and cli.parse_args(["--hbm-gbs", "4800"]).hbm_gbs == 4800.0


def test_hbm_lines():
    lines = gpu.hbm_lines(4800.0, "datasheet", 4100.0)
    assert lines == [
        "HBM bandwidth for %HBM and the decode floor: 4800 GB/s (datasheet)",
        "measured device-to-device copy: 4100 GB/s = 85% of 4800",
    ]
    assert gpu.hbm_lines(3350.0, "--hbm-gbs", None, "OutOfMemoryError")[1] == (
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
    gbs = gpu.measure_copy_gbs()
    assert copies[0] == (0x2000, 0x1000, 1 << 30, 3, 7)  # dst, src: one GiB device to device, on the stream
    assert len(copies) == 1 + gpu.COPY_REPEAT  # one untimed, then the timed ones
    assert gbs == pytest.approx(gpu.copy_gbs(1 << 30, 0.5))


def test_main_prints_bandwidth_and_tuning_table(monkeypatch, capsys):
    monkeypatch.setattr(cli, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(cli, "load_api", lambda: object())
    monkeypatch.setattr(cli, "environment", lambda argv: {"gpu": "NVIDIA H200", "cublas_version": 130100})
    monkeypatch.setattr(cli, "measure_copy_gbs", lambda: 4150.0)
    monkeypatch.setattr(cli, "run_all", lambda cases, args, api: ([], []))
    monkeypatch.setattr(cli, "run_host_section", lambda **kw: [])
    monkeypatch.setattr(
        cli, "auto_table_lines", lambda: ["AUTO tuning table: shipped table x.json: same architecture"]
    )
    assert cli.main(["--quick", "--no-torch"]) == 0
    captured = capsys.readouterr()
    for text in (captured.err, captured.out):
        assert "HBM bandwidth for %HBM and the decode floor: 4800 GB/s (datasheet figure of the H200" in text
        assert "measured device-to-device copy: 4150 GB/s = 86% of 4800" in text
        assert "AUTO tuning table: shipped table x.json: same architecture" in text
    monkeypatch.setattr(cli, "measure_copy_gbs", lambda: (_ for _ in ()).throw(MemoryError("no room")))
    assert cli.main(["--quick", "--hbm-gbs", "3000"]) == 0
    out = capsys.readouterr().out
    assert "3000 GB/s (--hbm-gbs)" in out and "copy not measured: MemoryError: no room" in out


def test_auto_lines_say_why_when_the_library_cannot_tell(monkeypatch):
    import cublas_grouped as cg

    def no_device():
        raise RuntimeError("no CUDA device")

    monkeypatch.setattr(cg, "device_info", no_device)
    assert cli.auto_table_lines() == ["AUTO tuning table: unknown (RuntimeError: no CUDA device)"]


def test_the_bench_package_is_listed_for_the_wheel():
    # setuptools ships only the packages pyproject.toml names; an unlisted one is missing from installs.
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    listed = text.split("packages = [", 1)[1].split("]", 1)[0]
    assert '"cublas_grouped.tools"' in listed and '"cublas_grouped.tools.bench"' in listed


def test_host_section_flags_and_verdicts(monkeypatch, capsys, tmp_path):
    from cublas_grouped.tools.bench import host

    rows = [
        {"name": "route T=1 E=128 k=8", "us": 14.0, "target_us": 15.0, "peer": False},
        {"name": "gmm tiny, device sizes (auto)", "us": 26.0, "target_us": 25.0, "peer": False},
        {"name": "torch.mm tiny", "us": 16.0, "target_us": None, "peer": True},
    ]
    text = host.format_host(
        rows + [{"name": "route", "us": None, "target_us": 15.0, "peer": False, "error": "E"}]
    )
    assert text.splitlines()[-1].split() == ["route", "failed", "E"]
    text = host.format_host(rows)
    assert "route T=1 E=128 k=8" in text and "<= 15: PASS" in text
    assert "<= 25: MISS" in text and text.splitlines()[-1].rstrip().endswith("peer")
    seen = {}
    monkeypatch.setattr(cli, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(cli, "load_api", lambda: object())
    monkeypatch.setattr(cli, "environment", lambda argv: {"gpu": "NVIDIA H100", "cublas_version": 130100})
    monkeypatch.setattr(cli, "measure_copy_gbs", lambda: 3000.0)
    monkeypatch.setattr(cli, "auto_table_lines", lambda: [])
    monkeypatch.setattr(cli, "run_host_section", lambda **kw: seen.update(kw) or rows)
    monkeypatch.setattr(cli, "run_all", lambda *a: (_ for _ in ()).throw(AssertionError("cases ran")))
    path = tmp_path / "b.json"
    assert cli.main(["--host-only", "--no-torch", "--host-profile", "p.txt", "--json", str(path)]) == 0
    assert seen == {"profile_path": "p.txt", "torch_ok": False}
    assert "<= 25: MISS" in capsys.readouterr().out
    import json

    assert [r["us"] for r in json.loads(path.read_text())["host_overhead_us"]] == [14.0, 26.0, 16.0]
    monkeypatch.setattr(
        cli, "run_host_section", lambda **kw: (_ for _ in ()).throw(AssertionError("host ran"))
    )
    monkeypatch.setattr(cli, "run_all", lambda cases, args, api: ([], []))
    assert cli.main(["--quick", "--no-host"]) == 0


def test_host_section_reports_a_failure_and_goes_on(monkeypatch):
    from cublas_grouped.tools.bench import host

    def boom():
        raise MemoryError("no room")

    cases = [
        host.HostCase("route T=1 E=128 k=8", boom),
        host.HostCase("cupy.matmul tiny", lambda: None, True),
    ]
    monkeypatch.setattr(host, "host_cases", lambda torch_ok: cases)
    monkeypatch.setattr(host, "time_host_us", lambda fn, repeat: fn() or 7.5)
    rows = host.run_host_section()
    assert rows[0]["us"] is None and "no room" in rows[0]["error"] and rows[0]["target_us"] == 15.0
    assert rows[1]["us"] == 7.5 and "error" not in rows[1]
    monkeypatch.setattr(host, "host_cases", lambda torch_ok: boom())
    (only,) = host.run_host_section()
    assert only["us"] is None and "no room" in only["error"]


def test_the_fused_graph_is_skipped_where_the_packed_w1_does_not_fit(monkeypatch):
    """At prefill on SM 9.0, when the fused row cannot make room for the packed
    w1, its graph row says why instead of running without it."""
    from cublas_grouped.tools.bench import section

    monkeypatch.setattr(section.SectionRunner, "fits", lambda self, extra_bytes: "skipped: no room (test)")
    _, _, results, _ = _run_on_fake_gpu(monkeypatch, "256", inter="128", sm=(9, 0))
    rows = {(r.section, r.method): r for r in results}
    assert rows[("layer", "fused")].error == "skipped: no room (test)"
    assert rows[("graph", "fused")].error == "skipped: the packed w1 did not fit"
    assert ("split", "fused") not in rows


def test_the_split_hold_kernel_compiles_and_waits_on_the_global_timer():
    """gpu.hold_stream's kernel (CuPy compiles it with NVRTC on the GPU
    machine): it builds for sm_90 and sm_80 here, and its loop reads
    %globaltimer and sleeps (a wait of wall time, not of a clock count that
    the SM clock would scale)."""
    from cuda.bindings import nvrtc as N

    for arch in ("compute_90", "compute_80"):
        _, prog = N.nvrtcCreateProgram(gpu._HOLD_SOURCE.encode(), b"hold.cu", 0, [], [])
        opts = [f"--gpu-architecture={arch}".encode()]
        (status,) = N.nvrtcCompileProgram(prog, len(opts), opts)
        assert status == N.nvrtcResult.NVRTC_SUCCESS, arch
        _, size = N.nvrtcGetPTXSize(prog)
        ptx = b" " * size
        N.nvrtcGetPTX(prog, ptx)
        N.nvrtcDestroyProgram(prog)
        text = ptx.decode()
        assert ".entry hold_stream" in text and "%globaltimer" in text and "nanosleep" in text
