"""cublas_grouped: Mixture-of-Experts expert layers as grouped GEMMs on NVIDIA GPUs.

cuBLAS through ctypes, small NVRTC kernels for routing, gather, scatter and
activations, CuPy arrays in and out, no torch dependency.
"""

from ._arrays import SUPPORTED_DTYPES
from ._config import Algorithm, ComputePrecision, GroupedGemmConfig
from ._cublas import CublasError, CublasUnavailableError

# Importing _deps stops a bare install (no cu12 / cu13 extra) with a message naming the extras.
from ._deps import GpuUnavailableError, MissingDependencyError
from ._device import DeviceInfo, device_info
from ._executor import GroupedGemmExecutor, RowLayout
from ._gmm import gmm
from ._kernels import KernelCompileError
from ._moe import (
    GroupedGemmInput,
    StageTimer,
    combine_output,
    expert_gemm,
    moe_forward,
    prepare_input,
    route,
    scatter_output,
)
from ._select import ProblemStats, TuningTable, choose_chunk_rows, select_algorithm
from ._static import StaticMoE
from ._weights import ExpertWeightManager, ExpertWeights, MoEMLP

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "ComputePrecision",
    "CublasError",
    "CublasUnavailableError",
    "DeviceInfo",
    "ExpertWeightManager",
    "ExpertWeights",
    "GpuUnavailableError",
    "GroupedGemmInput",
    "MissingDependencyError",
    "MoEMLP",
    "StageTimer",
    "StaticMoE",
    "combine_output",
    "expert_gemm",
    "moe_forward",
    "prepare_input",
    "route",
    "scatter_output",
    "GroupedGemmConfig",
    "GroupedGemmExecutor",
    "KernelCompileError",
    "ProblemStats",
    "RowLayout",
    "SUPPORTED_DTYPES",
    "TuningTable",
    "choose_chunk_rows",
    "device_info",
    "gmm",
    "select_algorithm",
]
