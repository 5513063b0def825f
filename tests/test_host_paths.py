"""Host-cost shortcuts keep their meaning (CPU): what they skip is only what cannot have changed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cublas_grouped.runtime import device as D


def _res(stream, ws_ptr, handle=0x51):
    res = D.StreamResources(device_id=0, stream=stream, handle=handle)
    res.workspace = SimpleNamespace(data=SimpleNamespace(ptr=ws_ptr), nbytes=1 << 20)
    return res


def test_bind_rebinds_only_when_the_stream_or_workspace_changes(monkeypatch):
    calls = []
    monkeypatch.setattr(D._cublas, "set_stream", lambda h, s: calls.append(("stream", h, s)))
    monkeypatch.setattr(D._cublas, "set_workspace", lambda h, p, n: calls.append(("ws", h, p)))
    monkeypatch.setattr(D, "_bound", {})
    a, b = _res(7, 0x1000), _res(9, 0x2000)
    assert a.bind(1 << 20) == 0x51
    assert calls == [("stream", 0x51, 7), ("ws", 0x51, 0x1000)]
    a.bind(1 << 20)
    assert len(calls) == 2, "same stream and workspace: nothing to do"
    b.bind(1 << 20)  # another stream shares the thread's handle
    assert calls[2:] == [("stream", 0x51, 9), ("ws", 0x51, 0x2000)]
    a.bind(1 << 20)
    assert calls[4:] == [("stream", 0x51, 7), ("ws", 0x51, 0x1000)]
    a.bind(0)  # no workspace wanted: the stream is set again, cuBLAS's pool serves
    assert calls[6:] == [("stream", 0x51, 7)]
    other = _res(7, 0x1000, handle=0x52)  # another thread's handle on the same stream
    other.bind(1 << 20)
    assert calls[7:] == [("stream", 0x52, 7), ("ws", 0x52, 0x1000)]


def test_a_failed_bind_is_retried(monkeypatch):
    state = {"fail": True}

    def set_stream(h, s):
        if state["fail"]:
            raise RuntimeError("cublasSetStream failed")

    ws = []
    monkeypatch.setattr(D._cublas, "set_stream", set_stream)
    monkeypatch.setattr(D._cublas, "set_workspace", lambda h, p, n: ws.append(p))
    monkeypatch.setattr(D, "_bound", {})
    res = _res(7, 0x1000)
    try:
        res.bind(1 << 20)
    except RuntimeError:
        pass
    state["fail"] = False
    res.bind(1 << 20)
    assert ws == [0x1000], "after a failure the binding is done again, not assumed"


def _layer_times(calls, answer):
    def times(stats, candidates):
        calls.append((stats.n, stats.k, stats.total_rows, stats.max_rows))
        return {a: answer.get(a.value, 1.0) for a in candidates}

    return times


def test_layer_choice_is_remembered_for_exactly_these_sizes(monkeypatch):
    import numpy as np

    from cublas_grouped.gemm import select as S
    from cublas_grouped.gemm.config import Algorithm

    info = D.DeviceInfo(sm=(9, 0), cublas_version=130100, name="fake H100")
    S.reset_tuning_cache()
    calls = []
    times = _layer_times(calls, {"sequential": 0.5})
    sizes = np.array([30, 0, 50, 80], dtype=np.int64)  # 53 rows per active expert
    pick = S.choose_layer_algorithms(
        sizes, (512, 256), (256, 256), "bfloat16", info, times=times, times_key=1
    )
    assert pick == (Algorithm.SEQUENTIAL, Algorithm.SEQUENTIAL) and len(calls) == 2
    again = S.choose_layer_algorithms(
        sizes.copy(), (512, 256), (256, 256), "bfloat16", info, times=times, times_key=1
    )
    assert again == pick and len(calls) == 2, "same sizes and shapes: remembered"
    faster_grouped = _layer_times(calls, {"cublas_grouped": 0.1})
    # Every input of the choice is part of the key: a change asks the times again.
    for args, key in (
        ((np.array([300, 0, 500, 810]), (512, 256), (256, 256), "bfloat16"), 1),  # other sizes
        ((sizes, (512, 256), (256, 256), "bfloat16"), 2),  # new measurements
        ((sizes, (512, 128), (256, 256), "bfloat16"), 1),  # other first GEMM
        ((sizes, (512, 256), (256, 128), "bfloat16"), 1),  # other second GEMM
        ((sizes, (512, 256), (256, 256), "float16"), 1),  # other dtype
    ):
        before = len(calls)
        S.choose_layer_algorithms(*args, info, times=faster_grouped, times_key=key)
        assert len(calls) > before, (args, key)
    monkeypatch.setenv("CUBLAS_GROUPED_TUNING_DIR", "/elsewhere")  # another tuning folder
    before = len(calls)
    got = S.choose_layer_algorithms(
        sizes, (512, 256), (256, 256), "bfloat16", info, times=faster_grouped, times_key=1
    )
    assert len(calls) > before and got[0] is Algorithm.CUBLAS_GROUPED
    S.reset_tuning_cache()
    before = len(calls)
    S.choose_layer_algorithms(sizes, (512, 256), (256, 256), "bfloat16", info, times=times, times_key=1)
    assert len(calls) > before, "reset_tuning_cache forgets"
    S.reset_tuning_cache()


def test_remembered_stays_bounded(monkeypatch):
    from cublas_grouped.gemm import select as S

    monkeypatch.setattr(S, "MAX_REMEMBERED", 3)
    S.reset_tuning_cache()
    for i in range(10):
        assert S.remembered(("k", i), lambda i=i: i * 2) == i * 2
        assert len(S._exact_choices) <= 3
    assert S.remembered(("k", 9), lambda: "not called") == 18
    S.reset_tuning_cache()


def test_grouped_call_arrays_are_reused_but_always_current():
    import ctypes

    import numpy as np

    from cublas_grouped.gemm.backends import cublas as B
    from cublas_grouped.gemm.plan import GemmPlan

    def read(address, count, ctype=ctypes.c_int32):
        return list((ctype * count).from_address(address))

    for trans_a, trans_b in ((False, False), (False, True), (True, False)):
        plan = GemmPlan(
            4, 12, 64, 32, trans_a, trans_b, np.zeros(4, np.int64), np.zeros(5, np.int64), np.arange(3)
        )
        for rows in (np.array([5, 1, 6]), np.array([2, 9, 1]), np.array([7, 7, 7])):
            got = B._group_arrays(plan, rows)
            want = plan.dims_arrays(rows)
            for name, values in want.items():
                assert read(got[name], 3) == values.tolist(), (trans_a, trans_b, name)
            assert read(got["group_size"], 3) == [1, 1, 1]
            assert read(got["alpha"], 3, ctypes.c_float) == [1.0] * 3
            assert read(got["beta"], 3, ctypes.c_float) == [0.0] * 3


def test_weight_bound_layers_take_one_grouped_call_per_gemm():
    import numpy as np

    from cublas_grouped.gemm import select as S
    from cublas_grouped.gemm.config import Algorithm

    S.reset_tuning_cache()
    asked = []
    times = _layer_times(asked, {"sequential": 0.01})  # the tables would say SEQUENTIAL
    h100 = D.DeviceInfo(sm=(9, 0), cublas_version=130100, name="fake H100")
    limit = S.WEIGHT_BOUND_ROWS
    for sizes in ([limit] * 8, [1, 0, 0, 0, 0, 0, 0, 0], [limit, 0] * 4, [3, 40, 0, 5] * 2):
        sizes = np.array(sizes)
        got = S.choose_layer_algorithms(sizes, (512, 256), (256, 256), "bfloat16", h100, times=times)
        assert got == (Algorithm.CUBLAS_GROUPED, Algorithm.CUBLAS_GROUPED), sizes
    assert asked == []
    above = np.array([limit + 1] * 8)
    got = S.choose_layer_algorithms(above, (512, 256), (256, 256), "bfloat16", h100, times=times)
    assert got[0] is Algorithm.SEQUENTIAL and asked, "above the limit the times decide"
    old = D.DeviceInfo(sm=(8, 0), cublas_version=120400, name="fake A100, old cuBLAS")
    got = S.choose_layer_algorithms(
        np.array([limit] * 8), (512, 256), (256, 256), "bfloat16", old, times=times
    )
    assert Algorithm.CUBLAS_GROUPED not in got, "no grouped GEMM before cuBLAS 12.5"
    S.reset_tuning_cache()


def test_timing_keeps_the_collector_off_only_while_timing():
    import gc

    from cublas_grouped.runtime.timing import no_garbage_collection

    assert gc.isenabled()
    with no_garbage_collection():
        assert not gc.isenabled()
    assert gc.isenabled()
    try:
        with no_garbage_collection():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.isenabled(), "restored after an exception"
    gc.disable()
    try:
        with no_garbage_collection():
            pass
        assert not gc.isenabled(), "a caller's disabled collector stays disabled"
    finally:
        gc.enable()


def test_layer_pair_is_remembered_per_exact_inputs(monkeypatch):
    import numpy as np

    from cublas_grouped.gemm import select as S
    from cublas_grouped.gemm.config import Algorithm, GroupedGemmConfig
    from cublas_grouped.gemm.executor import GroupedGemmExecutor
    from cublas_grouped.moe import dispatch

    info = D.DeviceInfo(sm=(9, 0), cublas_version=130100, name="fake H100")
    asked = []

    def layer_times(executor, device, operands_for, counts, dtype):
        asked.append(counts.tolist())
        return (lambda stats, candidates: {a: 1.0 for a in candidates}), ("token",)

    monkeypatch.setattr(dispatch, "layer_times", layer_times)
    S.reset_tuning_cache()
    auto = GroupedGemmExecutor(device_info=info)
    counts = np.array([300, 0, 500, 810], dtype=np.int64)
    first = dispatch.choose_algorithms(auto, "auto", counts, 512, 256, "bfloat16", (256, 256))
    again = dispatch.choose_algorithms(auto, "auto", counts.copy(), 512, 256, "bfloat16", [256, 256])
    assert first == again and len(asked) == 1, "same inputs: remembered"
    for args in (
        (np.array([300, 0, 500, 811]), 512, 256, "bfloat16", (256, 256)),
        (counts.astype(np.int32), 512, 256, "bfloat16", (256, 256)),
        (counts, 512, 128, "bfloat16", (256, 256)),
        (counts, 512, 256, "float16", (256, 256)),
        (counts, 512, 256, "bfloat16", (256, 128)),
        (counts, 512, 256, "bfloat16", None),
    ):
        before = len(asked)
        dispatch.choose_algorithms(auto, "auto", *args)
        assert len(asked) == before + 1, args
    other = GroupedGemmExecutor(device_info=info, config=GroupedGemmConfig(chunk_rows=64))
    before = len(asked)
    dispatch.choose_algorithms(other, "auto", counts, 512, 256, "bfloat16", (256, 256))
    assert len(asked) == before + 1, "another executor configuration decides anew"
    fixed = dispatch.choose_algorithms(auto, "sequential", counts, 512, 256, "bfloat16", (256, 256))
    assert fixed == (Algorithm.SEQUENTIAL, Algorithm.SEQUENTIAL)
    S.reset_tuning_cache()


def test_layer_choice_passes_on_the_calls_device_dtype_and_operands(monkeypatch):
    # Pins what AUTO's layer choice hands on: layer_times gets the real
    # Operands.for_plan and the call's dtype, the times source sees stats of
    # that dtype, and each GEMM's fallback is asked about the call's device.
    import numpy as np

    from cublas_grouped.gemm import select as S
    from cublas_grouped.gemm.config import Algorithm
    from cublas_grouped.gemm.executor import GroupedGemmExecutor
    from cublas_grouped.gemm.plan import Operands
    from cublas_grouped.moe import dispatch

    seen, fallbacks = [], []

    def layer_times(executor, device, operands_for, counts, dtype):
        seen.append(("layer_times", operands_for, dtype))

        def times(stats, candidates):
            seen.append(("stats", stats.dtype))
            return {a: (0.5 if a is Algorithm.CUBLAS_GROUPED else 1.0) for a in candidates}

        return times, ("token",)

    class Spy(GroupedGemmExecutor):
        def info_for(self, device_id=None):
            fallbacks.append(("info", device_id))
            return super().info_for(device_id)

        def fallback(self, algorithm, device_id=None):
            fallbacks.append((algorithm, device_id))
            return super().fallback(algorithm, device_id)

    monkeypatch.setattr(dispatch, "layer_times", layer_times)
    spy = Spy(device_info=D.DeviceInfo(sm=(9, 0), cublas_version=130100, name="fake H100"))
    counts = np.array([300, 0, 500, 812], dtype=np.int64)
    for second in ((256, 256), None):
        S.reset_tuning_cache()
        seen.clear()
        fallbacks.clear()
        pair = dispatch.choose_algorithms(spy, "auto", counts, 512, 256, "float16", second, device_id=3)
        assert seen[0] == ("layer_times", Operands.for_plan, "float16"), second
        assert seen[1:] and all(s == ("stats", "float16") for s in seen[1:]), seen
        assert pair == (Algorithm.CUBLAS_GROUPED, Algorithm.CUBLAS_GROUPED), second
        assert all(device == 3 for _, device in fallbacks), fallbacks
        assert [a for a, _ in fallbacks if a != "info"] == [Algorithm.CUBLAS_GROUPED] * 2, second
    S.reset_tuning_cache()
    with pytest.raises(ValueError, match="^algorithm must be one of"):
        dispatch.choose_algorithms(spy, "fastest", counts, 512, 256, "float16", None, device_id=3)


def test_layer_choice_memo_serves_loads_in_the_same_buckets():
    # Pins the coarse memo under the exact one: a load one row away from a
    # decided one (same experts, mean rows and skew in quarter steps) takes
    # the stored decision without asking the times again.
    import numpy as np

    from cublas_grouped.gemm import select as S
    from cublas_grouped.gemm.config import Algorithm

    info = D.DeviceInfo(sm=(9, 0), cublas_version=130100, name="fake H100")
    S.reset_tuning_cache()
    calls = []
    times = _layer_times(calls, {"chunked_batched": 0.5})
    sizes = np.full(64, 800, dtype=np.int64)
    shapes = ((512, 256), (256, 256), "bfloat16", info)
    pick = S.choose_layer_algorithms(sizes, *shapes, times=times, times_key=1)
    assert pick == (Algorithm.CHUNKED_BATCHED, Algorithm.CHUNKED_BATCHED) and len(calls) == 2
    near = sizes.copy()
    near[5] = 801
    assert S.choose_layer_algorithms(near, *shapes, times=times, times_key=1) == pick
    assert len(calls) == 2, "same buckets: the memo answers"
    S.reset_tuning_cache()
