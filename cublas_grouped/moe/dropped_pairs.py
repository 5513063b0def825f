"""Expert ids outside [0, E) on ``moe_forward``'s sync-free default path.

On SM 9.0, where the Hopper kernel step takes the default (synchronizing-free)
path, a (token, expert) pair whose id is outside [0, E) takes no row and adds
nothing; the placement kernels count such pairs on the device. Reading that
count at the end of every call would make every call wait for the GPU (on an
H200 that cost Qwen3-30B-A3B's layer at 4096 tokens 16% of its time: the
host's work for the next call, about 0.15 ms there, then runs while the GPU
idles; docs/benchmarks.md). So the count is kept per stream and read without
waiting:

- the device counter (8 bytes, one per (device, thread, stream), zeroed once)
  accumulates across calls;
- each call queues an 8-byte copy of it into pinned host memory behind its
  step (``cudaMemcpyAsync``: no wait, and capturable in a CUDA graph);
- each call first reads that pinned copy, a plain host read: if it shows
  pairs not reported yet, the call waits for the stream, reads the exact
  count, zeroes both counters and raises ``ValueError`` before any GPU work
  of its own. So an earlier call's bad ids raise at the first later call
  that finds the copy landed, or at once through :func:`check_expert_ids`,
  which waits for the stream (the cheap explicit check).

The error names the count and the layers' expert counts it came from; the
outputs of the calls that held bad ids were new arrays, with the bad pairs
left out.
"""

from __future__ import annotations

__all__ = ["DROPPED_PAIRS_KEY", "StreamDroppedPairs", "stream_dropped_pairs", "check_expert_ids"]

# The key of a stream's StreamDroppedPairs in its StreamResources.buffers.
DROPPED_PAIRS_KEY = "moe-dropped-pairs-state"


class StreamDroppedPairs:
    """The dropped-pairs count of one stream's default-path calls (the
    module docstring): ``device`` (a uint64 [1] CuPy array the kernels add
    to), its pinned host mirror, and the expert counts E of the calls that
    may have added to it since the last report."""

    __slots__ = ("device", "pinned", "host", "experts")

    def __init__(self, res):
        import cupy
        import numpy as np

        # Zeroed once, on the current stream (res's: the caller made it current); it then accumulates.
        self.device = cupy.zeros((1,), dtype=cupy.uint64)
        self.pinned = cupy.cuda.alloc_pinned_memory(8)
        self.host = np.frombuffer(self.pinned, dtype=np.uint64, count=1)
        self.host[0] = 0
        self.experts: set[int] = set()

    def publish(self, res, num_experts: int) -> None:
        """Queue the copy of the running count to the pinned mirror behind the
        work just queued on ``res``'s stream (a call over ``num_experts``)."""
        import cupy

        if num_experts not in self.experts:  # no call when it is there (hot-path budget)
            self.experts.add(num_experts)
        cupy.cuda.runtime.memcpyAsync(
            self.pinned.ptr, self.device.data.ptr, 8, cupy.cuda.runtime.memcpyDeviceToHost, res.stream
        )

    def report(self, res, before_call: bool = False) -> None:
        """Wait for ``res``'s stream, then raise ``ValueError`` if any pair was
        dropped since the last report (both counts zeroed first). Inside a
        graph capture it does not wait (the capture forbids it) and raises on
        the mirror as read."""
        import cupy

        capturing = cupy.cuda.runtime.streamIsCapturing(res.stream) != 0
        if not capturing:
            res.cupy_stream.synchronize()  # every queued copy has landed
        count = int(self.host[0])
        if not count:
            return
        experts = ", ".join(str(e) for e in sorted(self.experts)) or "?"
        if not capturing:
            cupy.cuda.runtime.memsetAsync(self.device.data.ptr, 0, 8, res.stream)
            self.host[0] = 0
            self.experts.clear()
        where = (
            "earlier moe_forward calls on this stream" if before_call else "moe_forward calls on this stream"
        )
        raise ValueError(
            f"topk_ids held {count} ids outside [0, E) in {where} (E of the layers called since the "
            f"last report: {experts}): those pairs added "
            "nothing to their tokens (found without a sync; cublas_grouped.check_expert_ids() waits "
            "and checks at once)"
        )


def stream_dropped_pairs(res) -> StreamDroppedPairs:
    """``res``'s :class:`StreamDroppedPairs`, made at the first call."""
    state = res.buffers.get(DROPPED_PAIRS_KEY)
    if state is None:
        state = res.buffers[DROPPED_PAIRS_KEY] = StreamDroppedPairs(res)
    return state


def check_expert_ids(stream=None, device: int | None = None) -> None:
    """Wait for ``stream`` and raise ``ValueError`` if ``moe_forward`` calls
    this thread queued on it since the last check named expert ids outside
    ``[0, E)``. ``stream``: a stream object or raw handle, default the
    current stream of ``device`` (default the current device); the calls
    checked are those on that stream, on ``device`` if given, else on any
    device that stream handle was used on.

    Only the sync-free default path on SM 9.0 (the Hopper kernel steps) needs
    this: it adds nothing for such pairs and counts them on the GPU without
    waiting, and a later ``moe_forward`` call on the same stream raises once
    it sees the count (the cuBLAS paths raise in the call itself, and
    ``fixed_capacity=True`` counts into ``dropped_pairs``). Cheap: one
    synchronization and an 8-byte read. Does nothing if no such call was made.
    """
    from ..runtime.device import known_resources, resolve_stream

    handle = resolve_stream(stream, None if device is None else int(device))
    for res in known_resources(handle):
        state = res.buffers.get(DROPPED_PAIRS_KEY)
        if state is not None and (device is None or res.device_id == int(device)):
            state.report(res)
