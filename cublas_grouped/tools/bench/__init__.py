"""Benchmark of the MoE expert GEMMs and the whole MoE layer: ``python -m cublas_grouped.bench``.

For each case (a model's expert shapes x a token count x a routing) it times,
with CUDA events after warm-up (median of >= 20 calls per method):

- the first expert GEMM alone (gathered rows ``[R, H]`` @ ``w1 [E, H, 2I]``)
  with every algorithm and with AUTO, against a dense GEMM of the same FLOPs
  (the ceiling) and ``torch._grouped_mm`` when torch is importable; with
  ``--fp8`` also through ``gmm`` with FP8 weights (:mod:`.fp8`);
- the whole layer (``moe_forward``) per algorithm, AUTO and, for decode token
  counts, the fixed-capacity path; the routing kernel separately, and the
  stage split of AUTO, from which the layer's overhead (everything but the
  two GEMMs) follows;
- for decode token counts, one fixed-capacity layer forward replayed from a
  CUDA graph, against the floor set by reading the active experts' weights once.

The methods of a section are timed round-robin, so a GPU clock that drifts
during the run moves them alike (:mod:`.timing`). The table is printed last,
followed by the targets, each PASS or MISS with the numbers behind it. Before
the cases it prints the facts the numbers rest on: the HBM bandwidth used for
%HBM and the decode floor and where it came from, and which tuning table AUTO
uses and why. Failures of one (case, method) are recorded and the run goes
on. ``--json`` keeps every sample and the environment.

Modules: :mod:`.workloads` (models, cases, routings, FLOP and byte counts),
:mod:`.gpu` (device helpers, weights, HBM bandwidth), :mod:`.timing`
(round-robin and sequential timing), :mod:`.section` and :mod:`.runner`
(setting up and timing every method of a case), :mod:`.report` (table,
stage split, targets, JSON, plot), :mod:`.cli` (arguments, ``main``).
Everything up to the GPU work is plain NumPy and runs without a GPU.
"""

from .cli import build_parser, main, parse_args
from .gpu import (
    datasheet_hbm_gbs,
    describe_error,
    free_pool,
    no_gpu_reason,
    random_normal,
    resolve_hbm,
)
from .report import Result, evaluate_targets, format_split, format_table, merge_passes, plot, write_json
from .workloads import (
    ALGORITHMS,
    DTYPE_BYTES,
    MODELS,
    Case,
    ModelShape,
    build_cases,
    case_seed,
    expert_counts,
    expert_popularity,
    gbs,
    gemm1_flops,
    gemm1_weight_bytes,
    layer_flops,
    layer_weight_bytes,
    layout_rows,
    make_routing,
    routing_weights,
    skewed_routing,
    tflops,
    uniform_routing,
)

__all__ = [
    "ALGORITHMS",
    "DTYPE_BYTES",
    "MODELS",
    "Case",
    "ModelShape",
    "Result",
    "build_cases",
    "build_parser",
    "case_seed",
    "datasheet_hbm_gbs",
    "describe_error",
    "evaluate_targets",
    "expert_counts",
    "expert_popularity",
    "format_split",
    "format_table",
    "free_pool",
    "gbs",
    "gemm1_flops",
    "gemm1_weight_bytes",
    "layer_flops",
    "layer_weight_bytes",
    "layout_rows",
    "main",
    "make_routing",
    "merge_passes",
    "no_gpu_reason",
    "parse_args",
    "plot",
    "random_normal",
    "resolve_hbm",
    "routing_weights",
    "skewed_routing",
    "tflops",
    "uniform_routing",
    "write_json",
]
