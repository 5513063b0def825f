"""Eager fixed-capacity steps replayed from CUDA graphs the layer captures itself.

An eager :meth:`FixedCapacityMoE.forward` launches about ten kernels and two
cuBLAS calls, several hundred microseconds of host time in Python; a decode
step's GPU work is often less. Its launches have fixed sizes for a given
token count, so the layer can capture them once and replay them:

- the step reads its inputs from buffers of the layer's own (``x``, the
  expert ids and the routing weights are copied there first, three
  device-to-device copies on the caller's stream), so one graph serves every
  call with that token count, whatever arrays the caller passes;
- the first call with a token count runs the step eagerly on the caller's
  stream, then captures the same step on a capture stream (one per thread and
  device, shared by all layers, with one cuBLAS workspace; the legacy default
  stream cannot capture) once that stream's workspace exists; later calls
  copy and replay on the caller's stream. Where the workspace cannot be
  allocated, the call stays eager and the next one tries again; a capture
  that fails turns the layer's graphs off, with a warning;
- graphs are kept per (token count, with or without routing weights), the
  least recently used dropped past :data:`MAX_GRAPHS`.

The graph holds the addresses of the layer's weights and buffers: weights
changed in place are seen by the next replay, weights replaced by new arrays
are not (build a new layer). A call made while the caller's stream is
capturing a graph of its own runs the step eagerly into that capture instead.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

__all__ = ["StepGraphs", "MAX_GRAPHS"]

# Captured steps kept per layer (one per token count seen, with and without weights).
MAX_GRAPHS = 64


class StepGraphs:
    """The captured steps of one fixed-capacity layer and the input buffers they read.

    ``run_step(res, x, ids, weights, out)`` runs one eager step on ``res``'s
    stream (the layer's :func:`fixed_capacity_step` with its own buffers);
    ``workspace_bytes`` is the cuBLAS workspace its calls bind.
    """

    def __init__(
        self, run_step, max_tokens: int, hidden: int, top_k: int, dtype, device_id: int, workspace_bytes: int
    ):
        self._run_step = run_step
        self._workspace_bytes = workspace_bytes
        self._max_tokens, self._hidden, self._top_k = max_tokens, hidden, top_k
        self._dtype, self._device_id = dtype, device_id
        self._graphs: OrderedDict = OrderedDict()
        self._inputs = None  # (x [max_tokens, H], ids int32 [max_tokens, k], weights f32 [max_tokens, k])
        self._disabled = False  # set when a capture failed

    @property
    def nbytes(self) -> int:
        """GPU memory of the input buffers (graphs not counted)."""
        return 0 if self._inputs is None else sum(a.nbytes for a in self._inputs)

    def step(self, res, resources_for, x, ids, weights, out) -> None:
        """One step of ``x.shape[0]`` tokens on ``res``'s stream, through a graph.

        ``resources_for(stream_handle)`` gives the per-stream resources of the
        layer's device (for the capture stream). ``x``, ``ids``, ``weights``
        (or None) are the caller's CuPy arrays, already checked; ``out`` the
        layer's output rows for this step.
        """
        tokens = x.shape[0]
        self._ensure_buffers()
        xs, ids_s, ws = self._inputs
        xs, ids_s = xs[:tokens], ids_s[:tokens]
        ws = None if weights is None else ws[:tokens]
        for dst, src in ((xs, x), (ids_s, ids), (ws, weights)):
            if src is not None:
                _copy(dst, src, res)
        key = (tokens, weights is not None)
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            graph.launch(res.cupy_stream)
            return
        # First sight of this token count: step eagerly on the caller's stream
        # (this call's result; it also readies that stream for a capture of the
        # caller's own), then capture the same step on the capture stream, whose
        # cuBLAS workspace is allocated first (nothing may be allocated in a capture).
        self._run_step(res, xs, ids_s, ws, out)
        if self._disabled:
            return
        stream = _capture_stream(self._device_id)
        private = resources_for(stream.ptr)
        try:
            private.bind(self._workspace_bytes)
        except MemoryError:
            return  # no room for the capture stream's workspace now: this call stays eager
        try:
            stream.begin_capture()
            try:
                with stream:
                    self._run_step(private, xs, ids_s, ws, out)
            finally:
                graph = stream.end_capture()
        except Exception as exc:  # the eager result stands; later calls launch every kernel
            self._disabled = True
            warnings.warn(
                f"FixedCapacityMoE could not capture its step ({type(exc).__name__}: {exc}); "
                "it launches every kernel from now on",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        self._graphs[key] = graph

    def _ensure_buffers(self) -> None:
        import cupy

        if self._inputs is None:
            with cupy.cuda.Device(self._device_id):
                self._inputs = (
                    cupy.empty((self._max_tokens, self._hidden), dtype=self._dtype),
                    cupy.empty((self._max_tokens, self._top_k), dtype=cupy.int32),
                    cupy.empty((self._max_tokens, self._top_k), dtype=cupy.float32),
                )


_local = threading.local()


def _capture_stream(device_id: int):
    """The stream this thread captures steps on, one per device: every layer
    shares it, and with it one cuBLAS workspace (a stream per layer would
    hold one workspace per layer)."""
    import cupy

    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    stream = streams.get(device_id)
    if stream is None:
        with cupy.cuda.Device(device_id):
            stream = streams[device_id] = cupy.cuda.Stream(non_blocking=True)
    return stream


def _copy(dst, src, res) -> None:
    """``dst[...] = src`` on ``res``'s stream, one asynchronous copy (the layer's
    checks made ``src`` C-contiguous, of ``dst``'s dtype and shape)."""
    import cupy

    cupy.cuda.runtime.memcpyAsync(
        dst.data.ptr, src.data.ptr, src.nbytes, cupy.cuda.runtime.memcpyDeviceToDevice, res.stream
    )
