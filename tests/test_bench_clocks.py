"""The benchmark's SM clock sampling (cublas_grouped/tools/bench/clocks.py) on
the CPU: an NVML stand-in read by the sampling thread, the summary, the lines
printed per case and section, nothing sampled without NVML, and the runner
attaching each section's clock to its results on the fake GPU."""

from __future__ import annotations

import ctypes
import time

from test_bench_cpu import _run_on_fake_gpu

from cublas_grouped.tools.bench import clocks, section
from cublas_grouped.tools.bench.report import Result


class FakeNvml:
    """NVML's two reads: SM clocks and power from the lists given, in turn
    (the last repeated); ``fail`` makes the clock read fail."""

    def __init__(self, mhz, milliwatts, fail=False):
        self.mhz, self.milliwatts, self.fail, self.reads = list(mhz), list(milliwatts), fail, 0

    def nvmlDeviceGetClockInfo(self, device, clock_type, out):  # noqa: N802 (NVML's name)
        assert device == "dev" and clock_type == 1  # NVML_CLOCK_SM
        if self.fail:
            return 3  # NVML_ERROR_NOT_SUPPORTED
        out._obj.value = self.mhz[min(self.reads, len(self.mhz) - 1)]
        self.reads += 1
        return 0

    def nvmlDeviceGetPowerUsage(self, device, out):  # noqa: N802
        out._obj.value = self.milliwatts[min(self.reads - 1, len(self.milliwatts) - 1)]
        return 0


def test_reads_and_summary():
    sampler = clocks.ClockSampler(
        None, lib=FakeNvml([1980, 1400, 1410], [300000, 690000, 700000]), device="dev"
    )
    assert sampler.available
    got = [sampler.read() for _ in range(3)]
    assert got == [(1980, 300.0), (1400, 690.0), (1410, 700.0)]
    summary = clocks.summarize(got)
    assert summary == {"sm_mhz": 1410, "sm_mhz_min": 1400, "power_w": 690.0, "samples": 3}
    assert clocks.summarize([]) is None
    assert clocks.summarize([(1500, None)])["power_w"] is None


def test_the_thread_samples_while_the_block_runs():
    lib = FakeNvml([1700], [650000])
    sampler = clocks.ClockSampler(None, lib=lib, device="dev")
    with sampler.sampling(period_s=0.001) as samples:
        time.sleep(0.05)
    taken = len(samples)
    assert taken >= 2 and samples[0] == (1700, 650.0)
    time.sleep(0.01)
    assert len(samples) == taken  # the thread stopped with the block


def test_nothing_is_sampled_without_nvml():
    for sampler in (
        clocks.ClockSampler(None),
        clocks.ClockSampler(None, lib=FakeNvml([1], [1], fail=True), device="dev"),
    ):
        with sampler.sampling(period_s=0.001) as samples:
            time.sleep(0.01)
        assert samples == [] and clocks.summarize(samples) is None


def test_nvml_is_opened_by_pci_bus_id(monkeypatch):
    calls = []

    class Lib:
        def nvmlInit_v2(self):  # noqa: N802
            calls.append("init")
            return 0

        def nvmlDeviceGetHandleByPciBusId_v2(self, bus, handle):  # noqa: N802
            calls.append(bus)
            return 0 if bus == b"0000:18:00.0" else 13  # NVML_ERROR_NOT_FOUND

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Lib())
    assert clocks.ClockSampler("0000:18:00.0").available
    assert not clocks.ClockSampler("0000:99:00.0").available
    assert calls == ["init", b"0000:18:00.0", "init", b"0000:99:00.0"]

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert not clocks.ClockSampler("0000:18:00.0").available


def _r(case, section, clock=None, error=None):
    extra = {"clock": clock} if clock else {}
    return Result(case, "m", 16, "uniform", "decode", section, "x", ms=1.0, error=error, extra=extra)


def test_format_clocks():
    hot = {"sm_mhz": 1410, "sm_mhz_min": 930, "power_w": 687.4, "samples": 45}
    cold = {"sm_mhz": 1980, "sm_mhz_min": 1980, "power_w": None, "samples": 3}
    results = [
        _r("a/T16", "gemm1", cold),
        _r("a/T16", "gemm1", hot),  # the section's first result speaks for it
        _r("a/T16", "layer", hot),
        _r("a/T16", "graph", hot, error="RuntimeError: capture"),  # failed rows carry no clock
        _r("b/T64", "layer"),
    ]
    text = clocks.format_clocks(results)
    assert text.splitlines() == [
        "SM clock while timed (NVML: median MHz, lowest in brackets, median power), per case and section:",
        "  a/T16: gemm1 1980 (1980); layer 1410 (930) 687 W",
    ]
    assert clocks.format_clocks([_r("b/T64", "layer")]) == ""


def test_the_runner_attaches_each_sections_clock(monkeypatch):
    """On the fake GPU with an NVML stand-in, every timed result carries the
    clock its section was timed at; with none, no result does."""
    sampler = clocks.ClockSampler(None, lib=FakeNvml([1600], [500000]), device="dev")
    monkeypatch.setattr(section, "_clock_sampler", lambda: sampler)
    _, _, results, _ = _run_on_fake_gpu(monkeypatch, "16")
    timed = [r for r in results if r.error is None and r.ms is not None and r.section != "split"]
    assert timed and all(r.extra["clock"]["sm_mhz"] == 1600 for r in timed), [
        (r.section, r.method, r.extra) for r in timed if "clock" not in r.extra
    ]
    assert "gemm1 1600 (1600) 500 W" in clocks.format_clocks(results)
    monkeypatch.setattr(section, "_clock_sampler", lambda: clocks.ClockSampler(None))
    _, _, results, _ = _run_on_fake_gpu(monkeypatch, "16")
    assert not any("clock" in r.extra for r in results)
