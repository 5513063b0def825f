"""The kernel step's placement (``kernel_step.place_rows``) on the host, its
launchers replaced by recorders: which launches it makes in each form (one
launch at decode sizes, four above or when turned off), and what it passes
them by default and when asked: the gathered rows unless GEMM 1 gathers, the
routing weights only when the rows are weighed (the FP8 step relies on the
defaults), the dropped-pairs counter, the schedule, and the stage marks."""

from __future__ import annotations

import numpy as np
import pytest

from cublas_grouped.gemm.backends import hopper
from cublas_grouped.moe import kernel_step as S
from cublas_grouped.moe import placement_launches as P

E, K = 16, 4


class Arr:
    """A stand-in device array: a shape and an address; row slices keep the address."""

    def __init__(self, shape, ptr):
        self.shape, self.size = tuple(shape), int(np.prod(shape))
        self.data = type("Data", (), {"ptr": ptr})()

    def __getitem__(self, rows):
        assert isinstance(rows, slice) and rows.start is None
        return Arr((min(rows.stop, self.shape[0]), *self.shape[1:]), self.data.ptr)


def _buffers(rows):
    buf = type("Buf", (), {})()
    for n, name in enumerate(("rows", "pair_to_row", "row_to_pair", "row_weights", "block_counts")):
        setattr(buf, name, Arr((rows, 8), 0x1000 * (n + 1)))
    buf.counts, buf.schedule, buf.ticket = Arr((E,), 0x9000), Arr((64,), 0xA000), Arr((1,), 0xD000)
    return buf


class Timer:
    def __init__(self):
        self.names = []

    def mark(self, name, stream):
        self.names.append(name)


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(S, "kernel_arch", lambda res: "sm_90a")

    def recorder(name):
        return lambda *a, **kw: calls.append((name, a, kw))

    for name in (
        "place_one_block",
        "block_histogram",
        "column_scan",
        "histogram_schedule",
        "assign_rows",
        "gather_rows",
    ):
        monkeypatch.setattr(S.K, name, recorder(name))
    # The launches apart (histogram, column scan, offsets kernel) unless a test
    # asks for the histogram with the schedule.
    monkeypatch.setattr(P, "HISTOGRAM_SCHEDULE", False)

    def offsets(res, sizes, e, total_rows, capacity=0, *, storage=None):
        calls.append(("offsets", (sizes.data.ptr, e, total_rows, capacity, storage.data.ptr), {}))
        return Arr((e + 1,), storage.data.ptr)

    monkeypatch.setattr(S.hopper, "schedule_offsets", offsets)
    return calls


def _place(tokens, **kw):
    res = type("Res", (), {"launch_stream": 7, "cupy_stream": None})()
    shape = type("Shape", (), {"num_experts": E})()
    buf = _buffers(tokens * K)
    ids, x = Arr((tokens, K), 0x50000), Arr((tokens, 8), 0x60000)
    timer = Timer()
    out = S.place_rows(res, shape, buf, x, ids, "dropped", timer, **kw)
    return buf, ids, x, timer, out


@pytest.mark.parametrize("one_launch", [True, False])
def test_defaults_gather_the_rows_and_weigh_nothing(recorded, monkeypatch, one_launch):
    monkeypatch.setattr(S, "PLACE_IN_ONE_LAUNCH", one_launch)
    buf, ids, x, timer, (p2r, r2p) = _place(5)
    assert (p2r.data.ptr, r2p.data.ptr, p2r.shape[0], r2p.shape[0]) == (0x2000, 0x3000, 20, 20)
    assert timer.names == ["plan", "gather"]
    names = [c[0] for c in recorded]
    if one_launch:
        assert names == ["place_one_block"]
        _, args, kw = recorded[0]
        assert args[2:7] == (ids, E, None, x, hopper.BLOCK_M)  # ids, E, no weights, x, tile rows
        assert args[7] is buf.counts and args[8] == hopper.schedule_addresses(0xA000, E)
        assert (args[9].data.ptr, args[10].data.ptr) == (0x2000, 0x3000)
        assert kw["row_weights"] is None and kw["dropped"] == "dropped"
        assert (kw["rows"].data.ptr, kw["rows"].shape[0]) == (0x1000, 20)  # gathered: the copy
    else:
        assert names == ["block_histogram", "offsets", "assign_rows", "gather_rows"]
        assert recorded[1][1] == (0x9000, E, 20, 0, 0xA000)  # the counts, M = T*k, contiguous
        kw = recorded[2][2]
        assert kw["weights"] is None and kw["row_weights"] is None and kw["dropped"] == "dropped"
        gather = recorded[3][1]
        assert gather[2] is x and gather[5] == K and (gather[6].data.ptr, gather[6].shape[0]) == (0x1000, 20)
        assert (gather[3].data.ptr, gather[4].data.ptr) == (0x2000, 0x3000)  # pair_to_row, row_to_pair


@pytest.mark.parametrize("one_launch", [True, False])
def test_weighed_rows_and_a_gathering_gemm(recorded, monkeypatch, one_launch):
    """``weigh_rows``: the routing weights in, each row's weight out; ``copy``
    False: no rows gathered (GEMM 1 reads x itself)."""
    monkeypatch.setattr(S, "PLACE_IN_ONE_LAUNCH", one_launch)
    weights = Arr((5, K), 0x70000)
    buf, *_ = _place(5, weights=weights, weigh_rows=True, copy=False)
    if one_launch:
        (_, args, kw), = recorded  # fmt: skip
        assert args[4] is weights and kw["rows"] is None
        assert (kw["row_weights"].data.ptr, kw["row_weights"].shape[0]) == (0x4000, 20)
    else:
        assert [c[0] for c in recorded] == ["block_histogram", "offsets", "assign_rows"]
        kw = recorded[2][2]
        assert kw["weights"] is weights and (kw["row_weights"].data.ptr, kw["row_weights"].shape[0]) == (
            0x4000,
            20,
        )


@pytest.mark.parametrize("one_launch", [True, False])
def test_rows_quantized_by_the_launch_that_gathers_them(recorded, monkeypatch, one_launch):
    """``quantized`` (the FP8 step's codes and scales): the one launch writes
    the gathered rows there as e4m3 (place_one_block_fp8) and no bf16 rows;
    after the four launches, so does the gather (gather_rows_fp8: the codes
    and scales given, no bf16 rows)."""
    monkeypatch.setattr(S, "PLACE_IN_ONE_LAUNCH", one_launch)
    codes, scales = Arr((20, 8), 0xB000), Arr((20, 1), 0xC000)
    _, _, x, timer, _ = _place(5, quantized=(codes, scales))
    assert timer.names == ["plan", "gather"]
    if one_launch:
        ((name, _, kw),) = recorded
        assert name == "place_one_block" and kw["rows"] is None
        assert kw["quantized"] == (codes, scales)
    else:
        assert [c[0] for c in recorded] == ["block_histogram", "offsets", "assign_rows", "gather_rows"]
        gather = recorded[3][1]
        assert gather[2] is x and gather[6] is None and gather[7] == (codes, scales)


@pytest.mark.parametrize("tokens", [5, S.K.PAIRS_PER_BLOCK // K + 1])
def test_the_histogram_with_the_schedule_replaces_three_launches(recorded, monkeypatch, tokens):
    """placement_launches.HISTOGRAM_SCHEDULE (the default): past one launch
    (turned off, or past one block of pairs), the histogram, the column scan
    and the offsets kernel are one launch, expert_histogram_schedule, with the
    buffers and schedule the three took; assign_rows and the gather follow."""
    monkeypatch.setattr(P, "HISTOGRAM_SCHEDULE", True)
    monkeypatch.setattr(S, "PLACE_IN_ONE_LAUNCH", tokens > 5)
    buf, ids, x, timer, _ = _place(tokens)
    pairs = tokens * K
    assert [c[0] for c in recorded] == ["histogram_schedule", "assign_rows", "gather_rows"]
    assert timer.names == ["plan", "gather"]
    args = recorded[0][1]
    assert args[:5] == (7, "sm_90a", ids, pairs, E)
    assert (args[5].data.ptr, args[5].shape[0]) == (0x5000, S.K.num_pair_blocks(pairs))  # block counts
    assert (args[6].data.ptr, args[6].shape[0]) == (0x3000, pairs)  # row_to_pair, reset
    assert args[7] == hopper.BLOCK_M and args[8] is buf.counts
    assert args[9] == hopper.schedule_addresses(0xA000, E) and args[10] is buf.ticket
    assign = recorded[1][1]
    assert assign[5] is args[5] or assign[5].data.ptr == 0x5000  # the bases assign_rows reads
    assert assign[6].data.ptr == 0xA000  # row_offsets: the schedule's first array


def test_more_than_one_block_of_pairs_takes_four_launches(recorded):
    assert S.PLACE_IN_ONE_LAUNCH
    tokens = S.K.PAIRS_PER_BLOCK // K + 1  # one pair past a block
    _place(tokens)
    assert [c[0] for c in recorded] == [
        "block_histogram",
        "column_scan",
        "offsets",
        "assign_rows",
        "gather_rows",
    ]
    # The limits themselves are in: one block of pairs, PLACE_MAX_EXPERTS experts.
    assert S.places_in_one_launch(E, S.K.PAIRS_PER_BLOCK) and not S.places_in_one_launch(
        E, S.K.PAIRS_PER_BLOCK + 1
    )
    assert S.places_in_one_launch(S.K.PLACE_MAX_EXPERTS, 8)
    assert not S.places_in_one_launch(S.K.PLACE_MAX_EXPERTS + 1, 8)


@pytest.mark.parametrize("per_expert", [None, 16])
def test_the_gated_epilogue_only_past_its_rows_per_expert(monkeypatch, per_expert):
    """w1 packed: the epilogue where the experts average more than
    GATED_EPILOGUE_MIN_ROWS_PER_GROUP rows (not at it: with the default 0,
    every step with a pair); never with w1 plain."""
    if per_expert is not None:
        monkeypatch.setattr(S, "GATED_EPILOGUE_MIN_ROWS_PER_GROUP", per_expert)
    rows = S.GATED_EPILOGUE_MIN_ROWS_PER_GROUP * E
    packed = type("Shape", (), {"num_experts": E, "gate_up_block": 128})()
    plain = type("Shape", (), {"num_experts": E, "gate_up_block": 0})()
    assert not S.gated_epilogue(packed, rows) and S.gated_epilogue(packed, rows + 1)
    assert not S.gated_epilogue(plain, rows + 1)
