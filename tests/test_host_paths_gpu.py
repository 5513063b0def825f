"""The host-cost shortcuts on the GPU: the CuPy fast path of ``view``, the direct
driver launch, the cuBLAS handle bound once per stream, remembered AUTO choices."""

from __future__ import annotations

import numpy as np
import pytest

from cublas_grouped.testing import gmm_ref, rel_error

pytestmark = pytest.mark.gpu


class _OnlyInterface:
    """Hides everything but ``__cuda_array_interface__`` (the generic path of ``view``)."""

    def __init__(self, arr):
        self.__cuda_array_interface__ = arr.__cuda_array_interface__


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int32"])
def test_view_of_cupy_matches_the_interface_path(dtype):
    import cupy

    from cublas_grouped.runtime.arrays import view

    base = cupy.arange(2 * 6 * 10, dtype=cupy.float32).reshape(2, 6, 10).astype(dtype)
    for arr in (
        base,
        base[:, 1:5, ::2],
        base.transpose(2, 0, 1),
        base[1],
        base[:0],
        base[0, 3],
        base.reshape(-1),
    ):
        fast, generic = view(arr, "x"), view(_OnlyInterface(arr), "x")
        assert (fast.shape, fast.strides, fast.dtype) == (generic.shape, generic.strides, generic.dtype)
        if arr.size:
            assert fast.ptr == generic.ptr
        assert fast.device == cupy.cuda.Device().id and fast.obj is arr


def test_gmm_alternating_streams_uses_each_stream_and_its_workspace():
    """The handle is rebound only when the stream changes: alternate two streams
    and the default one, with every algorithm, and check every result."""
    import cupy

    import cublas_grouped as cg

    rng = np.random.default_rng(5)
    e, k, n = 6, 64, 96
    sizes = np.array([7, 0, 33, 1, 16, 40])
    a = cupy.asarray(rng.standard_normal((int(sizes.sum()), k), dtype=np.float32))
    b = cupy.asarray(rng.standard_normal((e, k, n), dtype=np.float32))
    ref = gmm_ref(a.get(), b.get(), sizes)
    streams = [cupy.cuda.Stream(non_blocking=True), None, cupy.cuda.Stream(non_blocking=True)]
    for step in range(12):
        stream = streams[step % 3]
        alg = ("cublas_grouped", "sequential", "chunked_batched", "auto")[step % 4]
        with cupy.cuda.Stream.null if stream is None else stream:
            # NaN-filled on the stream gmm writes it on (a fill on the null stream could land after gmm's writes).
            out = cupy.full((a.shape[0], n), cupy.nan, dtype=cupy.float32)
            got = cg.gmm(a, b, sizes, algorithm=alg, out=out, stream=stream)
        (stream or cupy.cuda.Stream.null).synchronize()
        assert rel_error(got.get(), ref) < 1e-5, (step, alg)


def test_remembered_auto_choice_follows_new_sizes():
    """Repeated AUTO calls with the same sizes, then other sizes, on the same arrays:
    every result right (a remembered choice never outlives its sizes)."""
    import cupy

    import cublas_grouped as cg

    rng = np.random.default_rng(6)
    e, k, n, m = 8, 128, 64, 300
    a = cupy.asarray(rng.standard_normal((m, k), dtype=np.float32))
    b = cupy.asarray(rng.standard_normal((e, k, n), dtype=np.float32))
    for sizes in ([300, 0, 0, 0, 0, 0, 0, 0], [37] * 7 + [41], [300, 0, 0, 0, 0, 0, 0, 0], [0] * 7 + [300]):
        for _ in range(3):
            got = cg.gmm(a, b, np.array(sizes))
            assert rel_error(got.get(), gmm_ref(a.get(), b.get(), np.array(sizes))) < 1e-5, sizes
