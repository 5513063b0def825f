"""pytest plugin (development): after each test, log GPU memory held by this process.

Use: ``PYTHONPATH=.:tools python3 -m pytest -p pytest_gpu_memory -m gpu tests``; each
line names a test after which the memory in use (device total minus free) grew by
more than 512 MiB, with CuPy's pool split into used and cached bytes.
"""

from __future__ import annotations

_last = [0]


def pytest_runtest_teardown(item, nextitem):
    try:
        import cupy
    except ImportError:
        return
    import gc

    gc.collect()
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    free, total = cupy.cuda.runtime.memGetInfo()
    in_use = total - free
    if in_use - _last[0] > (512 << 20):
        print(
            f"\n[gpu-memory] after {item.nodeid}: in use {in_use / 2**30:.2f} GiB "
            f"(+{(in_use - _last[0]) / 2**30:.2f}), CuPy pool used {pool.used_bytes() / 2**30:.2f} GiB"
        )
    _last[0] = in_use
