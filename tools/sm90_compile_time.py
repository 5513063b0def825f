"""Time the sm90 kernel's NVRTC compile: cold, then from the disk cache (for docs/kernel-notes.md)."""

import os
import tempfile
import time

os.environ["CUBLAS_GROUPED_CACHE_DIR"] = tempfile.mkdtemp()

from cublas_grouped.gemm.backends import hopper  # noqa: E402
from cublas_grouped.runtime import nvrtc  # noqa: E402


def compile_ms() -> float:
    start = time.perf_counter()
    nvrtc.compile_source("grouped_gemm_sm90", hopper.ARCH, hopper.DEFINES)
    return 1e3 * (time.perf_counter() - start)


cold = compile_ms()
nvrtc._compiled.clear()  # the memory cache: the next compile reads the disk cache
print(f"sm90 kernel compile: cold {cold:.0f} ms, from the disk cache {compile_ms():.1f} ms")
