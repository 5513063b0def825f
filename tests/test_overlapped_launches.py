"""Programmatic dependent launches of the MoE kernel step (CPU: NVRTC and ctypes only).

The prepared step launches every kernel with the programmatic-serialization
attribute (``FixedLaunch.launch_overlapped``): a kernel's blocks may start
while the previous kernel still runs. That is safe only if each of them
waits (``griddepcontrol.wait``) before its first access to global memory,
and lets the next one start only after that wait. These tests read the PTX
NVRTC makes for SM 9.0 and check exactly that order for every kernel the
step launches; and the ctypes mirror of ``CUlaunchConfig`` against cuda.h's
layout.
"""

from __future__ import annotations

import ctypes
import re

import pytest

from cublas_grouped.gemm import fp8_kernels
from cublas_grouped.gemm.backends import hopper, hopper_fp8
from cublas_grouped.moe import kernel_step
from cublas_grouped.moe import kernels as K
from cublas_grouped.runtime import launch

# Every kernel a prepared step launches (kernel_step.step_launches), by build
# (a source and its defines), and the FP8 step's own (fp8_step_launches: its
# placement, gather and activation writing e4m3, the row quantizer where they do not,
# the FP8 GEMM in both tile shapes), which follow the previous grid in the same way.
STEP_KERNELS = {
    "dispatch": (
        "expert_block_histogram",
        "expert_column_scan",
        "assign_rows",
        "gather_rows_bf16",
        "gather_rows_f16",
        "gather_rows_by_token_bf16",
        "gather_rows_by_token_f16",
        "place_one_block_bf16",
        "place_one_block_f16",
        "place_one_block_fp8_bf16",
        "gather_rows_fp8_bf16",
        "gather_rows_fp8_by_token_bf16",
    ),
    "activation": ("expert_activation_bf16", "expert_activation_f16", "expert_activation_fp8_bf16"),
    "combine": ("combine_rows_bf16", "combine_rows_f16", "sum_rows_bf16", "sum_rows_f16"),
    "grouped_gemm_sm90": (
        "grouped_tile_offsets",
        "grouped_gemm_nt_bf16",
        "grouped_gemm_nn_bf16",
        "grouped_gemm_nt_f16",
        "grouped_gemm_nn_f16",
    ),
    "fp8": ("quantize_rows_fp8_bf16",),
    "grouped_gemm_fp8_sm90": (hopper_fp8.KERNEL,),
    "grouped_gemm_fp8_sm90 thin": (hopper_fp8.KERNEL,),
}
# Kernels that let the next one start before their own wait (lead_next_grid:
# the 16-bit activation, so that a step's GEMM 2 prefetches its weights early).
LEAD_NEXT = {"expert_activation_bf16", "expert_activation_f16"}
# A step's GEMM 2 as it launches with SM90_PREFETCH_B (thin tiles, the
# row-scale epilogue): it reads its schedule and prefetches b before waiting.
PREFETCH_DEFINES = {
    **hopper.DEFINES,
    "SM90_THIN": 1,
    "SM90_STAGES": 5,
    "SM90_TABLE_MAX_GROUPS": 597,
    "SM90_EPILOGUE_ROW_SCALE": 1,
    "SM90_PREFETCH_B": 1,
}
# Each build's (source, arch, defines): the sources of the table above, the
# FP8 GEMM compiled as each tile shape launches it.
BUILDS = {
    **{name: (name, "sm_90", defines) for name, defines in K.DEFINES.items()},
    "grouped_gemm_sm90": ("grouped_gemm_sm90", hopper.ARCH, hopper.DEFINES),
    "fp8": ("fp8", "sm_90", fp8_kernels.DEFINES),
    "grouped_gemm_fp8_sm90": (hopper_fp8.SOURCE, hopper_fp8.ARCH, hopper_fp8.launch_defines(False)),
    "grouped_gemm_fp8_sm90 thin": (hopper_fp8.SOURCE, hopper_fp8.ARCH, hopper_fp8.launch_defines(True)),
}
# Instructions that touch global memory (or start a copy from it).
GLOBAL_ACCESS = re.compile(
    r"^\s*(ld\.global|st\.global|atom\.|red\.|cp\.async|ld\.volatile\.global|ld\.relaxed)"
)


def _ptx(source: str, arch: str, defines: dict) -> str:
    """NVRTC's PTX of kernels/<source>.cu for ``arch`` (cuda.bindings directly:
    cuda.core's PTX target loads the driver, which CI has not)."""
    from cuda.bindings import nvrtc as N

    from cublas_grouped.runtime import nvrtc

    _, prog = N.nvrtcCreateProgram(nvrtc.load_source(source).encode(), f"{source}.cu".encode(), 0, [], [])
    opts = [f"--gpu-architecture={arch.replace('sm_', 'compute_')}".encode(), b"-std=c++17"]
    opts += [f"-D{name}={value}".encode() for name, value in defines.items()]
    (status,) = N.nvrtcCompileProgram(prog, len(opts), opts)
    assert status == N.nvrtcResult.NVRTC_SUCCESS, f"{source}.cu does not compile for {arch}: {status}"
    _, size = N.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    N.nvrtcGetPTX(prog, ptx)
    N.nvrtcDestroyProgram(prog)
    return ptx.rstrip(b"\0 ").decode()


def _entries(ptx: str) -> dict[str, list[str]]:
    """Each entry function's PTX lines (from its .entry line to the next)."""
    out: dict[str, list[str]] = {}
    name = None
    for line in ptx.splitlines():
        m = re.match(r"\s*\.visible \.entry (\w+)\(", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


@pytest.fixture(scope="module")
def step_ptx():
    pytest.importorskip("cuda.bindings")
    return {build: _entries(_ptx(*BUILDS[build])) for build in STEP_KERNELS}


@pytest.mark.parametrize("build", sorted(STEP_KERNELS))
def test_every_step_kernel_waits_before_touching_global_memory(step_ptx, build):
    """In each kernel the step launches overlapped, ``griddepcontrol.wait``
    comes before the first global load, store, atomic or async copy, and
    ``griddepcontrol.launch_dependents`` after the wait, or before it for the
    activation kernels (:data:`LEAD_NEXT`) (PTX order: both sit at the
    kernel's start, before any branch)."""
    entries = step_ptx[build]
    for name in STEP_KERNELS[build]:
        lines = entries.get(name)
        assert lines is not None, f"{build}: no entry {name}: {sorted(entries)}"
        wait = next((i for i, s in enumerate(lines) if "griddepcontrol.wait" in s), None)
        allow = next((i for i, s in enumerate(lines) if "griddepcontrol.launch_dependents" in s), None)
        first = next((i for i, s in enumerate(lines) if GLOBAL_ACCESS.match(s)), None)
        assert wait is not None, f"{name}: no griddepcontrol.wait"
        assert allow is not None, f"{name}: no launch_dependents"
        assert (allow < wait) == (name in LEAD_NEXT), (
            f"{name}: launch_dependents on the wrong side of the wait"
        )
        assert first is None or first > wait, f"{name}: global access before the wait: {lines[first]}"
        # The wait may not sit in a branch that some threads skip: no branch before it.
        assert not any(re.match(r"\s*(@%p\d+ )?bra", s) for s in lines[:wait]), (
            f"{name}: a branch before the wait"
        )


def test_gemm2_prefetching_b_writes_nothing_and_loads_nothing_into_shared_memory_before_its_wait():
    """With SM90_PREFETCH_B the GEMM reads its schedule and prefetches b into
    L2 before ``griddepcontrol.wait``: before it, no global store, atomic or
    copy into shared memory (only ``cp.async.bulk.prefetch``); its
    ``launch_dependents`` stays after the wait; without the define the
    prefetch is not compiled at all."""
    pytest.importorskip("cuda.bindings")
    prefetching = _entries(_ptx("grouped_gemm_sm90", hopper.ARCH, PREFETCH_DEFINES))
    plain = _entries(_ptx("grouped_gemm_sm90", hopper.ARCH, {**PREFETCH_DEFINES, "SM90_PREFETCH_B": 0}))
    writes = re.compile(r"^\s*(st\.global|atom\.|red\.|cp\.async\.bulk\.tensor|cp\.async\.ca|cp\.async\.cg)")
    for name in ("grouped_gemm_nt_bf16", "grouped_gemm_nn_bf16"):
        lines = prefetching[name]
        wait = next(i for i, s in enumerate(lines) if "griddepcontrol.wait" in s)
        allow = next(i for i, s in enumerate(lines) if "griddepcontrol.launch_dependents" in s)
        assert allow > wait, name
        assert any("cp.async.bulk.prefetch.tensor" in s for s in lines[:wait]), name
        assert not any(writes.match(s) for s in lines[:wait]), name
        assert not any("cp.async.bulk.prefetch" in s for s in plain[name]), name


def test_the_step_overlaps_its_launches_by_default():
    assert kernel_step.OVERLAP_LAUNCHES is True


def test_launch_config_mirrors_cuda_h():
    """cuda.h (CUDA 12 and 13): CUlaunchAttribute is an int id, 4 bytes of
    padding and a 64-byte value union (72 bytes); CUlaunchConfig is seven
    unsigned ints, the stream, the attribute pointer and their count (56
    bytes on 64-bit hosts, the stream at 32, attrs at 40, numAttrs at 48)."""
    assert ctypes.sizeof(launch._LaunchAttribute) == 72
    assert launch._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(launch._LaunchConfig) == 56
    assert (launch._LaunchConfig.stream.offset, launch._LaunchConfig.attrs.offset) == (32, 40)
    assert launch._LaunchConfig.num_attrs.offset == 48
    config = launch._overlapped_config(7, 128, 1024)
    assert (list(config.grid), list(config.block), config.shared_bytes) == ([7, 1, 1], [128, 1, 1], 1024)
    assert config.num_attrs == 1 and config.attrs[0].id == 6 and config.attrs[0].value[0] == 1
