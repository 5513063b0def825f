"""Which tuning table AUTO uses, and when it measures: fallback chain, closeness,
measurements on first sight and their disk store, all on the CPU with faked
devices, tables written to temporary folders and a stand-in for the timing."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from tuning_util import entry, isolate_tuning, write_table

from cublas_grouped import Algorithm, DeviceInfo, GroupedGemmExecutor, ProblemStats, TuningTable
from cublas_grouped.gemm import autotune as at
from cublas_grouped.gemm import tables as _tables
from cublas_grouped.gemm.select import reset_tuning_cache
from cublas_grouped.gemm.tables import is_close_table, tuning_table_for

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
QWEN = ProblemStats(128, 128, 32768, 280, 1536, 2048)
CANDIDATES = (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL, Algorithm.CHUNKED_BATCHED)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    return isolate_tuning(tmp_path, monkeypatch)


def device(name=H100, version=130100, sm=(9, 0)):
    return DeviceInfo(sm=sm, cublas_version=version, name=name)


def times_of(fastest: str) -> dict:
    times = {"cublas_grouped": 2.0, "sequential": 3.0, "chunked_batched": 4.0}
    times[fastest] = 1.0
    return times


# -- the fallback chain ----------------------------------------------------------------------------------------
def test_exact_tables_user_before_shipped(dirs):
    user, shipped = dirs
    write_table(shipped, "a.json", H100, 130100, [entry(times=times_of("sequential"))])
    table, why = tuning_table_for(device())
    assert why.startswith(f"shipped table {shipped / 'a.json'}: exact match")
    assert table.nearest(QWEN)[Algorithm.SEQUENTIAL] == 1.0
    write_table(user, "mine.json", H100, 130100, [entry(times=times_of("cublas_grouped"))])
    assert tuning_table_for(device())[1].startswith("shipped")  # cached until reset
    reset_tuning_cache()
    table, why = tuning_table_for(device())
    assert why.startswith(f"user table {user / 'mine.json'}: exact match")
    assert table.nearest(QWEN)[Algorithm.CUBLAS_GROUPED] == 1.0


def test_same_gpu_nearest_cublas_same_major_first(dirs):
    user, shipped = dirs
    # 129900 is numerically nearer to 130000 but of another major version.
    write_table(shipped, "old.json", H100, 129900, [entry()])
    write_table(shipped, "new.json", H100, 130500, [entry()])
    table, why = tuning_table_for(device(version=130000))
    assert table.cublas_version == 130500
    assert "same GPU, nearest cuBLAS" in why and "running NVIDIA H100 80GB HBM3, cuBLAS 130000" in why
    # Without a same-major table the other major is taken (cuBLAS 12.9 install, 13.1 table).
    table, why = tuning_table_for(device(version=120900))
    assert table.cublas_version == 129900


def test_nearness_before_user_and_user_first_at_equal_distance(dirs):
    user, shipped = dirs
    write_table(user, "u.json", H100, 130100, [entry()])
    write_table(shipped, "s.json", H100, 130300, [entry()])
    table, why = tuning_table_for(device(version=130200))
    assert why.startswith("user table")  # 100 either way: the user's
    reset_tuning_cache()
    table, why = tuning_table_for(device(version=130290))
    assert table.cublas_version == 130300 and why.startswith("shipped table")  # nearer wins


def test_same_architecture_then_nothing(dirs):
    _, shipped = dirs
    # An old table without "sm": an H100 by name, so Hopper.
    write_table(shipped, "h100.json", H100, 130100, [entry()])
    write_table(shipped, "other.json", "Some GPU", 130100, [entry()])  # no sm, unknown name
    table, why = tuning_table_for(device(H200, 130200))
    assert table.gpu == H100 and table.sm == (9, 0)
    assert "same architecture" in why and "running NVIDIA H200, cuBLAS 130200, SM 9.0" in why
    table, why = tuning_table_for(device("Some Blackwell", 130100, sm=(10, 0)))
    assert table is None and why.endswith("built-in rules")
    # A table that records its sm counts for that architecture.
    write_table(shipped, "bw.json", "Other Blackwell", 130100, [entry()], sm=(10, 0))
    reset_tuning_cache()
    assert tuning_table_for(device("Some Blackwell", 130100, sm=(10, 0)))[0].gpu == "Other Blackwell"


def test_cache_is_per_name_cublas_and_sm(dirs):
    _, shipped = dirs
    write_table(shipped, "h100.json", H100, 130100, [entry()], sm=(9, 0))
    assert tuning_table_for(device(sm=(9, 0)))[0] is not None
    # Same name and cuBLAS but another architecture (a faked device): looked up on its own.
    assert tuning_table_for(device("x", 130100, sm=(8, 0)))[0] is None


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"gpu": H100, "cublas_version": 130100}),
        json.dumps({"gpu": H100, "cublas_version": "new", "entries": []}),
        json.dumps({"gpu": H100, "cublas_version": 130100, "entries": [{"dtype": "bfloat16"}]}),
        json.dumps({"gpu": H100, "cublas_version": 130100, "entries": ["x"]}),
        json.dumps({"gpu": H100, "cublas_version": 130100, "sm": "nine", "entries": []}),
        json.dumps({"gpu": H100, "cublas_version": 130100, "entries": [entry(times={"warp_drive": 1.0})]}),
        json.dumps({"gpu": H100, "cublas_version": 130100, "entries": [entry(times={"sequential": "fast"})]}),
    ],
)
def test_broken_tables_are_ignored(dirs, text):
    user, shipped = dirs
    (user / "broken.json").write_text(text)
    write_table(shipped, "good.json", H100, 120900, [entry()])
    table, why = tuning_table_for(device())
    assert table.cublas_version == 120900 and "good.json" in why


def test_autotune_files_are_never_fallback_tables(dirs):
    user, _ = dirs
    write_table(user, "x-cublas130100-sm90.autotune.json", H100, 130100, [{**entry(), "layout": "layer"}])
    assert tuning_table_for(device())[0] is None


def test_closeness():
    table = TuningTable(H100, 130100, [])
    assert is_close_table(table, device(version=130100))
    assert is_close_table(table, device(version=130900))  # same major
    assert not is_close_table(table, device(version=120900))  # another major
    assert not is_close_table(table, device(H200, 130100))  # another GPU, same architecture
    assert not is_close_table(None, device())


def test_table_records_sm_and_reads_old_tables(tmp_path):
    TuningTable("gpu", 130100, [entry()], sm=(9, 0)).save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["sm"] == [9, 0]
    assert TuningTable.load(tmp_path / "t.json").sm == (9, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary file left
    write_table(tmp_path, "old.json", "NVIDIA H200", 130100, [entry()])
    assert TuningTable.load(tmp_path / "old.json").sm == (9, 0)
    write_table(tmp_path, "old2.json", "NVIDIA A100-SXM4-80GB", 130100, [entry()])
    assert TuningTable.load(tmp_path / "old2.json").sm is None
    with pytest.raises(ValueError, match=r"sm must be \[major, minor\] like \[9, 0\]; got 'x'"):
        TuningTable("gpu", 1, [], sm="x")


def test_shipped_h100_table_serves_other_cublas_and_h200(monkeypatch):
    # The real shipped table: a cu12 install and an H200 both find it.
    monkeypatch.setenv("CUBLAS_GROUPED_TUNING_DIR", "/nonexistent/cublas_grouped/tuning")
    reset_tuning_cache()
    try:
        table, why = tuning_table_for(device(H100, 120900))
        assert table is not None and table.gpu == H100 and "same GPU, nearest cuBLAS" in why
        table, why = tuning_table_for(device(H200, 130100))
        assert table is not None and table.sm == (9, 0) and "same architecture" in why
    finally:
        reset_tuning_cache()


# -- measuring on first sight -----------------------------------------------------------------------------------
class FakeMeasure:
    """Stands in for timing on the GPU: returns fixed times, counts calls."""

    def __init__(self, fastest="chunked_batched"):
        self.calls = []
        self.fastest = fastest

    def __call__(self, stats, candidates):
        self.calls.append((stats, candidates))
        return {Algorithm(a): t for a, t in times_of(self.fastest).items() if Algorithm(a) in candidates}


@pytest.fixture
def measuring(dirs, monkeypatch):
    """Measuring on, the stream not capturing."""
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "1")
    monkeypatch.setattr(at, "stream_is_capturing", lambda stream: False)
    return dirs


def auto(stats, dev, measure, family="layer"):
    return at.auto_times(stats, dev, CANDIDATES, family=family, measure=measure, stream=7)


def test_measures_once_per_shape_class_and_stores_on_disk(measuring):
    measure, dev = FakeMeasure(), device("Unknown GPU", 130100)
    assert min(auto(QWEN, dev, measure).items(), key=lambda kv: kv[1])[0] is Algorithm.CHUNKED_BATCHED
    assert len(measure.calls) == 1 and measure.calls[0][1] == CANDIDATES
    auto(QWEN, dev, measure)
    near = ProblemStats(128, 128, 32768 * 13 // 10, 400, 1536, 2048)  # 1.3x the rows: same class
    auto(near, dev, measure)
    assert len(measure.calls) == 1
    far = ProblemStats(128, 128, 32768 * 8, 2300, 1536, 2048)  # 8x the rows: a new class
    auto(far, dev, measure)
    assert len(measure.calls) == 2
    # On disk, atomically written, readable as a table; a new process reads it back.
    path = at.autotune_path(dev)
    assert path.parent == measuring[0] and path.name == "unknown-gpu-cublas130100-sm90.autotune.json"
    stored = TuningTable.load(path)
    assert (stored.gpu, stored.cublas_version, stored.sm, len(stored.entries)) == (
        "Unknown GPU",
        130100,
        (9, 0),
        2,
    )
    # No temporary file is left; the writers' lock file (<file>.lock) stays by design.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]
    at.reset_measurements()
    fresh = FakeMeasure("sequential")
    assert min(auto(QWEN, dev, fresh).items(), key=lambda kv: kv[1])[0] is Algorithm.CHUNKED_BATCHED
    assert fresh.calls == []


def test_families_do_not_share_measurements(measuring):
    measure, dev = FakeMeasure(), device("Unknown GPU")
    auto(QWEN, dev, measure, family="gmm")
    auto(QWEN, dev, measure, family="layer")
    assert len(measure.calls) == 2


def test_float32_measurements_are_kept_per_compute_precision():
    fp32 = GroupedGemmExecutor(device=0, device_info=device())
    tf32 = GroupedGemmExecutor(device=0, device_info=device(), config={"compute_precision": "tf32"})
    pedantic = GroupedGemmExecutor(device=0, device_info=device(), config={"use_tensor_cores": False})
    f32 = np.dtype(np.float32)
    assert at._family("layer", fp32, f32) == "layer-fp32"
    assert at._family("layer", tf32, f32) == "layer-tf32"
    assert at._family("gmm", pedantic, f32) == "gmm-fp32-pedantic"
    assert at._family("gmm", tf32, np.dtype(np.float16)) == "gmm"


def test_shipped_tables_load_and_record_their_architecture():
    paths = sorted(_tables.SHIPPED_TUNING_DIR.glob("*.json"))
    assert paths
    for path in paths:
        table = TuningTable.load(path)
        assert json.loads(path.read_text())["sm"] == list(table.sm)
        assert (
            path.name == _tables.tuning_table_path(device(table.gpu, table.cublas_version), user=False).name
        )


def test_close_table_covering_the_shape_wins(measuring):
    _, shipped = measuring
    write_table(shipped, "t.json", H100, 130100, [entry(times=times_of("sequential"))])
    measure = FakeMeasure()
    assert auto(QWEN, device(version=130400), measure)[Algorithm.SEQUENTIAL] == 1.0
    assert measure.calls == []
    # The close table has nothing near this shape: measured.
    mixtral = ProblemStats(8, 8, 8192, 1100, 28672, 4096)
    assert auto(mixtral, device(version=130400), measure)[Algorithm.CHUNKED_BATCHED] == 1.0
    assert len(measure.calls) == 1


def test_fallback_table_is_measured_over_unless_measuring_is_off(measuring, monkeypatch):
    _, shipped = measuring
    write_table(shipped, "h100.json", H100, 130100, [entry(times=times_of("sequential"))])
    h200 = device(H200, 130100)
    measure = FakeMeasure()
    assert auto(QWEN, h200, measure)[Algorithm.CHUNKED_BATCHED] == 1.0  # measured, not the H100's
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    other = FakeMeasure()
    # Off: neither measuring nor earlier measurements; the fallback table decides.
    assert auto(QWEN, h200, other)[Algorithm.SEQUENTIAL] == 1.0
    assert other.calls == []
    assert auto(QWEN, device("Unknown GPU", sm=(10, 0)), other) is None  # no table at all: the rules
    assert other.calls == []


@pytest.mark.parametrize("value", ["0", "off", "FALSE", " no "])
def test_environment_switch_off(value, monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", value)
    assert not at.autotune_enabled()


@pytest.mark.parametrize("value", ["1", "on", "True", "yes", ""])
def test_environment_switch_on(value, monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", value)
    assert at.autotune_enabled()


def test_environment_switch_default_on_and_bad_values(monkeypatch):
    monkeypatch.delenv("CUBLAS_GROUPED_AUTOTUNE", raising=False)
    assert at.autotune_enabled()
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match=r"CUBLAS_GROUPED_AUTOTUNE must be 0 or 1 .*; got 'maybe'"):
        at.autotune_enabled()


def test_no_measuring_during_graph_capture(measuring, monkeypatch):
    capturing = [True]
    monkeypatch.setattr(at, "stream_is_capturing", lambda stream: capturing[0])
    measure, dev = FakeMeasure(), device("Unknown GPU")
    before = at.state_token()
    assert auto(QWEN, dev, measure) is None
    assert measure.calls == [] and at.state_token() != before  # put off: memoized choices expire
    capturing[0] = False
    assert auto(QWEN, dev, measure) is not None
    assert len(measure.calls) == 1


def test_capture_status_unknown_counts_as_capturing(monkeypatch):
    def fails(stream):
        raise RuntimeError("cudaErrorStreamCaptureImplicit")

    fake_cupy = types.SimpleNamespace(
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(streamIsCapturing=fails))
    )
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    assert at.stream_is_capturing(7)
    fake_cupy.cuda.runtime.streamIsCapturing = lambda stream: 0
    assert not at.stream_is_capturing(7)
    fake_cupy.cuda.runtime.streamIsCapturing = lambda stream: 1
    assert at.stream_is_capturing(7)


def test_classes_per_process_are_capped(measuring, monkeypatch):
    monkeypatch.setattr(at, "MAX_CLASSES_PER_PROCESS", 1)
    measure, dev = FakeMeasure(), device("Unknown GPU")
    auto(QWEN, dev, measure)
    far = ProblemStats(128, 128, 32768 * 8, 2300, 1536, 2048)
    assert auto(far, dev, measure) is None
    assert len(measure.calls) == 1


def test_shapes_that_cannot_be_measured_are_not_retried(measuring):
    dev = device("Unknown GPU")
    calls = []

    def too_big(stats, candidates):
        calls.append(stats)
        raise at._NotMeasured("needs 9.00 GiB of scratch, over 25% of the 4.0 GiB free")

    assert auto(QWEN, dev, too_big) is None
    assert auto(QWEN, dev, too_big) is None
    assert len(calls) == 1
    text = "\n".join(at.describe_auto(dev))
    assert "1 not measured (needs 9.00 GiB of scratch" in text
    assert not at.autotune_path(dev).exists()  # given-up shapes stay in memory


def test_measuring_errors_warn_once_and_are_not_retried(measuring):
    dev = device("Unknown GPU")

    def broken(stats, candidates):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    with pytest.warns(
        RuntimeWarning, match="AUTO could not measure layer E=128 N=1536 K=2048 .*NOT_SUPPORTED"
    ):
        assert auto(QWEN, dev, broken) is None
    assert auto(QWEN, dev, broken) is None


def test_broken_measurement_file_is_ignored_then_replaced(measuring):
    dev = device("Unknown GPU")
    path = at.autotune_path(dev)
    path.write_text("{half a file")
    measure = FakeMeasure()
    assert auto(QWEN, dev, measure) is not None and len(measure.calls) == 1
    assert len(TuningTable.load(path).entries) == 1


def test_measurements_of_another_device_in_the_file_are_ignored(measuring):
    dev = device("Unknown GPU")
    path = at.autotune_path(dev)
    TuningTable("Another GPU", 130100, [{**entry(), "layout": "layer"}], sm=(9, 0)).save(path)
    measure = FakeMeasure()
    auto(QWEN, dev, measure)
    assert len(measure.calls) == 1


def test_store_merges_with_what_another_process_wrote(measuring):
    dev = device("Unknown GPU")
    measure = FakeMeasure()
    auto(QWEN, dev, measure)
    path = at.autotune_path(dev)
    doc = json.loads(path.read_text())
    other = {**entry(n=4096, k=4096, experts=8, active=8, mean_rows=2048, max_rows=2100), "layout": "layer"}
    doc["entries"].append(other)
    path.write_text(json.dumps(doc))
    far = ProblemStats(128, 128, 32768 * 8, 2300, 1536, 2048)
    auto(far, dev, measure)
    assert len(TuningTable.load(path).entries) == 3


def test_unwritable_store_warns_and_keeps_measurements(measuring, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CUBLAS_GROUPED_TUNING_DIR", str(blocker / "tuning"))  # under a file: cannot mkdir
    dev, measure = device("Unknown GPU"), FakeMeasure()
    with pytest.warns(
        RuntimeWarning, match="could not store its measurements in .*kept for this process only"
    ):
        auto(QWEN, dev, measure)
    auto(QWEN, dev, measure)
    assert len(measure.calls) == 1


def test_padded_strided_not_timed_where_padding_blows_up(measuring):
    measure, dev = FakeMeasure(), device("Unknown GPU")
    with_strided = (*CANDIDATES, Algorithm.PADDED_STRIDED)
    skewed = ProblemStats(128, 128, 32768, 1800, 1536, 2048)  # padding 7x
    at.auto_times(skewed, dev, with_strided, family="layer", measure=measure, stream=7)
    assert Algorithm.PADDED_STRIDED not in measure.calls[0][1]
    even = ProblemStats(64, 64, 16384, 280, 4096, 4096)
    at.auto_times(even, dev, with_strided, family="layer", measure=measure, stream=7)
    assert Algorithm.PADDED_STRIDED in measure.calls[1][1]


def test_scratch_threshold():
    assert at.scratch_fits(1 << 30, 4 << 30)
    assert not at.scratch_fits((1 << 30) + 1, 4 << 30)


def test_describe_auto(measuring, monkeypatch):
    _, shipped = measuring
    write_table(shipped, "h100.json", H100, 130100, [entry()])
    lines = at.describe_auto(device(H200))
    assert lines[0].startswith("AUTO tuning table: shipped table") and "same architecture" in lines[0]
    assert "not close" in lines[1]
    assert lines[2].startswith(
        "AUTO measuring: on (set CUBLAS_GROUPED_AUTOTUNE=0 to turn off); 0 shape classes"
    )
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    assert (
        at.describe_auto(device(H100))[-1]
        == "AUTO measuring: off (CUBLAS_GROUPED_AUTOTUNE=0): tables and rules only"
    )
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "perhaps")
    assert "must be 0 or 1" in at.describe_auto(device(H100))[-1]


# -- the MoE layer's call site ------------------------------------------------------------------------------------
def test_layer_choice_uses_measurements_and_expires_memo_after_capture(measuring, monkeypatch):
    from cublas_grouped.moe.dispatch import choose_algorithms

    capturing = [True]
    monkeypatch.setattr(at, "stream_is_capturing", lambda stream: capturing[0])
    seen = []

    def fake_measure(executor, operands_for, counts, n, k, dtype, candidates):
        seen.append((n, k, candidates))
        if (n, k) == (1536, 2048):  # first GEMM: padded strided alone, chunked as a pair
            return {
                Algorithm.CUBLAS_GROUPED: 1.0,
                Algorithm.SEQUENTIAL: 3.0,
                Algorithm.CHUNKED_BATCHED: 0.9,
                Algorithm.PADDED_STRIDED: 0.8,
            }
        return {
            Algorithm.CUBLAS_GROUPED: 0.3,
            Algorithm.SEQUENTIAL: 2.0,
            Algorithm.CHUNKED_BATCHED: 0.6,
            Algorithm.PADDED_STRIDED: 0.9,
        }

    monkeypatch.setattr(at, "_measure_layer_gemm", fake_measure)
    dev = device("Unknown GPU")
    executor = GroupedGemmExecutor(device=0, device_info=dev)
    counts = np.full(128, 256)
    rules = choose_algorithms(executor, "auto", counts, 1536, 2048, np.float32, (2048, 768))
    assert rules == (Algorithm.CHUNKED_BATCHED, Algorithm.CHUNKED_BATCHED) and seen == []
    capturing[0] = False
    pair = choose_algorithms(executor, "auto", counts, 1536, 2048, np.float32, (2048, 768))
    assert pair == (Algorithm.CHUNKED_BATCHED, Algorithm.CUBLAS_GROUPED)
    assert [s[:2] for s in seen] == [(1536, 2048), (2048, 768)]
    assert choose_algorithms(executor, "auto", counts, 1536, 2048, np.float32, (2048, 768)) == pair
    assert len(seen) == 2  # measured once
    # The first GEMM alone (no second shape given): its own fastest.
    assert choose_algorithms(executor, "auto", counts, 1536, 2048, np.float32)[0] is Algorithm.PADDED_STRIDED


def test_layer_choice_does_not_measure_when_switched_off(measuring, monkeypatch):
    from cublas_grouped.moe.dispatch import choose_algorithms

    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    monkeypatch.setattr(
        at, "_measure_layer_gemm", lambda *a: pytest.fail("measured with CUBLAS_GROUPED_AUTOTUNE=0")
    )
    executor = GroupedGemmExecutor(device=0, device_info=device("Unknown GPU"))
    counts = np.full(8, 1024)
    assert choose_algorithms(executor, "auto", counts, 28672, 4096, np.float32, (4096, 14336)) == (
        Algorithm.SEQUENTIAL,
        Algorithm.SEQUENTIAL,
    )
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="CUBLAS_GROUPED_AUTOTUNE must be 0 or 1"):
        choose_algorithms(executor, "auto", counts, 28672, 4096, np.float32, (4096, 14336))


# -- timing the candidates ----------------------------------------------------------------------------------------
class FakeClock:
    """A stand-in for ``cupy.cuda``: events read a clock that the timed calls advance."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        clock = self

        class Event:
            def record(self, stream=None):
                clock.streams.append(stream)
                self.t = clock.now

            def synchronize(self):
                pass

        self.streams = []
        stream = types.SimpleNamespace(synchronize=lambda: None)
        self.stream = stream
        cuda = types.SimpleNamespace(
            Event=Event, get_current_stream=lambda: None, get_elapsed_time=lambda a, b: b.t - a.t
        )
        monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))


def test_time_candidates_warms_up_and_keeps_to_the_budget(monkeypatch):
    clock = FakeClock(monkeypatch)
    cost = {Algorithm.SEQUENTIAL: 0.1, Algorithm.CUBLAS_GROUPED: 50.0}
    calls = []

    def run(algorithm):
        calls.append(algorithm)
        clock.now += cost[algorithm]

    times = at.time_candidates((Algorithm.SEQUENTIAL, Algorithm.CUBLAS_GROUPED), run, clock.stream)
    assert times == {Algorithm.SEQUENTIAL: pytest.approx(0.1), Algorithm.CUBLAS_GROUPED: pytest.approx(50.0)}
    # Round-robin: a warm-up round, a probe round, then timed rounds; the slow one
    # (50 ms, over the class's 10 ms) holds the rounds to the minimum for both.
    assert calls.count(Algorithm.SEQUENTIAL) == 1 + 1 + at.MIN_TIMED_CALLS
    assert calls.count(Algorithm.CUBLAS_GROUPED) == 1 + 1 + at.MIN_TIMED_CALLS
    assert all(s is clock.stream for s in clock.streams)  # every event on the call's stream


def test_time_candidates_times_round_robin_up_to_the_budget(monkeypatch):
    clock = FakeClock(monkeypatch)
    calls = []

    def run(algorithm):
        calls.append(algorithm)
        clock.now += 0.1

    pair = (Algorithm.SEQUENTIAL, Algorithm.CUBLAS_GROUPED)
    times = at.time_candidates(pair, run, clock.stream)
    assert times == {a: pytest.approx(0.1) for a in pair}
    # Cheap calls: warm-up, probe, then the most timed rounds; no candidate twice in a row
    # within a round, so each round calls both.
    assert (
        calls.count(Algorithm.SEQUENTIAL) == calls.count(Algorithm.CUBLAS_GROUPED) == 2 + at.MAX_TIMED_CALLS
    )
    rounds = [calls[i : i + 2] for i in range(0, len(calls), 2)]
    assert all(sorted(r, key=str) == sorted(pair, key=str) for r in rounds)


def test_time_candidates_leaves_out_failures(monkeypatch):
    clock = FakeClock(monkeypatch)

    def run(algorithm):
        if algorithm is Algorithm.CHUNKED_BATCHED:
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
        clock.now += 1.0

    assert at.time_candidates((Algorithm.SEQUENTIAL, Algorithm.CHUNKED_BATCHED), run, clock.stream) == {
        Algorithm.SEQUENTIAL: 1.0
    }
    with pytest.raises(RuntimeError, match="NOT_SUPPORTED"):
        at.time_candidates((Algorithm.CHUNKED_BATCHED,), run, clock.stream)


def test_select_module_keeps_its_public_names():
    # load_tuning_table is what the chain picked; the path of the exact user table is unchanged.
    dev = device()
    assert _tables.tuning_table_path(dev, user=False).name == "nvidia-h100-80gb-hbm3-cublas130100.json"
