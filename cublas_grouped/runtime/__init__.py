"""The runtime layer: cuBLAS binding, NVRTC compile and cache, devices and
per-stream resources, array views, CUDA-event timing.

The bottom of the package: it imports nothing from ``gemm``, ``moe`` or
``tools``, and knows no kernel's constants (their launchers pass them).
"""
