"""GEMM back ends: each runs a validated :class:`~cublas_grouped.gemm.plan.GemmPlan`
on a stream, as free functions over the plan, its :class:`Operands` and its
:class:`RowLayout`, with no argument checks (the executor made them).

- :mod:`.cublas`: the portable back end, every :class:`Algorithm` as one or a
  few cuBLAS calls (per-expert, grouped, chunk-aligned batched, chunked on
  grouped-contiguous rows, padded strided).

A Hopper back end (our NVRTC kernel for sm_90a, reading offsets from the
device) goes next to it as ``hopper.py``; the executor's ``run`` is the one
place that picks a back end.

- :mod:`.hopper_fp8`: our FP8 Hopper kernel (e4m3 activations and weights with
  block scales); it checks its own arguments, and ``gmm`` and the MoE layer
  call it directly for FP8 weights it takes (``kernel_takes``).
"""
