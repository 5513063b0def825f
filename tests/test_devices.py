"""Several GPUs in one process, faked on the CPU: every capability check, kernel
architecture and tuning-table lookup uses the device of the call, never the
device that happened to be used first."""

from __future__ import annotations

from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from cublas_grouped import Algorithm, DeviceInfo, GroupedGemmExecutor
from cublas_grouped.gemm import executor as _executor
from cublas_grouped.gemm.plan import Operands, RowLayout
from cublas_grouped.gemm.pointers import build_pointers
from cublas_grouped.moe.checks import kernel_arch
from cublas_grouped.moe.dispatch import choose_algorithms, wait_for_plan
from cublas_grouped.runtime import cublas as _cublas
from cublas_grouped.runtime import device as _device

# Two GPUs that differ in everything the library looks at.
FAKE = {
    0: DeviceInfo(sm=(9, 0), cublas_version=130100, name="fake H100", multiprocessors=132, device_id=0),
    1: DeviceInfo(sm=(7, 5), cublas_version=130100, name="fake T4", multiprocessors=40, device_id=1),
}


class _Stop(Exception):
    """Raised by a stand-in where GPU work would start."""


@pytest.fixture
def two_gpus(monkeypatch):
    """Fake devices 0 and 1; ``current[0]`` is CuPy's current device."""
    current = [0]
    monkeypatch.setattr(_device, "current_device", lambda: current[0])
    monkeypatch.setattr(
        _device, "device_info", lambda device_id=None: FAKE[current[0] if device_id is None else device_id]
    )
    return current


def _stop_at_gpu_work(monkeypatch):
    """Make ``execute`` stop, recording the device, where its GPU work begins."""
    seen = []

    def resources(device_id, stream):
        seen.append(device_id)
        raise _Stop

    monkeypatch.setattr(_executor, "resources", resources)
    return seen


def test_device_info_is_cached_per_ordinal_not_under_none(monkeypatch):
    from cublas_grouped.runtime import deps as _deps

    props = {
        0: {"name": b"fake H100", "major": 9, "minor": 0, "multiProcessorCount": 132},
        1: {"name": "fake T4", "major": 7, "minor": 5, "multiProcessorCount": 40},
    }
    queried = []

    def get_properties(device_id):
        queried.append(device_id)
        return props[device_id]

    current = [0]
    fake_cupy = SimpleNamespace(
        cuda=SimpleNamespace(runtime=SimpleNamespace(getDeviceProperties=get_properties))
    )
    monkeypatch.setattr(_deps, "cupy_on_gpu", lambda: fake_cupy)
    monkeypatch.setattr(_cublas, "version", lambda: 130100)
    monkeypatch.setattr(_device, "current_device", lambda: current[0])
    _device._query_device.cache_clear()
    try:
        assert _device.device_info() == FAKE[0]
        current[0] = 1
        assert _device.device_info() == FAKE[1]
        assert _device.device_info(0) == FAKE[0]
        current[0] = 0
        assert _device.device_info(None) == FAKE[0]
        assert queried == [0, 1]  # one query per ordinal
    finally:
        _device._query_device.cache_clear()  # drop the fakes


def test_executor_without_device_follows_the_current_device(two_gpus):
    executor = GroupedGemmExecutor()
    assert executor.device_info.name == "fake H100" and executor.device_id == 0
    two_gpus[0] = 1
    assert executor.device_info.name == "fake T4" and executor.device_id == 1
    assert executor.info_for(0).name == "fake H100"
    # An executor bound to a device keeps it, whichever device is current.
    assert GroupedGemmExecutor(device=0).device_info.name == "fake H100"


def test_faked_capabilities_serve_every_device(monkeypatch):
    def no_gpu():
        raise AssertionError("a faked executor must not query the GPU")

    monkeypatch.setattr(_device, "current_device", no_gpu)
    monkeypatch.setattr(_device, "device_info", lambda device_id=None: no_gpu())
    executor = GroupedGemmExecutor(device_info=FAKE[1])
    assert executor.info_for(0) is FAKE[1] and executor.device_info is FAKE[1]
    assert executor.device_id == 1


def test_bfloat16_check_uses_the_arrays_device(fake, two_gpus, monkeypatch):
    seen = _stop_at_gpu_work(monkeypatch)
    executor = GroupedGemmExecutor()
    bf16 = ml_dtypes.bfloat16
    # Device 0 (SM 9.0) first: the checks pass and the work goes to device 0.
    with pytest.raises(_Stop):
        executor.execute(fake((4, 8), bf16), fake((2, 8, 16), bf16), [2, 2], stream=7)
    # Then device 1 (SM 7.5), although device 0 is still current.
    with pytest.raises(ValueError, match=r"bfloat16 needs SM 8.0 or newer; device 1 is SM 7.5"):
        executor.execute(fake((4, 8), bf16, device=1), fake((2, 8, 16), bf16, device=1), [2, 2], stream=7)
    # float32 on device 1 passes and runs there.
    with pytest.raises(_Stop):
        executor.execute(fake((4, 8), device=1), fake((2, 8, 16), device=1), [2, 2], stream=7)
    assert seen == [0, 1]


def test_algorithm_choice_reads_the_calls_device(two_gpus, monkeypatch):
    names = []

    def select(stats, device, **kwargs):
        names.append(device.name)
        return Algorithm.SEQUENTIAL

    monkeypatch.setattr(_executor, "select_algorithm", select)
    executor = GroupedGemmExecutor()
    executor.select_algorithm(4096, 8)
    two_gpus[0] = 1
    executor.select_algorithm(4096, 8)
    two_gpus[0] = 0
    executor.select_algorithm(4096, 8, device=1)
    assert names == ["fake H100", "fake T4", "fake T4"]


def test_fallback_reads_the_calls_device(two_gpus, monkeypatch):
    old = DeviceInfo(sm=(8, 0), cublas_version=120400, name="fake A100, old cuBLAS", device_id=1)
    monkeypatch.setitem(FAKE, 1, old)
    monkeypatch.setattr(_executor, "_warned", set())  # warned once per process: start afresh, leave no trace
    executor = GroupedGemmExecutor()
    assert executor.fallback(Algorithm.CUBLAS_GROUPED, 0) is Algorithm.CUBLAS_GROUPED
    with pytest.warns(RuntimeWarning, match="needs cuBLAS >= 12.5 but 120400"):
        assert executor.fallback(Algorithm.CUBLAS_GROUPED, 1) is Algorithm.SEQUENTIAL
    assert not executor.supports_grouped_gemm(1) and executor.supports_grouped_gemm(0)
    # The MoE layer's choice of a fixed algorithm falls back on the layer's device only.
    counts = np.full(8, 64)
    grouped, sequential = Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL
    assert (
        choose_algorithms(executor, "cublas_grouped", counts, 64, 64, np.float32, device_id=0)
        == (grouped,) * 2
    )
    assert (
        choose_algorithms(executor, "cublas_grouped", counts, 64, 64, np.float32, device_id=1)
        == (sequential,) * 2
    )


def test_kernel_architecture_is_the_streams_device(two_gpus, monkeypatch):
    from cublas_grouped.runtime import nvrtc as _kernels

    archs = []

    def get_kernel(name, kernel, arch, **defines):
        archs.append(arch)
        raise _Stop

    monkeypatch.setattr(_kernels, "get_kernel", get_kernel)
    from cublas_grouped.gemm import pointers as _pointers

    monkeypatch.setattr(_pointers, "_kernel_for", {})  # kernels found earlier in this process
    buffer = SimpleNamespace(data=SimpleNamespace(ptr=0x7F0000000000))
    for device_id in (0, 1):
        res = SimpleNamespace(device_id=device_id, buffer=lambda name, nbytes: buffer)
        with pytest.raises(_Stop):
            build_pointers(
                res, None, Operands(0, 0, 0, 0, 0, 0, 0, 0, 0), RowLayout.contiguous(), num_problems=1
            )
        assert kernel_arch(res) == archs[-1]
    assert archs == ["sm_90", "sm_75"]


def test_resolve_stream_none_is_the_devices_current_stream(monkeypatch):
    import cupy

    asked = []

    def get_current_stream(device_id=-1):
        asked.append(device_id)
        return SimpleNamespace(ptr=100 + device_id)

    monkeypatch.setattr(cupy.cuda, "get_current_stream", get_current_stream)
    assert _device.resolve_stream(None, 1) == 101
    assert _device.resolve_stream(None) == 99
    assert _device.resolve_stream(5, 1) == 5
    assert asked == [1, -1]


def test_step_by_step_waits_only_across_streams():
    waited = []
    stream = SimpleNamespace(wait_event=waited.append)
    inp = SimpleNamespace(ready="event", stream=7)
    wait_for_plan(inp, SimpleNamespace(stream=7, cupy_stream=stream))
    assert waited == []
    wait_for_plan(inp, SimpleNamespace(stream=9, cupy_stream=stream))
    assert waited == ["event"]
    # An input built by hand (no event) is the caller's to order.
    wait_for_plan(SimpleNamespace(ready=None, stream=7), SimpleNamespace(stream=9, cupy_stream=stream))
    assert waited == ["event"]
