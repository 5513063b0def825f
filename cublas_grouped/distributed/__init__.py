"""Expert parallelism over NCCL: experts split across GPUs, tokens sent to them and back.

One process per GPU (``python -m cublas_grouped.launch --nproc N script.py``);
:func:`init_process_group` joins the group, :class:`ExpertParallelMoE` is the
layer (:class:`FixedCapacityExpertParallelMoE`: the same without a host copy). :mod:`cublas_grouped.distributed.plan` models who sends what to whom in
NumPy. Nothing here imports NCCL until a group is created. See docs/distributed.md.
"""

from .fixed_capacity import FixedCapacityExpertParallelMoE
from .group import (
    CollectiveTimeoutError,
    DistributedError,
    LaunchEnv,
    ProcessGroup,
    init_process_group,
    read_launch_env,
)
from .layer import ExpertParallelMoE
from .plan import (
    ChunkPlan,
    Placement,
    chunk_bounds,
    chunk_layout,
    dispatch_model,
    forward_model,
    placement,
    receive_layout,
    send_layout,
    send_order,
)
from .store import StoreTimeoutError, TCPStore

__all__ = [
    "ChunkPlan",
    "CollectiveTimeoutError",
    "DistributedError",
    "ExpertParallelMoE",
    "FixedCapacityExpertParallelMoE",
    "LaunchEnv",
    "Placement",
    "ProcessGroup",
    "StoreTimeoutError",
    "TCPStore",
    "chunk_bounds",
    "chunk_layout",
    "dispatch_model",
    "forward_model",
    "init_process_group",
    "placement",
    "read_launch_env",
    "receive_layout",
    "send_layout",
    "send_order",
]
