"""cublas_grouped: Mixture-of-Experts expert layers as grouped GEMMs on NVIDIA GPUs.

cuBLAS through ctypes, small NVRTC kernels for routing, gather, scatter and
activations, CuPy arrays in and out, no torch dependency.
"""

from .gemm.config import Algorithm, ComputePrecision, GroupedGemmConfig
from .gemm.executor import GroupedGemmExecutor
from .gemm.fp8 import FP8ExpertWeights, quantize_fp8, quantize_rows_fp8
from .gemm.gmm import gmm
from .gemm.masked import gmm_masked
from .gemm.plan import ProblemStats, RowLayout, choose_chunk_rows
from .gemm.select import select_algorithm
from .gemm.tables import TuningTable
from .moe.backward import MoEContext, MoEGradients, moe_backward
from .moe.checkpoints import load_fp8_experts, load_gguf_experts
from .moe.dispatch import DispatchPlan, combine_output, expert_gemm, prepare_input, scatter_output
from .moe.dropped_pairs import check_expert_ids
from .moe.fixed_capacity import FixedCapacityMoE
from .moe.gate_up import pack_gate_up, unpack_gate_up
from .moe.layer import StageTimer, moe_forward
from .moe.mlp_backward import MLPGradients
from .moe.modules import ExpertWeightManager, ExpertWeights, MoEMLP
from .moe.routing import route
from .runtime.arrays import SUPPORTED_DTYPES
from .runtime.cublas import CublasError, CublasUnavailableError

# Importing _deps stops a bare install (no cu12 / cu13 extra) with a message naming the extras.
from .runtime.deps import GpuUnavailableError, MissingDependencyError
from .runtime.device import DeviceInfo, device_info
from .runtime.nvrtc import KernelCacheWarning, KernelCompileError, KernelLaunchError
from .runtime.oom import GpuOutOfMemoryError

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "ComputePrecision",
    "CublasError",
    "CublasUnavailableError",
    "DeviceInfo",
    "ExpertWeightManager",
    "ExpertWeights",
    "FP8ExpertWeights",
    "GpuUnavailableError",
    "DispatchPlan",
    "MissingDependencyError",
    "MoEMLP",
    "MoEContext",
    "MoEGradients",
    "MLPGradients",
    "moe_backward",
    "StageTimer",
    "FixedCapacityMoE",
    "pack_gate_up",
    "unpack_gate_up",
    "combine_output",
    "expert_gemm",
    "moe_forward",
    "check_expert_ids",
    "prepare_input",
    "route",
    "scatter_output",
    "GroupedGemmConfig",
    "GroupedGemmExecutor",
    "gmm_masked",
    "KernelCompileError",
    "KernelCacheWarning",
    "KernelLaunchError",
    "GpuOutOfMemoryError",
    "ProblemStats",
    "RowLayout",
    "SUPPORTED_DTYPES",
    "TuningTable",
    "choose_chunk_rows",
    "device_info",
    "gmm",
    "load_fp8_experts",
    "load_gguf_experts",
    "quantize_fp8",
    "quantize_rows_fp8",
    "select_algorithm",
]

# Renamed public names: the old ones still work, with a DeprecationWarning, for one release.
_RENAMED = {"StaticMoE": "FixedCapacityMoE", "GroupedGemmInput": "DispatchPlan"}


def __getattr__(name: str):
    if name in _RENAMED:
        import warnings

        new = _RENAMED[name]
        warnings.warn(
            f"cublas_grouped.{name} is deprecated; use cublas_grouped.{new} (the old name goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
