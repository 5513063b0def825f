"""Development probe: host microseconds of the pieces an eager call is made of (GPU machine)."""

from __future__ import annotations

import ctypes
import time

import cupy
import numpy as np

import cublas_grouped as cg
from cublas_grouped.gemm import pointers
from cublas_grouped.runtime import cublas as cb
from cublas_grouped.runtime import device as dev
from cublas_grouped.runtime import nvrtc
from cublas_grouped.runtime.arrays import view


def t(name, fn, n=2000):
    for _ in range(50):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    best = []
    for _ in range(5):
        s = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - s) / n * 1e6)
        cupy.cuda.get_current_stream().synchronize()
    print(f"{name:60s} {np.median(best):8.2f} us")


a = cupy.ones((16, 256), dtype="bfloat16")
res = dev.stream_resources(0, None)
info = cg.device_info()
arch = nvrtc.arch_for(info.sm)
k = nvrtc.get_kernel("pointers", "build_pointers", arch, defines=pointers.DEFINES)
t("device_info(0)", lambda: dev.device_info(0))
t("stream_resources(0, None)", lambda: dev.stream_resources(0, None))
t("resolve_stream(None, 0)", lambda: dev.resolve_stream(None, 0))
t("view(cupy bf16)", lambda: view(a, "a"))
t("cupy.empty((16,256))", lambda: cupy.empty((16, 256), dtype="bfloat16"))
t("cupy.empty(129, int32)", lambda: cupy.empty(129, dtype=cupy.int32))
r2p = cupy.empty(64, dtype=cupy.int32)
t("cupy fill(-1) 64", lambda: r2p.fill(-1))
t("memsetAsync 256B", lambda: cupy.cuda.runtime.memsetAsync(r2p.data.ptr, 255, 256, res.stream))
t("cupy.cuda.Device(0) ctx", lambda: cupy.cuda.Device(0).__enter__() and None)


def ctx():
    with cupy.cuda.Device(0), res.cupy_stream:
        pass


t("with Device(0), stream", ctx)
t(
    "get_kernel (cached)",
    lambda: nvrtc.get_kernel("pointers", "build_pointers", arch, defines=pointers.DEFINES),
)
t("define_items", lambda: nvrtc.define_items(pointers.DEFINES))
sizes = cupy.ones(8, dtype=cupy.int32)
from cublas_grouped.gemm.plan import Operands, RowLayout  # noqa: E402

ops = Operands(0, 0, 0, 0, 0, 0, 0, 0, 0)
t(
    "build_pointers (whole)",
    lambda: pointers.build_pointers(res, sizes, ops, RowLayout.contiguous(), arch=arch, num_problems=8),
)
from cuda.core import LaunchConfig, launch  # noqa: E402

cfg = LaunchConfig(grid=1, block=32, shmem_size=0)
args = (
    np.intp(sizes.data.ptr),
    np.int32(8),
    np.int32(1),
    np.int32(0),
    np.int32(0),
    np.int32(8),
    np.uint64(0),
    np.int64(0),
    np.int64(0),
    np.uint64(0),
    np.int64(0),
    np.int64(0),
    np.uint64(0),
    np.int64(0),
    np.int64(0),
    np.uint64(0),
    np.intp(0),
    np.intp(0),
    np.intp(0),
    np.intp(0),
)
buf = cupy.zeros(3 * 8 * 8, dtype=cupy.uint8)
args = args[:16] + (
    np.intp(buf.data.ptr),
    np.intp(buf.data.ptr + 64),
    np.intp(buf.data.ptr + 128),
    np.intp(0),
)
t("LaunchConfig()", lambda: LaunchConfig(grid=1, block=32, shmem_size=0))
t("cuda.core launch (cached cfg)", lambda: launch(res.launch_stream, cfg, k, *args))
# driver launch through cuda.bindings

handle = k.handle
print("kernel handle type", type(handle))
vals = [ctypes.c_uint64(int(x)) if np.dtype(type(x)).itemsize == 8 else ctypes.c_int32(int(x)) for x in args]
ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
libcuda = ctypes.CDLL("libcuda.so.1")
libcuda.cuLaunchKernel.restype = ctypes.c_int
fptr = int(handle)


def raw():
    st = libcuda.cuLaunchKernel(
        ctypes.c_void_p(fptr), 1, 1, 1, 32, 1, 1, 0, ctypes.c_void_p(res.stream), ptrs, None
    )
    assert st == 0, st


t("ctypes cuLaunchKernel (prepacked)", raw)


def raw_pack():
    vals = [
        ctypes.c_uint64(int(x)) if np.dtype(type(x)).itemsize == 8 else ctypes.c_int32(int(x)) for x in args
    ]
    p = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
    libcuda.cuLaunchKernel(ctypes.c_void_p(fptr), 1, 1, 1, 32, 1, 1, 0, ctypes.c_void_p(res.stream), p, None)


t("ctypes cuLaunchKernel (pack per call)", raw_pack)

fmt = "".join("Q" if np.dtype(type(x)).itemsize == 8 else "i" for x in args)
print("fmt", fmt)
h = res.handle
t("cublas set_stream", lambda: cb.set_stream(h, res.stream))
t("res.bind(ws)", lambda: res.bind(32 << 20))
w = cupy.ones((4, 256, 256), dtype="bfloat16")
o = cupy.empty((16, 256), dtype="bfloat16")


def gemm1():
    cb.gemm_ex(
        h,
        0,
        0,
        256,
        4,
        256,
        1.0,
        w.data.ptr,
        cb.DataType.R_16BF,
        256,
        a.data.ptr,
        cb.DataType.R_16BF,
        256,
        0.0,
        o.data.ptr,
        cb.DataType.R_16BF,
        256,
        cb.ComputeType.C32F,
    )


t("cublasGemmEx tiny (one call)", gemm1)
t("cupy.asnumpy(8 int32) (sync)", lambda: cupy.asnumpy(sizes, stream=res.cupy_stream))
t("np.asarray sizes + astype", lambda: np.asarray([4, 4, 4, 4]).astype(np.int64))
t("res.upload(8 int32)", lambda: res.upload("sizes", np.ones(8, dtype=np.int32)))
t("cupy.matmul tiny (peer)", lambda: cupy.matmul(a, w[0]))
