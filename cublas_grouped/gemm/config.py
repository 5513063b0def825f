"""Options of the grouped GEMM executor: algorithms, compute precision, config."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

import numpy as np

from ..runtime.arrays import BFLOAT16
from ..runtime.cublas import ComputeType

__all__ = ["Algorithm", "ComputePrecision", "GroupedGemmConfig", "compute_type_for"]


class Algorithm(str, enum.Enum):
    """How the per-expert GEMMs are handed to cuBLAS.

    AUTO
        Choose per call (see :func:`cublas_grouped.select_algorithm`).
    CUBLAS_GROUPED
        One ``cublasGemmGroupedBatchedEx`` call, one group per non-empty expert.
        Needs cuBLAS >= 12.5 and the row counts on the host.
    SEQUENTIAL
        One ``cublasGemmEx`` per non-empty expert. Best for few, large experts.
    CHUNKED_BATCHED
        Every expert's rows cut into chunks of ``chunk_rows``; all chunks in one
        ``cublasGemmBatchedEx``. Needs the rows laid out with each expert's
        block padded to a multiple of ``chunk_rows`` (the MoE layer's gather
        writes that layout directly).
    PADDED_STRIDED
        Each expert's rows padded to one capacity; one
        ``cublasGemmStridedBatchedEx``. Needs the ``[E, capacity, K]`` layout.
    SM90_GROUPED
        Our own Hopper kernel (TMA loads, wgmma; compiled with NVRTC for
        sm_90a) over grouped-contiguous rows, reading the group sizes on the
        device: no host copy even when they live there. SM 9.0 GPUs,
        bfloat16/float16, weights in either layout (``[E, K, N]``, or
        ``[E, N, K]`` with ``trans_b``), K and N multiples of 8; anything else
        (float32, ``trans_a``, other GPUs) runs CUBLAS_GROUPED instead, with
        a one-time warning. AUTO takes it where measured at least 3% faster
        than the best cuBLAS algorithm (``select.OWN_KERNEL_MARGIN``).
    """

    AUTO = "auto"
    CUBLAS_GROUPED = "cublas_grouped"
    SEQUENTIAL = "sequential"
    CHUNKED_BATCHED = "chunked_batched"
    PADDED_STRIDED = "padded_strided"
    SM90_GROUPED = "sm90_grouped"


class ComputePrecision(str, enum.Enum):
    """Arithmetic used for float32 inputs. float16/bfloat16 inputs always run on
    tensor cores with float32 accumulation, whatever this says."""

    FP32 = "fp32"
    TF32 = "tf32"
    FP16 = "fp16"
    BF16 = "bf16"


@dataclass(frozen=True)
class GroupedGemmConfig:
    """Executor options.

    Attributes
    ----------
    algorithm : Algorithm
        ``AUTO`` (default) or a fixed algorithm.
    compute_precision : ComputePrecision
        For float32 inputs: FP32 (default, full precision), TF32, or FP16/BF16
        down-conversion inside the tensor cores; accumulation stays float32.
    workspace_mb : int
        cuBLAS workspace per stream, in MiB (default 32, what cuBLAS advises for Hopper).
    use_tensor_cores : bool
        For float32 inputs with FP32 precision, ``False`` runs cuBLAS in
        pedantic math mode (no reduced-precision shortcuts at all). TF32/FP16/BF16
        precisions need tensor cores and refuse ``False``.
    chunk_rows : int or None
        Rows per chunk for CHUNKED_BATCHED; ``None`` lets the planner choose.
    """

    algorithm: Algorithm = Algorithm.AUTO
    compute_precision: ComputePrecision = ComputePrecision.FP32
    workspace_mb: int = 32
    use_tensor_cores: bool = True
    chunk_rows: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "algorithm", coerce_enum(Algorithm, self.algorithm, "algorithm"))
        object.__setattr__(
            self,
            "compute_precision",
            coerce_enum(ComputePrecision, self.compute_precision, "compute_precision"),
        )
        if not isinstance(self.workspace_mb, int) or self.workspace_mb < 0:
            raise ValueError(f"workspace_mb must be a non-negative int; got {self.workspace_mb!r}")
        if self.chunk_rows is not None and (not isinstance(self.chunk_rows, int) or self.chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive int or None; got {self.chunk_rows!r}")
        if not self.use_tensor_cores and self.compute_precision is not ComputePrecision.FP32:
            raise ValueError(f"compute_precision={self.compute_precision.name} needs use_tensor_cores=True")

    @classmethod
    def coerce(cls, config) -> GroupedGemmConfig:
        """Accept a config, a dict of its fields, or None (defaults)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            known = {f.name for f in fields(cls)}
            unknown = set(config) - known
            if unknown:
                raise ValueError(f"config has unknown keys {sorted(unknown)}; known: {sorted(known)}")
            return cls(**config)
        raise TypeError(f"config must be a GroupedGemmConfig, a dict or None; got {type(config).__name__}")


def coerce_enum(kind, value, name):
    """``value`` as a member of the enum ``kind`` (by value or name), or a ValueError naming ``name``."""
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).lower())
    except ValueError:
        if isinstance(value, str) and value.upper() in kind.__members__:
            return kind[value.upper()]
        options = ", ".join(m.name for m in kind)
        raise ValueError(f"{name} must be one of {options}; got {value!r}") from None


def compute_type_for(dtype: np.dtype, precision: ComputePrecision, use_tensor_cores: bool = True) -> int:
    """cublasComputeType_t for inputs of ``dtype`` under ``precision``."""
    dtype = np.dtype(dtype)
    if dtype in (np.dtype(np.float16), BFLOAT16):
        return ComputeType.C32F
    if not use_tensor_cores:
        return ComputeType.C32F_PEDANTIC
    return {
        ComputePrecision.FP32: ComputeType.C32F,
        ComputePrecision.TF32: ComputeType.C32F_FAST_TF32,
        ComputePrecision.FP16: ComputeType.C32F_FAST_16F,
        ComputePrecision.BF16: ComputeType.C32F_FAST_16BF,
    }[precision]
