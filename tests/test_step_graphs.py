"""The graph replay of eager fixed-capacity steps falls back to launching (CPU, with stand-ins):
no room for the capture stream's workspace keeps one call eager; a failed capture
turns the layer's graphs off with a warning; a captured step is replayed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cublas_grouped.moe import step_graphs as SG


class _Stream:
    ptr = 7

    def __init__(self, fail=None):
        self.fail, self.captures = fail, 0

    def begin_capture(self):
        if self.fail:
            raise RuntimeError(self.fail)
        self.captures += 1

    def end_capture(self):
        launches = []
        return SimpleNamespace(launches=launches, launch=launches.append)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Resources:
    def __init__(self, bind_error=None):
        self.bind_error, self.cupy_stream = bind_error, "caller-stream"

    def bind(self, nbytes):
        if self.bind_error:
            raise self.bind_error


CALLER = _Resources()


def _graphs(monkeypatch, stream, private):
    steps = []
    graphs = SG.StepGraphs(lambda res, *a: steps.append(res), 8, 4, 2, np.float32, 0, 1 << 20)
    graphs._inputs = (np.zeros((8, 4), np.float32), np.zeros((8, 2), np.int32), np.zeros((8, 2), np.float32))
    monkeypatch.setattr(SG, "_copy", lambda dst, src, res: dst.__setitem__(..., src))
    monkeypatch.setattr(SG, "_capture_stream", lambda device_id: stream)
    call = lambda t: graphs.step(CALLER, lambda h: private, np.ones((t, 4), np.float32),  # noqa: E731
                                 np.ones((t, 2), np.int32), None, None)  # fmt: skip
    return graphs, steps, call


def test_no_room_for_the_workspace_keeps_the_call_eager_and_tries_again(monkeypatch):
    private = _Resources(bind_error=MemoryError("no room"))
    graphs, steps, call = _graphs(monkeypatch, _Stream(), private)
    call(3)
    call(3)
    assert steps == [CALLER, CALLER], "each call ran its step eagerly on the caller's stream"
    assert not graphs._graphs and not graphs._disabled
    private.bind_error = None
    call(3)  # room now: this call's step runs eagerly, then it is captured
    assert steps[2:] == [CALLER, private] and (3, False) in graphs._graphs
    call(3)  # replayed on the caller's stream: no step launched
    assert len(steps) == 4 and graphs._graphs[(3, False)].launches == ["caller-stream"]


def test_a_failed_capture_turns_graphs_off_with_a_warning(monkeypatch):
    graphs, steps, call = _graphs(monkeypatch, _Stream(fail="capture refused"), _Resources())
    with pytest.warns(RuntimeWarning, match=r"could not capture its step \(RuntimeError: capture refused\)"):
        call(2)
    assert graphs._disabled and not graphs._graphs and steps == [CALLER]
    call(2)  # no second attempt: launched eagerly
    assert steps == [CALLER, CALLER]


def test_inputs_are_copied_into_the_layers_buffers(monkeypatch):
    graphs, _, call = _graphs(monkeypatch, _Stream(), _Resources())
    call(5)
    x, ids, _ = graphs._inputs
    assert (x[:5] == 1).all() and (x[5:] == 0).all() and (ids[:5] == 1).all()
