"""Mutation testing of the host-side logic with mutmut, and its score.

``make mutation`` runs ``python tools/mutation.py run`` (mutmut over the CPU
suite, configured in pyproject.toml ``[tool.mutmut]``) and then ``report``:
every mutant in scope with its status, the score with equivalent mutants
excluded, and the survivors with the line they change. Not part of CI: a full
run takes minutes on two cores.

Scope (issue: tests that catch real bugs): planning and layouts (``gemm.plan``),
algorithm selection (``gemm.select``) and the tuning lookup (``gemm.tables``),
array views (``runtime.arrays``), options (``gemm.config``), the float64 references (``testing``),
the driver launch's argument packing (``runtime.launch``), the kernel cache
(``runtime.kernel_cache``), the file lock (``runtime.files``: a decorated
generator, which mutmut 3 does not mutate), the weight-gradient path rule
(``moe.weight_grad``), the expert-parallel dispatch plan (``distributed.plan``),
AUTO's remembered layer pair (``moe.dispatch.choose_algorithms``), and the
argument checks of the MoE layer (``moe/``: the ``check_*`` functions,
``layer_shape`` and ``route`` up to its first GPU step).
What runs on the GPU cannot be judged by CPU tests and is left out: lines of
``route`` and of the weight-gradient functions from their ``import cupy`` on,
``runtime.arrays.as_cupy`` and ``runtime.launch.driver`` (loads libcuda).

Equivalent mutants (no input can tell them apart from the original) are listed
in :data:`EQUIVALENT` with the reason, matched by function and by the exact
line they change (not by mutmut's numbering, which moves when the source
does), and left out of the score. docs/testing.md records the result.

Usage::

    python tools/mutation.py run [--max-children N]
    python tools/mutation.py report [--json PATH] [--all]
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"

#: mutmut mutant-name globs in scope (module path, then ``x_<function>`` or
#: ``xǁ<Class>ǁ<method>`` as mutmut mangles them).
SCOPE = (
    "cublas_grouped.gemm.plan.*",
    "cublas_grouped.gemm.select.*",
    "cublas_grouped.gemm.tables.*",
    "cublas_grouped.runtime.arrays.*",
    "cublas_grouped.runtime.files.*",
    "cublas_grouped.runtime.kernel_cache.*",
    "cublas_grouped.runtime.launch.*",
    "cublas_grouped.gemm.config.*",
    "cublas_grouped.testing.*",
    "cublas_grouped.moe.checks.x_check_*",
    "cublas_grouped.moe.checks.x_layer_shape__*",
    "cublas_grouped.moe.dispatch.x_check_*",
    "cublas_grouped.moe.dispatch.x_choose_algorithms__*",
    "cublas_grouped.moe.dispatch.x__choose_auto__*",
    "cublas_grouped.moe.fixed_capacity.x_check_*",
    "cublas_grouped.moe.routing.x_route__*",
    "cublas_grouped.moe.weight_grad.*",
    "cublas_grouped.distributed.plan.*",
    "cublas_grouped.moe.fp8_step.x_fp8_step_unsupported*",
    "cublas_grouped.gemm.backends.hopper_sizes.x_checks_device_sizes*",
    "cublas_grouped.gemm.backends.hopper_schedule.x_schedule_ints*",
    "cublas_grouped.gemm.backends.hopper_schedule.x_schedule_addresses*",
    "cublas_grouped.gemm.backends.hopper_schedule.x_offsets_args*",
    "cublas_grouped.gemm.backends.hopper_schedule.x_tile_schedule*",
    "cublas_grouped.gemm.backends.hopper_variants.*",
)
#: Functions that only run with a real GPU array (CuPy), out of scope.
GPU_ONLY = (
    "cublas_grouped.runtime.arrays.x_as_cupy",
    # Loads libcuda and declares its functions' types; CPU tests stand in a fake driver.
    "cublas_grouped.runtime.launch.x_driver",
)
#: Modules whose functions are cut at their first ``import cupy`` line.
GPU_CUT_MODULES = ("cublas_grouped.moe.routing", "cublas_grouped.moe.weight_grad")

#: (function, original line, mutated line, why no test can kill it). Lines are
#: stripped; several changed lines are joined with " / ".
EQUIVALENT: list[tuple[str, str, str, str]] = []


def _equivalent(function: str, original: str, mutated: list[str], why: str) -> None:
    EQUIVALENT.extend((f"cublas_grouped.{function}", original, m, why) for m in mutated)


_equivalent(
    "gemm.select.x_reset_tuning_cache",
    "_resets += 1",
    ["_resets -= 1", "_resets += 2"],
    "the counter is a generation token: a cached choice is reused only while it equals the value "
    "taken when the choice was made, and -1 or +2 per reset changes it on every reset as +1 does",
)


_INT_ONLY = (
    "NumPy gives int64 for the integer sizes the model is called with (Linux, 64-bit): the dtype "
    "only differs for float sizes, which no caller passes"
)
_equivalent(
    "gemm.backends.hopper_schedule.x_tile_schedule",
    "sizes = np.maximum(np.asarray(sizes, dtype=np.int64), 0)",
    ["sizes = np.maximum(np.asarray(sizes, dtype=None), 0)", "sizes = np.maximum(np.asarray(sizes, ), 0)"],
    _INT_ONLY,
)
_equivalent(
    "gemm.backends.hopper_schedule.x_tile_schedule",
    "starts = np.arange(len(sizes), dtype=np.int64) * capacity",
    ["starts = np.arange(len(sizes), dtype=None) * capacity", "starts = np.arange(len(sizes), ) * capacity"],
    _INT_ONLY,
)
_equivalent(
    "gemm.backends.hopper_schedule.x_tile_schedule",
    "starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)",
    ["starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(None)"],
    "astype(None) is float64, and the result is cast to int64 at the end: the same integers below 2**53",
)
_equivalent(
    "gemm.backends.hopper_schedule.x_tile_schedule",
    "return np.stack([group, first, rows], axis=1).astype(np.int64).reshape(-1, 3)",
    ["return np.stack([group, first, rows], axis=1).astype(np.int64).reshape(-2, 3)"],
    "NumPy reads any negative size in reshape as 'the rest', as -1",
)


_TYPESTR = "if descr and isinstance(descr, (list, tuple)) and descr and descr[0]:"
_equivalent(
    "runtime.arrays.x__dtype_from_typestr",
    _TYPESTR,
    [
        "if descr and isinstance(descr, (list, tuple)) or descr and descr[0]:",
        "if descr or isinstance(descr, (list, tuple)) and descr and descr[0]:",
    ],
    "agrees with the original for every descr the interface allows (a list of (name, typestr) "
    "tuples); differs only for a descr of another type",
)
_equivalent(
    "gemm.config.x_coerce_enum",
    "return kind(str(value).lower())",
    ["return kind(None)", "return kind(str(value).upper())", "return kind(str(None).lower())"],
    "the value path and the name path accept the same strings, because every member's value is its "
    "lower-case name (test_enum_values_are_their_lower_case_names); with this path broken the name path answers",
)
_equivalent(
    "gemm.config.x_coerce_enum",
    "if isinstance(value, str) and value.upper() in kind.__members__:",
    ["if isinstance(value, str) and value.lower() in kind.__members__:"],
    "the name path is only reached for strings the value path already refused, which no member name matches",
)
_equivalent(
    "gemm.config.x_coerce_enum",
    "return kind[value.upper()]",
    ["return kind[value.lower()]"],
    "unreachable for a valid name: the value path accepts every member name first (see above)",
)
_ROUTE_DEF = (
    'def x_route__mutmut_(router_logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = True, '
    "stream=None):"
)
_equivalent(
    "moe.routing.x_route",
    _ROUTE_DEF,
    [_ROUTE_DEF.replace("renormalize: bool = True", "renormalize: bool = False")],
    "on the CPU: the default is read only by the kernel launch; killed on the GPU by "
    "test_moe_gpu.py::test_route_matches_reference (route with the default against route_ref's)",
)
_equivalent(
    "gemm.plan.xǁGemmPlanǁdims_arrays",
    "probe = self.dims(1)",
    ["probe = self.dims(2)"],
    "the only field of the probe that depends on the rows (n, or k with trans_a) is overwritten with the real rows",
)
_equivalent(
    "gemm.plan.xǁProblemStatsǁfeatures",
    "dtype=np.float64,",
    ["dtype=None,"],
    "np.array of Python floats is float64 anyway",
)
_equivalent(
    "gemm.plan.xǁProblemStatsǁfeatures",
    "dtype=np.float64, / )",
    [")"],
    "np.array of Python floats is float64 anyway",
)
_ENTRY = 'entry["num_experts"], active, total, max_rows, entry["n"], entry["k"], entry["dtype"]'
_equivalent(
    "gemm.tables.xǁTuningTableǁ__post_init__",
    _ENTRY,
    [_ENTRY.replace('entry["dtype"]', "None")],
    "these stats only give features(), which ignore the dtype; entries are grouped by entry['dtype'] directly",
)
_equivalent(
    "gemm.tables.xǁTuningTableǁ__post_init__",
    _ENTRY + " / )",
    [_ENTRY.replace(', entry["dtype"]', ", )")],
    "these stats only give features(), which ignore the dtype; entries are grouped by entry['dtype'] directly",
)
_MKSTEMP = 'fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")'
_equivalent(
    "gemm.tables.xǁTuningTableǁsave",
    _MKSTEMP,
    [
        _MKSTEMP.replace('prefix=path.name + "."', "prefix=None"),
        _MKSTEMP.replace('suffix=".tmp"', "suffix=None"),
        _MKSTEMP.replace('prefix=path.name + ".", ', ""),
        _MKSTEMP.replace(', suffix=".tmp"', ", "),
        _MKSTEMP.replace('path.name + "."', 'path.name + "XX.XX"'),
        _MKSTEMP.replace('".tmp"', '"XX.tmpXX"'),
        _MKSTEMP.replace('".tmp"', '".TMP"'),
    ],
    "only the temporary file's name changes; it stays in the table's folder and never ends in .json, "
    "so no reader takes it for a table (test_table_load_and_atomic_save checks both)",
)
_equivalent(
    "gemm.tables.xǁTuningTableǁsave",
    "json.dump(self.to_json(), f, indent=1)",
    [
        "json.dump(self.to_json(), f, indent=None)",
        "json.dump(self.to_json(), f, )",
        "json.dump(self.to_json(), f, indent=2)",
    ],
    "indentation of the JSON file only; the content read back is the same",
)
_equivalent(
    "gemm.tables.xǁTuningTableǁsave",
    "Path(tmp).unlink(missing_ok=True)",
    ["Path(tmp).unlink(missing_ok=None)", "Path(tmp).unlink(missing_ok=False)"],
    "the temporary file always exists when it is removed (mkstemp made it; only the write or the rename failed)",
)
_LARGEST = "total, largest = int(sizes.sum()), int(sizes.max(initial=0))"
_equivalent(
    "gemm.select.x__choose_layer",
    _LARGEST,
    [_LARGEST.replace("initial=0", "initial=None"), _LARGEST.replace("initial=0", "initial=1")],
    "initial only matters when every count is 0 (or there are none: a layer has at least one expert); "
    "with no rows max_rows enters no decision (padding ratio inf, skew 1)",
)
_QUARTER = "quarter = lambda v: round(4 * math.log2(max(v, 1e-9)))  # noqa: E731"
_equivalent(
    "gemm.select.x__choose_layer",
    _QUARTER,
    [_QUARTER.replace("4 *", "5 *"), _QUARTER.replace("1e-9", "1.000000001")],
    "memo granularity: finer buckets only cost cache hits; every argument of quarter() is >= 1, "
    "so the clamp at 1e-9 or 1.000000001 never bites",
)
_equivalent(
    "gemm.select.x__choose_layer",
    "quarter(first_stats.mean_rows + 1),",
    ["quarter(first_stats.mean_rows - 1),", "quarter(first_stats.mean_rows + 2),"],
    "moves the memo's bucket edges by a row or two without making buckets coarser: which loads share a "
    "cached decision is a cache granularity, not a documented value",
)
_equivalent(
    "gemm.select.x__choose_layer",
    "second = None",
    ['second = ""'],
    "both are falsy and second is only read as a truth value unless it was reassigned",
)
_FOUND = "found = (choice, on_layout(choice)[1] if on_layout(choice)[0] < math.inf else choice)"
_equivalent(
    "gemm.select.x__choose_layer",
    _FOUND,
    [
        "found = (choice, on_layout(choice)[1] if (on_layout(choice)[0] < math.inf) or True else choice)",
        "found = (choice, on_layout(choice)[1] if on_layout(None)[0] < math.inf else choice)",
        "found = (choice, on_layout(choice)[1] if on_layout(choice)[0] <= math.inf else choice)",
    ],
    "when on_layout(choice) finds no time it returns (inf, choice), so both branches give choice",
)
_equivalent(
    "gemm.select.x__choose_layer",
    "if len(_layer_choices) > 4096:",
    ["if len(_layer_choices) >= 4096:", "if len(_layer_choices) > 4097:"],
    "when the memo is emptied (one entry sooner or later) changes cache hits, not decisions",
)
_equivalent(
    "gemm.plan.x_capacity_for",
    "return max(multiple, int(math.ceil(int(sizes.max(initial=0)) / multiple) * multiple))",
    ["return max(multiple, int(math.ceil(int(sizes.max(initial=1)) / multiple) * multiple))"],
    "a largest group of 1 instead of 0 still rounds to one multiple, which max(multiple, ...) gives anyway",
)
_equivalent(
    "testing.x__apply_act",
    "return np.where(z < 0.0, 0.0, z)",
    ["return np.where(z <= 0.0, 0.0, z)"],
    "differs only in the sign of a zero result (-0.0 vs 0.0 for z = -0.0), which compare equal",
)
_ARGSORT = 'ids = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]'
_equivalent(
    "testing.x_route_ref",
    _ARGSORT,
    ['ids = np.argsort(-scores, kind="stable")[:, :top_k]', _ARGSORT.replace('"stable"', '"STABLE"')],
    "the default axis -1 is axis 1 of the 2-D scores; NumPy reads the sort kind case-insensitively",
)
_equivalent(
    "testing.x_route_ref",
    "weights = np.take_along_axis(scores, ids, axis=1)",
    ["weights = np.take_along_axis(scores, ids, )"],
    "the default axis -1 is axis 1 of the 2-D scores",
)
_equivalent(
    "testing.x_plan_ref",
    'order = np.argsort(ids, kind="stable")  # pairs in (expert, pair) order',
    ['order = np.argsort(ids, kind="STABLE")  # pairs in (expert, pair) order'],
    "NumPy reads the sort kind case-insensitively",
)
_RESHAPE_WHY = "NumPy infers any negative size, so reshape(-2) is reshape(-1)"
_equivalent(
    "testing.x_plan_ref",
    "ids = np.asarray(topk_ids).reshape(-1).astype(np.int64)",
    ["ids = np.asarray(topk_ids).reshape(-2).astype(np.int64)"],
    _RESHAPE_WHY,
)
for _fn, _line in (
    ("testing.x_gather_ref", "r2p = np.asarray(row_to_pair).astype(np.int64).reshape(-1)"),
    ("testing.x_scatter_ref", "p2r = np.asarray(pair_to_row).astype(np.int64).reshape(-1)"),
    ("testing.x_activation_ref", "re = np.asarray(row_expert).astype(np.int64).reshape(-1)"),
    ("testing.x_gmm_ref", "sizes = np.asarray(group_sizes).astype(np.int64).reshape(-1)"),
):
    _equivalent(_fn, _line, [_line.replace("reshape(-1)", "reshape(-2)")], _RESHAPE_WHY)
_equivalent(
    "testing.x_gmm_ref",
    "sizes = np.asarray(group_sizes).astype(np.int64).reshape(-1)",
    ["sizes = np.asarray(group_sizes).astype(np.int64).reshape(None)"],
    "sizes are only used through size, cumsum and element tests, which all flatten",
)
_INT_WHY = (
    "an intermediate of float64 or platform int instead of int64 holds the same small integers "
    "exactly; the results are cast to int32"
)
for _line in (
    "counts = np.bincount(ids, minlength=num_experts).astype(np.int64)",
    "row_offsets = np.zeros(num_experts + 1, dtype=np.int64)",
    "first_of_expert = np.zeros(num_experts, dtype=np.int64)",
    "rank = np.arange(ids.size, dtype=np.int64) - first_of_expert[sorted_ids]",
    "row_to_pair = np.full(int(row_offsets[-1]), -1, dtype=np.int64)",
):
    _mutated = [_line.replace("dtype=np.int64", "dtype=None"), _line.replace(", dtype=np.int64", ", ")]
    if "astype" in _line:
        _mutated = [_line.replace("astype(np.int64)", "astype(None)")]
    _equivalent("testing.x_plan_ref", _line, _mutated, _INT_WHY)
_ZEROS_WHY = "np.zeros and np.full default to float64"
for _fn, _line in (
    ("testing.x_gather_ref", "out = np.zeros((r2p.size, x.shape[1]), dtype=np.float64)"),
    ("testing.x_scatter_ref", "out = np.zeros((p2r.size, y.shape[1]), dtype=np.float64)"),
    ("testing.x_combine_ref", "out = np.zeros((num_tokens, y.shape[1]), dtype=np.float64)"),
    ("testing.x_gmm_ref", "out = np.zeros((num_groups, a.shape[1], b.shape[1]), dtype=np.float64)"),
    ("testing.x_gmm_ref", "out = np.zeros((a.shape[0], w.shape[2]), dtype=np.float64)"),
    ("testing.x_moe_forward_ref", "out = np.zeros((num_tokens, x.shape[1]), dtype=np.float64)"),
):
    _equivalent(
        _fn,
        _line,
        [_line.replace("dtype=np.float64", "dtype=None"), _line.replace(", dtype=np.float64", ", ")],
        _ZEROS_WHY,
    )
_equivalent(
    "testing.x_moe_forward_ref",
    'activation: str = "silu",',
    ['activation: str = "SILU",'],
    "activation names are read case-insensitively",
)
_equivalent(
    "testing.x_moe_forward_ref",
    "ids = np.asarray(topk_ids).astype(np.int64)",
    ["ids = np.asarray(topk_ids).astype(None)"],
    "float64 ids compare equal to the expert numbers and are only used through np.nonzero and comparisons",
)
_equivalent(
    "testing.x_rel_error",
    "if np.isnan(o).any() or np.isnan(r).any():",
    ["if np.isnan(o).any() and np.isnan(r).any():"],
    "a NaN on one side makes the difference NaN, which the next check turns into inf as well",
)
_equivalent(
    "runtime.launch.xǁ_Packerǁ__init__",
    "pad = -size % width",
    ["pad = +size % width"],
    "the widths are 4 and 8 bytes and every offset is a multiple of 4, so size % width is 0 or 4 "
    "(the latter only for width 8), where -size % width gives the same",
)
_equivalent(
    "runtime.launch.xǁ_Packerǁ__init__",
    "self.buffer = ctypes.create_string_buffer(max(size, 8))",
    ["self.buffer = ctypes.create_string_buffer(max(size, 9))"],
    "a byte of spare room after the arguments (or in the buffer of no arguments) that nothing reads",
)
_equivalent(
    "runtime.launch.xǁ_Packerǁ__init__",
    "self.pointers = (ctypes.c_void_p * max(len(codes), 1))(*[base + o for o in offsets])",
    ["self.pointers = (ctypes.c_void_p * max(len(codes), 2))(*[base + o for o in offsets])"],
    "a spare null pointer after the arguments' pointers: the driver reads as many as the kernel has parameters",
)
_UPLOAD = 'base, _, _ = upload_pointers(res, "weight-grad-pointers", ops, offsets[experts], experts)'
_equivalent(
    "moe.weight_grad.x__bucketed",
    _UPLOAD,
    [
        _UPLOAD.replace('"weight-grad-pointers"', "None"),
        _UPLOAD.replace('"weight-grad-pointers"', '"XXweight-grad-pointersXX"'),
        _UPLOAD.replace('"weight-grad-pointers"', '"WEIGHT-GRAD-POINTERS"'),
    ],
    "the name only keys the resources' upload buffers: any name no other caller uses is the same "
    "(test_bucketed_calls checks it is none of the forward's)",
)
_STATS = "stats = ProblemStats.from_sizes(sizes, n, k, np.dtype(dtype).name)"
_equivalent(
    "moe.weight_grad.x_weight_grad_path",
    _STATS,
    [
        _STATS.replace("sizes, n, k", "sizes, None, k"),
        _STATS.replace("n, k, np", "n, None, np"),
        _STATS.replace("np.dtype(dtype).name", "None"),
        _STATS.replace("np.dtype(dtype)", "np.dtype(None)"),
    ],
    "with no table and no times select_algorithm decides by its rule, which reads the row counts "
    "only (test_rule_by_layout checks no table is read)",
)
_equivalent(
    "testing.x_route_backward_ref",
    "chosen = np.take_along_axis(scores, ids, axis=1)",
    ["chosen = np.take_along_axis(scores, ids, )"],
    "the default axis -1 is axis 1 of the 2-D scores",
)
_equivalent(
    "runtime.arrays.x__foreign_dtype",
    "key = (type(obj), own, typestr, None if descr is None else repr(descr))",
    ["key = (type(obj), own, typestr, None if (descr is None) and False else repr(descr))"],
    "an absent descr is keyed as 'None' instead of None: still one key for it, which no descr's repr matches",
)
_equivalent(
    "runtime.arrays.x__foreign_dtype",
    "dtype = _FOREIGN_DTYPES.get(key) if key is not None else None",
    ["dtype = _FOREIGN_DTYPES.get(key) if (key is not None) or True else None"],
    "nothing is ever stored under the key None, so the lookup gives None as the other branch does",
)
_PAIR_KEY = (
    'key = ("layer-pair", executor.config, tuning_state(info), state_token(), dtype, n, k, second_gemm)'
)
_equivalent(
    "moe.dispatch.x_choose_algorithms",
    _PAIR_KEY,
    [
        _PAIR_KEY.replace('"layer-pair"', '"XXlayer-pairXX"'),
        _PAIR_KEY.replace('"layer-pair"', '"LAYER-PAIR"'),
    ],
    "the tag only keeps these remembered choices apart from the other callers' keys, which start "
    "with no such string",
)
_equivalent(
    "distributed.plan.x_receive_layout",
    "return rows, offsets, np.repeat(local, counts.reshape(-1))",
    ["return rows, offsets, np.repeat(local, counts.reshape(-2))"],
    _RESHAPE_WHY,
)
_BINCOUNT = (
    "counts = [np.bincount(np.asarray(ids).reshape(-1), minlength=num_experts) for ids in ids_per_rank]"
)
_equivalent("distributed.plan.x_dispatch_model", _BINCOUNT, [_BINCOUNT.replace("(-1)", "(-2)")], _RESHAPE_WHY)
_equivalent(
    "distributed.plan.x_dispatch_model",
    "order = send_order(ids, num_experts)",
    ["order = send_order(ids, None)"],
    "send_order does not read num_experts: its key expert * pairs + pair needs only the pair count",
)
_W12 = "w1, w2 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)"
_equivalent(
    "distributed.plan.x_forward_model",
    _W12,
    [
        _W12.replace("np.asarray(w1, np.float64)", "np.asarray(w1, None)"),
        _W12.replace("np.asarray(w1, np.float64)", "np.asarray(w1, )"),
        _W12.replace("np.asarray(w2, np.float64)", "np.asarray(w2, None)"),
        _W12.replace("np.asarray(w2, np.float64)", "np.asarray(w2, )"),
    ],
    "the weights only enter products with float64 rows, which convert them to float64 exactly first",
)
_W = "w = np.ones((tokens, k)) if weights_per_rank is None else np.asarray(weights_per_rank[s], np.float64)"
_equivalent(
    "distributed.plan.x_forward_model",
    _W,
    [
        _W.replace("np.asarray(weights_per_rank[s], np.float64)", f"np.asarray(weights_per_rank[s], {d})")
        for d in ("None", "")
    ],
    "the routing weights only multiply float64 rows, which converts them to float64 exactly first",
)
_equivalent(
    "distributed.plan.x_forward_model",
    "gate, up = np.split(h, 2, axis=-1)",
    ["gate, up = np.split(h, 2, axis=+1)"],
    "h is always 2-D (one row, [1, 2I]): axis 1 is the last axis",
)
_SEND = 'return np.argsort(flat * max(pairs, 1) + np.arange(pairs), kind="stable")'
_equivalent(
    "distributed.plan.x_send_order",
    _SEND,
    [
        _SEND.replace('kind="stable"', "kind=None"),
        _SEND.replace(', kind="stable"', ", "),
        _SEND.replace('"stable"', '"STABLE"'),
    ],
    "the key expert * pairs + pair is unique, so every sort gives the same order",
)
_equivalent(
    "distributed.plan.x_send_order",
    _SEND,
    [_SEND.replace("max(pairs, 1)", "max(pairs, 2)")],
    "differs only with fewer than two pairs, where there is nothing to order",
)
_equivalent(
    "distributed.plan.x_send_order",
    "flat = np.asarray(topk_ids, dtype=np.int64).reshape(-1)",
    ["flat = np.asarray(topk_ids, dtype=np.int64).reshape(-2)"],
    _RESHAPE_WHY,
)
_TRAFFIC = "traffic.append(RankTraffic(order, rows, sent, recv_counts, np.zeros((0, 4), np.int64)))"
_equivalent(
    "distributed.plan.x_dispatch_model",
    _TRAFFIC,
    [
        _TRAFFIC.replace("np.zeros((0, 4), np.int64)", x)
        for x in (
            "None",
            "np.zeros((0, 4), None)",
            "np.zeros((0, 4), )",
            "np.zeros((1, 4), np.int64)",
            "np.zeros((0, 5), np.int64)",
        )
    ],
    "a placeholder: the loop that follows sets every rank's received rows",
)
for _line in (
    "flat = np.asarray(ids_per_rank[s]).reshape(-1)",
    "mine.received = np.array(lines, dtype=np.int64).reshape(-1, 4)",
):
    _equivalent("distributed.plan.x_dispatch_model", _line, [_line.replace("(-1", "(-2")], _RESHAPE_WHY)
_WARN = (
    'warnings.warn(f"cublas_grouped ignores a damaged tuning file ({what})", RuntimeWarning, stacklevel=3)'
)
_equivalent(
    "gemm.tables.x_warn_ignored_file",
    _WARN,
    [_WARN.replace(", stacklevel=3", ", "), _WARN.replace("stacklevel=3", "stacklevel=4")],
    "only the frame the warning is attributed to moves, inside the library's table readers either way; "
    "it is shown once per file and problem by the library's own record, whatever the frame",
)
_RELU_GRAD = "return np.where(z > 0.0, 1.0, np.where(z <= 0.0, 0.0, z))"
_equivalent(
    "testing.x__act_grad",
    _RELU_GRAD,
    [_RELU_GRAD.replace("z <= 0.0", "z < 0.0")],
    "differs only at z = +-0.0, where z itself is the zero the original returns (equal to 0.0)",
)
_equivalent(
    "testing.x__act_grad",
    _RELU_GRAD,
    [_RELU_GRAD.replace("z <= 0.0", "z <= 1.0")],
    "the inner test only sees z <= 0 or NaN (the outer one took z > 0), where <= 0 and <= 1 agree",
)
_equivalent(
    "testing.x_moe_backward_ref",
    'activation: str = "silu",',
    ['activation: str = "SILU",'],
    "activation names are read case-insensitively",
)
_equivalent(
    "testing.x_moe_backward_ref",
    "ids = np.asarray(topk_ids).astype(np.int64)",
    ["ids = np.asarray(topk_ids).astype(None)"],
    "float64 ids compare equal to the expert numbers and are only used through np.nonzero and comparisons",
)
_equivalent(
    "runtime.arrays.x__interface",
    'if not getattr(obj, "requires_grad", False):',
    ['if not getattr(obj, "requires_grad", None):'],
    "None and False are both falsy, and the default is only read as a truth value",
)
_NO_CUPY = '_CUPY_NDARRAY = type("_NoCupy", (), {})'
_equivalent(
    "runtime.arrays.x__cupy_ndarray",
    _NO_CUPY,
    [_NO_CUPY.replace('"_NoCupy"', x) for x in ('"XX_NoCupyXX"', '"_nocupy"', '"_NOCUPY"')],
    "the stand-in type's name is never shown: no object has the type",
)
_equivalent(
    "gemm.tables.x_entry_problem",
    'dtype, layout = entry.get("dtype"), entry.get("layout", "")',
    ['dtype, layout = entry.get("dtype"), entry.get("layout", "XXXX")'],
    "an absent layout is only checked for being a short string, which both defaults are",
)
_equivalent(
    "gemm.tables.x__parse_sm",
    "major = minor = -1",
    ["major = minor = -2"],
    "any value out of [0, 100) is refused the same way",
)
_equivalent(
    "runtime.kernel_cache.xǁKernelCacheǁdiscard",
    "stacklevel=4, / )",
    [")"],
    "only the frame the warning is attributed to moves, inside the library's kernel loader either way",
)
_equivalent(
    "runtime.kernel_cache.xǁKernelCacheǁdiscard",
    "stacklevel=4,",
    ["stacklevel=5,"],
    "only the frame the warning is attributed to moves, inside the library's kernel loader either way",
)
_FRAME = 'return cubin + MAGIC + struct.pack("<Q", len(cubin)) + hashlib.sha256(cubin).digest()'
_equivalent(
    "runtime.kernel_cache.x_frame",
    _FRAME,
    [_FRAME.replace('"<Q"', '"<q"')],
    "signed and unsigned 64-bit integers have the same bytes for any length below 2^63",
)
_KC_TMP = 'fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")'
_equivalent(
    "runtime.kernel_cache.xǁKernelCacheǁput",
    _KC_TMP,
    [
        _KC_TMP.replace('prefix=f".{path.stem[:16]}."', "prefix=None"),
        _KC_TMP.replace('suffix=".tmp"', "suffix=None"),
        _KC_TMP.replace('prefix=f".{path.stem[:16]}.", ', ""),
        _KC_TMP.replace(', suffix=".tmp"', ", "),
        _KC_TMP.replace("[:16]", "[:17]"),
        _KC_TMP.replace('".tmp"', '"XX.tmpXX"'),
        _KC_TMP.replace('".tmp"', '".TMP"'),
    ],
    "only the temporary file's name changes; it stays in the entry's folder and never ends in .cubin, "
    "and the cache only ever opens an entry by its exact name (test_an_entry_is_written_beside_its_final_name)",
)
_equivalent(
    "runtime.kernel_cache.xǁKernelCacheǁput",
    "with contextlib.suppress(OSError):",
    ["with contextlib.suppress(None):"],
    "the temporary file always exists when it is removed (mkstemp made it; only the write or the rename failed)",
)
_equivalent(
    "gemm.tables.x__read_json",
    'return json.loads(raw.decode("utf-8"))',
    ['return json.loads(raw.decode("UTF-8"))'],
    "Python reads codec names case-insensitively",
)
_NOT_JSON = 'raise ValueError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None'
_equivalent(
    "gemm.tables.x__read_json",
    _NOT_JSON,
    [_NOT_JSON.replace("[:200]", "[:201]")],
    "a guard only: the messages of json's, UTF-8's and the recursion limit's errors are far shorter than 200 "
    "characters (a line, a column and a byte position at most)",
)
_SEND_COUNTS = (
    "counts = np.asarray(counts_per_expert, dtype=np.int64).reshape(where.world_size, where.experts_per_rank)"
)
_RECV_COUNTS = "counts = np.asarray(recv_counts, dtype=np.int64)"
_SUM_WHY = (
    "the counts are integers and only reach the results through sum and cumsum, which NumPy accumulates "
    "in the platform integer (int64) for smaller integer types (test_layouts_are_int64_whatever_the_counts_type)"
)
for _fn, _line in (("x_send_layout", _SEND_COUNTS), ("x_receive_layout", _RECV_COUNTS)):
    _equivalent(
        f"distributed.plan.{_fn}",
        _line,
        [_line.replace("dtype=np.int64", "dtype=None"), _line.replace(", dtype=np.int64", ", ")],
        _SUM_WHY,
    )
_OPEN = 'fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))'
_equivalent(
    "runtime.kernel_cache.xǁKernelCacheǁ_read",
    _OPEN,
    [
        _OPEN.replace('"O_NOFOLLOW", 0', '"O_NOFOLLOW", None'),
        _OPEN.replace('"O_NOFOLLOW", 0', '"O_NOFOLLOW", '),
        _OPEN.replace('"O_NOFOLLOW", 0', '"O_NOFOLLOW", 1'),
        _OPEN.replace('"O_NONBLOCK", 0', '"O_NONBLOCK", None'),
        _OPEN.replace('"O_NONBLOCK", 0', '"O_NONBLOCK", '),
        _OPEN.replace('"O_NONBLOCK", 0', '"O_NONBLOCK", 1'),
    ],
    "on POSIX, where the suite runs, os has both flags and the defaults are never read; they stand in "
    "only on platforms without them",
)
_equivalent(
    "runtime.kernel_cache.x__current_uid",
    'return os.getuid() if hasattr(os, "getuid") else None',
    ['return os.getuid() if (hasattr(os, "getuid")) or True else None'],
    "on POSIX, where the suite runs, os has getuid; the None branch stands in only elsewhere",
)
_LOOP = 'if getattr(os, "O_NOFOLLOW", 0) and exc.errno == errno.ELOOP:'
_equivalent(
    "runtime.kernel_cache.xǁKernelCacheǁget",
    _LOOP,
    [
        _LOOP.replace('"O_NOFOLLOW", 0', '"O_NOFOLLOW", None'),
        _LOOP.replace('"O_NOFOLLOW", 0', '"O_NOFOLLOW", '),
        _LOOP.replace('"O_NOFOLLOW", 0', '"O_NOFOLLOW", 1'),
    ],
    "on POSIX os has O_NOFOLLOW, so the default is never read (the same flag as the open above)",
)
_equivalent(
    "runtime.kernel_cache.xǁKernelCacheǁ_read",
    'return (b"", problem) if problem else (f.read(), None)',
    ['return (b"XXXX", problem) if problem else (f.read(), None)'],
    "with a problem the caller discards the entry and never reads the bytes returned beside it",
)

_equivalent(
    "distributed.plan.x_chunk_layout",
    "send = np.asarray(send_counts, dtype=np.int64)",
    ["send = np.asarray(send_counts, dtype=None)", "send = np.asarray(send_counts, )"],
    "the counts are integers: their sums are taken in the platform integer either way (NumPy widens "
    "int32 sums), and no count total reaches 2**31",
)
_equivalent(
    "distributed.plan.x_chunk_layout",
    "recv = np.asarray(recv_counts, dtype=np.int64)",
    ["recv = np.asarray(recv_counts, dtype=None)", "recv = np.asarray(recv_counts, )"],
    "as for send: integer counts, summed in the platform integer either way",
)
_equivalent(
    "distributed.plan.x_chunk_layout",
    "starts = np.concatenate([[0], np.cumsum(send.reshape(-1))])  # send offset of (d, e) at d * epr + e",
    [
        "starts = np.concatenate([[0], np.cumsum(send.reshape(None))])  # send offset of (d, e) at d * epr + e",
        "starts = np.concatenate([[0], np.cumsum(send.reshape(-2))])  # send offset of (d, e) at d * epr + e",
    ],
    "np.cumsum without an axis flattens its input whatever its shape; reshape(None) and reshape(-2) "
    "leave the values in the same order",
)
_equivalent(
    "distributed.plan.x_chunk_layout",
    "ids.append(np.repeat(np.arange(lo, hi, dtype=np.int32), recv[s, lo:hi]))",
    [
        "ids.append(np.repeat(np.arange(lo, hi, dtype=None), recv[s, lo:hi]))",
        "ids.append(np.repeat(np.arange(lo, hi, ), recv[s, lo:hi]))",
    ],
    "the concatenated ids are cast to int32 at the end (.astype(np.int32)); expert indices fit any integer type",
)
_equivalent(
    "moe.fp8_step.x_fp8_step_unsupported",
    'view(w.values, f"{name}.values").ptr',
    ["view(w.values, None).ptr"],
    "the name only labels view's refusal of a value that is not an array, and FP8ExpertWeights "
    "refuses such values at construction: the call cannot reach that refusal",
)
_equivalent(
    "moe.fp8_step.x_fp8_step_unsupported",
    "if reason is None and view(w, name).ptr % hopper.ALIGNMENT:",
    ["if reason is None and view(w, None).ptr % hopper.ALIGNMENT:"],
    "as above: the name labels a refusal of non-arrays, and layer_shape refused those before",
)
_equivalent(
    "runtime.launch.xǁFixedLaunchǁ__init__",
    "pointers = (ctypes.c_void_p * max(len(args), 1)).from_address(self.holder.ptr)",
    ["pointers = (ctypes.c_void_p * max(len(args), 2)).from_address(self.holder.ptr)"],
    "the array type only bounds which entries may be read, and only the slots' entries are read, "
    "each below len(args): no read changes",
)

STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    33: "no tests",
    5: "no tests",
    36: "timeout",
    24: "timeout",
}
STATUS.update({-24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault"})


@dataclass
class Mutant:
    name: str
    function: str
    status: str
    original: str
    mutated: str
    verdict: str  # killed / survived / equivalent / out of scope
    reason: str = ""


_MANGLED = re.compile(r"__mutmut_(orig|\d+)")


def _mangled_function(name: str) -> str:
    return name.rsplit("__mutmut_", 1)[0]


def _changed_lines(lines: list[str], orig: tuple[int, int], mutant: tuple[int, int]) -> tuple[int, str, str]:
    """(index of the first changed line in the function, original text, mutated text)."""
    # The def lines differ by the mangled name only: compare without it.
    a = [_MANGLED.sub("__mutmut_", s) for s in lines[orig[0] : orig[1]]]
    b = [_MANGLED.sub("__mutmut_", s) for s in lines[mutant[0] : mutant[1]]]
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    first, old, new = None, [], []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        first = i1 if first is None else first
        old += [s.strip() for s in a[i1:i2]]
        new += [s.strip() for s in b[j1:j2]]
    return (first if first is not None else 0), " / ".join(old), " / ".join(new)


def _gpu_cut(lines: list[str], orig: tuple[int, int]) -> int | None:
    for i, line in enumerate(lines[orig[0] : orig[1]]):
        if line.strip() == "import cupy":
            return i
    return None


def collect() -> list[Mutant]:
    """Every mutant mutmut generated for the scoped modules, with its verdict."""
    found = []
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        source = meta.with_suffix("")
        spans = json.loads(meta.with_suffix(".spans").read_text())["spans"]
        lines = source.read_text().splitlines()
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if not any(fnmatch.fnmatchcase(name, g) for g in SCOPE):
                continue
            module, _, local = name.rpartition(".")
            function = f"{module}.{_mangled_function(local)}"
            orig_span = spans[f"{_mangled_function(local)}__mutmut_orig"]
            at, old, new = _changed_lines(lines, orig_span, spans[local])
            status = STATUS.get(code, "not checked" if code is None else f"exit {code}")
            verdict = "killed" if status in ("killed", "timeout", "segfault") else "survived"
            reason = ""
            cut = _gpu_cut(lines, orig_span) if module in GPU_CUT_MODULES else None
            if function in GPU_ONLY or (cut is not None and at >= cut):
                verdict, reason = "out of scope", "GPU work (not testable on the CPU)"
            elif verdict == "survived":
                for func, eq_old, eq_new, why in EQUIVALENT:
                    if func == function and eq_old == old and eq_new == new:
                        verdict, reason = "equivalent", why
                        break
            found.append(Mutant(name, function, status, old, new, verdict, reason))
    return found


def report(args) -> int:
    if not MUTANTS.is_dir():
        print("no mutants/ folder: run `python tools/mutation.py run` first", file=sys.stderr)
        return 2
    mutants = collect()
    by_function: dict[str, dict[str, int]] = {}
    for m in mutants:
        counts = by_function.setdefault(m.function, {})
        counts[m.verdict] = counts.get(m.verdict, 0) + 1
    verdicts = ("killed", "survived", "equivalent", "out of scope")
    print(f"{'function':64s} " + " ".join(f"{v:>12s}" for v in verdicts))
    for function, counts in sorted(by_function.items()):
        print(f"{function:64s} " + " ".join(f"{counts.get(v, 0):12d}" for v in verdicts))
    by_module: dict[str, dict[str, int]] = {}
    for m in mutants:
        counts = by_module.setdefault(m.function.rsplit(".", 1)[0], {})
        counts[m.verdict] = counts.get(m.verdict, 0) + 1
    print()
    for module, counts in sorted(by_module.items()):
        scored_here = counts.get("killed", 0) + counts.get("survived", 0)
        rate = 100 * counts.get("killed", 0) / scored_here if scored_here else 100.0
        print(f"{module:64s} " + " ".join(f"{counts.get(v, 0):12d}" for v in verdicts) + f"   {rate:5.1f}%")
    total = {v: sum(m.verdict == v for m in mutants) for v in verdicts}
    scored = total["killed"] + total["survived"]
    score = total["killed"] / scored if scored else 1.0
    print()
    print(
        f"mutants: {len(mutants)} generated in scope, {total['out of scope']} GPU-only left out, "
        f"{total['equivalent']} equivalent"
    )
    print(f"score: {total['killed']} killed / {scored} = {100 * score:.1f}%")
    survivors = [m for m in mutants if m.verdict == "survived"]
    if survivors:
        print()
        print("survivors:")
        for m in survivors:
            print(f"  {m.name} [{m.status}]\n      - {m.original}\n      + {m.mutated}")
    if args.all:
        print()
        print("equivalent:")
        for m in mutants:
            if m.verdict == "equivalent":
                print(f"  {m.name}: {m.reason}\n      - {m.original}\n      + {m.mutated}")
    if args.markdown:
        print()
        print(_markdown(mutants))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "killed": total["killed"],
                    "survived": total["survived"],
                    "equivalent": total["equivalent"],
                    "out_of_scope": total["out of scope"],
                    "score": score,
                    "by_module": by_module,
                    "mutants": [asdict(m) for m in mutants],
                },
                indent=1,
            )
        )
    return 0


def _display_name(function: str) -> str:
    """``cublas_grouped.gemm.plan.xǁGemmPlanǁdims`` -> ``gemm.plan.GemmPlan.dims``."""
    module, _, local = function.rpartition(".")
    local = local[2:].replace("ǁ", ".") if local.startswith(("x_", "xǁ")) else local
    return f"{module.split('.', 1)[1]}.{local}"


def _cell(text: str) -> str:
    text = re.sub(r"def x[_ǁ](?:\w+ǁ)?(\w+?)__mutmut_\(", r"def \1(", text)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else ""


def _markdown(mutants: list[Mutant]) -> str:
    """Survivors and equivalent mutants as Markdown tables (for docs/testing.md)."""
    lines = ["| function | line | mutated to | why equivalent (or SURVIVED) |", "|---|---|---|---|"]
    seen: dict[tuple, list[str]] = {}
    for m in mutants:
        if m.verdict in ("survived", "equivalent"):
            key = (_display_name(m.function), m.original, m.verdict, m.reason)
            seen.setdefault(key, []).append(m.mutated)
    for (function, original, verdict, reason), mutated in seen.items():
        why = "SURVIVED" if verdict == "survived" else reason
        targets = "<br>".join(_cell(x) for x in mutated)
        lines.append(f"| {function} | {_cell(original)} | {targets} | {why} |")
    return "\n".join(lines)


def run(args) -> int:
    env = dict(os.environ, CUBLAS_GROUPED_CACHE_DIR="off")
    command = ["mutmut", "run", "--max-children", str(args.max_children), *SCOPE]
    print(" ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, env=env, check=False)
    return done.returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run mutmut on the scoped modules (minutes)")
    p_run.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    p_report = sub.add_parser("report", help="score and survivors of the last run")
    p_report.add_argument("--json", help="also write the result here")
    p_report.add_argument("--all", action="store_true", help="also list the equivalent mutants")
    p_report.add_argument(
        "--markdown", action="store_true", help="also print survivors and equivalents as Markdown"
    )
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
