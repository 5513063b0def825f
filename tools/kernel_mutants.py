"""Kernel mutants: realistic one-line bugs in kernels/*.cu, each run against the
GPU suite's fast subset, to see which ones the tests catch.

Each mutant is an exact (file, original line, replacement): the original line
(compared without its indentation) must occur in the file exactly ``count``
times, else the script stops and says so, because the source moved and the
mutant list needs updating. A mutant is applied alone, to a temporary copy of
the tree, and the copy's tests run with ``PYTHONPATH`` on the copy and the
kernel disk cache off, so no cubin compiled from the real sources is reused.

Usage::

    python tools/kernel_mutants.py --check              # CPU: every mutant applies and compiles (NVRTC)
    python tools/kernel_mutants.py --json OUT.json      # GPU: baseline, then every mutant
    python tools/kernel_mutants.py --only routing-ties --json OUT.json
    python tools/kernel_mutants.py --shard 1/3 --json OUT.json   # a third of the mutants
    python tools/kernel_mutants.py --list                  # the mutants, with the bug each stands for

On a machine that limits one command's time, run shards: each runs the
baseline first (the unmutated tree must pass the subset), then its mutants; a
killed mutant stops at its first failing test, a surviving one runs the whole
subset. ``--skip-baseline --timeout S`` saves the baseline on later shards.

Verdicts: ``killed`` (a test failed, or the process crashed), ``timeout``
(ran past the limit, by default 3x the baseline: counted as killed, a hang is
a detection), ``survived`` (the subset passed), ``not run`` (no GPU test ran,
e.g. no GPU: never counted as survived), ``no compile`` (NVRTC rejected the
mutant: the list needs fixing). Exit status 0 when every mutant ran and was
killed, 1 when one survived, 2 when one did not run or on a setup error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The GPU tests each mutant runs, in order (quick and sharp ones first; -x
#: stops at the first failure, so a killed mutant costs little).
DEFAULT_TESTS = (
    "tests/test_kernel_edges_gpu.py",
    "tests/test_gather_by_token_gpu.py",
    "tests/test_pointers_gpu.py",
    "tests/test_sm90_persistent_gpu.py",
    "tests/test_step_launches_gpu.py",
    "tests/test_place_one_block_gpu.py",
    "tests/test_sm90_gpu.py",
    "tests/test_sm90_nn_gpu.py",
    "tests/test_sm90_fold_gpu.py",
    "tests/test_masked_gpu.py",
    "tests/test_sm90_epilogue_gpu.py",
    "tests/test_fp8_sm90_gpu.py",
    "tests/test_fp8_fold_gpu.py",
    "tests/test_fp8_fused_quantize_gpu.py",
    "tests/test_moe_gpu.py",
    "tests/test_fixed_capacity_gpu.py::test_assign_rows_never_writes_past_its_row_capacity",
    "tests/test_fixed_capacity_gpu.py::test_out_of_range_ids_are_dropped_and_counted",
    "tests/test_fixed_capacity_gpu.py::test_repeated_ids_count_once_per_choice",
    "tests/test_fixed_capacity_sm90_gpu.py::test_gate_up_blocked_every_path",
)

_IGNORE = shutil.ignore_patterns(
    ".git",
    "mutants",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "build",
    "dist",
    "*.egg-info",
    "out",
    ".whl",
)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under kernels/
    original: str  # the line, without indentation
    replacement: str  # without indentation (the original's is kept)
    why: str  # the bug it stands for
    count: int = 1  # occurrences of `original` in the file
    occurrence: int = 1  # which one is mutated (1-based)


MUTANTS: tuple[Mutant, ...] = (
    # routing.cu
    Mutant(
        "routing-max-reduction",
        "routing.cu",
        "for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));",
        "for (int o = 8; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));",
        "warp max reduction one step short: the two half-warps shift their exponents by different maxima",
    ),
    Mutant(
        "routing-normalize-bound",
        "routing.cu",
        "for (int e = lane; e < E; e += 32) scores[e] *= inv;",
        "for (int e = lane; e < E - 1; e += 32) scores[e] *= inv;",
        "off-by-one bound: the last expert's softmax score is never divided by the sum",
    ),
    Mutant(
        "routing-ties",
        "routing.cu",
        "return ka > kb || (ka == kb && ia < ib);",
        "return ka > kb || (ka == kb && ia > ib);",
        "ties go to the higher expert index (documented: the lower one)",
    ),
    Mutant(
        "routing-sigmoid-sign",
        "routing.cu",
        "scores[e] = 1.0f / (1.0f + expf(-v));",
        "scores[e] = 1.0f / (1.0f + expf(v));",
        "sigmoid of -v: the ranking is reversed",
    ),
    # activation.cu
    Mutant(
        "activation-up-offset-vec",
        "activation.cu",
        "if (gated) u = load_vec16(hr + hi + up_offset(I, gate_up_block));",
        "if (gated) u = load_vec16(hr + hi);",
        "16-byte path reads the gate half as the up projection (missing up offset)",
    ),
    Mutant(
        "activation-up-offset-scalar",
        "activation.cu",
        "float zu = load_as_float(hr + hi + up_offset(I, gate_up_block));",
        "float zu = load_as_float(hr + hi);",
        "scalar path (inter * itemsize not a multiple of 16) reads the gate half as the up projection",
        count=2,  # the second: expert_activation_fp8's scalar path
    ),
    Mutant(
        "activation-fp8-up-offset-scalar",
        "activation.cu",
        "float zu = load_as_float(hr + hi + up_offset(I, gate_up_block));",
        "float zu = load_as_float(hr + hi);",
        "the FP8 activation's scalar path (inter % 8 != 0) reads the gate half as the up projection",
        count=2,
        occurrence=2,
    ),
    Mutant(
        "activation-fp8-not-rounded",
        "activation.cu",
        "return to_float(from_float<T>(y));",
        "return y;",
        "the FP8 activation quantizes the fp32 value, not the 16-bit one expert_activation stores",
    ),
    Mutant(
        "activation-blocked-gate-col",
        "activation.cu",
        "return block > 0 ? (i / block) * 2 * block + i % block : i;",
        "return block > 0 ? (i / block) * block + i % block : i;",
        "w1_layout='gate_up_blocked': gate columns read as if the blocks were not interleaved",
    ),
    # common.cuh
    Mutant(
        "common-bf16-round-half-up",
        "common.cuh",
        "u += 0x7fffu + ((u >> 16) & 1u);",
        "u += 0x8000u;",
        "float -> bf16 rounds ties up instead of to even",
    ),
    Mutant(
        "common-warp-scan-lane",
        "common.cuh",
        "if (lane >= o) v += n;",
        "if (lane > o) v += n;",
        "warp inclusive scan: lane o skips the value o lanes below (scan offset)",
    ),
    # dispatch.cu: gather_rows and the row assignment
    Mutant(
        "gather-token-index",
        "dispatch.cu",
        "const T* src = p >= 0 ? x + static_cast<long long>(p / top_k) * hidden : nullptr;",
        "const T* src = p >= 0 ? x + static_cast<long long>(p % top_k) * hidden : nullptr;",
        "gather reads token p % k instead of p / k (wrong index)",
        count=2,  # the second: gather_rows_fp8's
    ),
    Mutant(
        "gather-fp8-token-index",
        "dispatch.cu",
        "const T* src = p >= 0 ? x + static_cast<long long>(p / top_k) * hidden : nullptr;",
        "const T* src = p >= 0 ? x + static_cast<long long>(p % top_k) * hidden : nullptr;",
        "the FP8 gather (gather_rows_fp8) quantizes token p % k's row instead of p / k's",
        count=2,
        occurrence=2,
    ),
    Mutant(
        "gather-fp8-scale-row",
        "dispatch.cu",
        "fp8_gathered_row(src, hidden, vec8, rows_s + r * scales_per_row, rows_q + static_cast<long long>(r) * hidden);",
        "fp8_gathered_row(src, hidden, vec8, rows_s + r, rows_q + static_cast<long long>(r) * hidden);",
        "the FP8 gather writes each row's scales one float past the last row's first, not a row of scales past",
        count=2,  # the first: gather_rows_fp8's (the second: place_one_block_fp8's)
    ),
    Mutant(
        "gather-grid-stride",
        "dispatch.cu",
        "for (int r = blockIdx.x; r < num_rows; r += gridDim.x) {",
        "for (int r = blockIdx.x; r < num_rows; r += 2 * gridDim.x) {",
        "grid-stride loop step doubled: rows past the grid are skipped every other sweep (T*k > 65535)",
        count=4,  # the first: gather_rows' (the second and fourth: the by-token kernels' zeroing passes)
    ),
    Mutant(
        "gather-by-token-token",
        "dispatch.cu",
        "const long long t = w / slices;",
        "const long long t = w % slices;",
        "the by-token gather takes the work item's slice for its token (wrong token, wrong rows)",
    ),
    Mutant(
        "gather-by-token-slices",
        "dispatch.cu",
        "const long long slices = (row_units + per_slice - 1) / per_slice;",
        "const long long slices = row_units / per_slice;",
        "the by-token gather rounds a row's slices down: a partial last slice (or a short row) is never copied",
    ),
    Mutant(
        "gather-by-token-last-unit",
        "dispatch.cu",
        "if (i < row_units) dst[i] = v[u];",
        "if (i + 1 < row_units) dst[i] = v[u];",
        "the by-token gather's stores stop one 16-byte chunk (or element) short of the row's end",
    ),
    Mutant(
        "gather-by-token-no-zeros",
        "dispatch.cu",
        "if (row_to_pair[r] < 0) copy_row(out + static_cast<long long>(r) * hidden, static_cast<const T*>(nullptr), hidden, vec);",
        "if (row_to_pair[r] < -1) copy_row(out + static_cast<long long>(r) * hidden, static_cast<const T*>(nullptr), hidden, vec);",
        "the by-token gather leaves padding rows (row_to_pair -1) unwritten instead of zeroed",
    ),
    Mutant(
        "gather-fp8-by-token-scale",
        "dispatch.cu",
        "if (tile < tcols && lane == 0) rows_s[static_cast<long long>(r) * tcols + tile] = scale;",
        "if (tile < tcols && lane == 0) rows_s[static_cast<long long>(r) * tcols] = scale;",
        "the FP8 by-token gather stores every 128-column block's scale in the row's first scale",
    ),
    Mutant(
        "gather-fp8-grid-stride",
        "dispatch.cu",
        "for (int r = blockIdx.x; r < num_rows; r += gridDim.x) {",
        "for (int r = blockIdx.x; r < num_rows; r += 2 * gridDim.x) {",
        "the FP8 gather's grid-stride step doubled: rows past the grid are never quantized (T*k > 65535)",
        count=4,
        occurrence=3,  # gather_rows_fp8's (the second and fourth: the by-token kernels' zeroing passes)
    ),
    Mutant(
        "dispatch-warp-prefix",
        "dispatch.cu",
        "for (int w = 0; w < warp; ++w) row += warp_counts[w * E + e];",
        "for (int w = 0; w <= warp; ++w) row += warp_counts[w * E + e];",
        "rank within the block counts its own warp too: rows shifted, gaps and collisions",
    ),
    Mutant(
        "dispatch-capacity-bound",
        "dispatch.cu",
        "if (row < num_rows) {",
        "if (row <= num_rows) {",
        "capacity check off by one: one write past row_to_pair when the rows do not fit",
    ),
    Mutant(
        "dispatch-repeat-scan",
        "dispatch.cu",
        "for (int i = 0; i < j; ++i) {",
        "for (int i = 0; i + 1 < j; ++i) {",
        "repeat detection misses the choice just before: a repeated expert takes a second row",
    ),
    Mutant(
        "dispatch-drop-count",
        "dispatch.cu",
        "bool drop = real && e < 0 && repeat_of < 0;  // an id outside [0, E)",
        "bool drop = e < 0 && repeat_of < 0;  // an id outside [0, E)",
        "the dropped-pair count includes the padding lanes past the last pair",
    ),
    Mutant(
        "combine-repeat-alias",
        "combine.cu",
        "return first < j ? pair_to_row[pair0 + first] : -1;",
        "return -1;",
        "a repeated choice adds nothing instead of its first choice's row",
    ),
    # grouped_gemm_sm90.cu: the Hopper kernel's schedule, masks and descriptors
    Mutant(
        "sm90-group-search",
        "sm90.cuh",
        "if (tile_offsets[mid] <= tile_row) {",
        "if (tile_offsets[mid] < tile_row) {",
        "a tile at its group's first tile is given to the group before",
    ),
    Mutant(
        "sm90-row-mask",
        "grouped_gemm_sm90.cu",
        "t.row_end = min(row_ends[g], M);",
        "t.row_end = min(row_ends[g] + 1, M);",
        "a tile writes the next group's first row with this group's weights",
    ),
    Mutant(
        "sm90-k-step",
        "grouped_gemm_sm90.cu",
        "wgmma_tile<0>(T{}, acc, da + 2 * kk, db + 2 * kk);",
        "wgmma_tile<0>(T{}, acc, da + 2 * kk, db);",
        "every 16-wide K step multiplies by the first K step of B ([E, N, K] weights)",
    ),
    Mutant(
        "sm90-nn-k-step",
        "grouped_gemm_sm90.cu",
        "wgmma_tile<1>(T{}, acc, da + 2 * kk, db + 128 * kk);",
        "wgmma_tile<1>(T{}, acc, da + 2 * kk, db + 2 * kk);",
        "[E, K, N] weights: the K step advances along a row (K-major) instead of 16 rows down",
    ),
    Mutant(
        "sm90-nn-not-transposed",
        "grouped_gemm_sm90.cu",
        "wgmma_tile<1>(T{}, acc, da + 2 * kk, db + 128 * kk);",
        "wgmma_tile<0>(T{}, acc, da + 2 * kk, db + 128 * kk);",
        "[E, K, N] weights read as K-major (imm-trans-b 0): B transposed within each 64 x 64 box",
    ),
    Mutant(
        "sm90-nn-span-offset",
        "grouped_gemm_sm90.cu",
        "return ((address & 0x3FFFF) >> 4) | (static_cast<unsigned long long>(SM90_B_BOX_ELEMS * 2 / 16) << 16) |",
        "return ((address & 0x3FFFF) >> 4) | (1ull << 16) |",
        "N-major descriptor without the 8 KiB leading byte offset: the 64-column spans past the first are misread",
    ),
    Mutant(
        "sm90-nn-box-column",
        "grouped_gemm_sm90.cu",
        "n0 + jb * SM90_B_SPAN, k0, g);",
        "n0, k0, g);",
        "every 64-column box of an [E, K, N] tile loads the tile's first 64 columns",
    ),
    Mutant(
        "sm90-nn-box-count",
        "grouped_gemm_sm90.cu",
        "const int b_boxes = min(SM90_BLOCK_N / SM90_B_SPAN, (N - n0 + SM90_B_SPAN - 1) / SM90_B_SPAN);",
        "const int b_boxes = min(SM90_BLOCK_N / SM90_B_SPAN, (N - n0) / SM90_B_SPAN);",
        "[E, K, N] weights: a last box partly inside N is not loaded (its columns read stale shared memory)",
    ),
    Mutant(
        "sm90-nn-group",
        "grouped_gemm_sm90.cu",
        "n0 + jb * SM90_B_SPAN, k0, g);",
        "n0 + jb * SM90_B_SPAN, k0, 0);",
        "every group multiplies by group 0's [E, K, N] weights",
    ),
    Mutant(
        "sm90-pack-order",
        "sm90.cuh",
        'asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));',
        'asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(lo), "f"(hi));',
        "bf16 output pairs stored swapped: column c gets c + 1's value and back",
    ),
    # grouped_gemm_sm90.cu, persistent CTAs (v6): the tile loop and the ring across tiles
    Mutant(
        "sm90-counter-not-zeroed",
        "grouped_gemm_sm90.cu",
        "tile_counters[0] = 0;",
        "(void)tile_counters;",
        "the tile counter keeps the last launch's count: later launches skip their tiles",
    ),
    Mutant(
        "dispatch-reset-rows",
        "dispatch.cu",
        "reset_rows[r] = -1;",
        "reset_rows[r] = 0;",
        "rows no pair takes read as pair 0 instead of padding (the memset the histogram replaced)",
    ),
    Mutant(
        "dispatch-hist-one-block-base",
        "dispatch.cu",
        "out[base + e] = 0;  // the one block's base: what expert_column_scan would write",
        "out[base + e] = hist[e];",
        "one block of pairs: the block base is its count, not 0 (the column scan's result): rows shift",
    ),
    # dispatch.cu: place_one_block (the decode placement in one launch)
    Mutant(
        "place-rank-ignores-rounds",
        "dispatch.cu",
        "before = taken[e] + r;",
        "before = r;",
        "a pair's rank ignores its expert's pairs from earlier rounds: rows collide past 256 pairs",
    ),
    Mutant(
        "place-tiles-round-down",
        "dispatch.cu",
        "const int tile_ex = block_exclusive_scan((m + tile_rows - 1) / tile_rows, &tiles_total, scratch);",
        "const int tile_ex = block_exclusive_scan(m / tile_rows, &tiles_total, scratch);",
        "each expert's partial last tile missing from the schedule: its last rows are never computed",
    ),
    Mutant(
        "place-reset-taken-rows",
        "dispatch.cu",
        "for (int r = row_carry + threadIdx.x; r < num_pairs; r += DISPATCH_THREADS) row_to_pair[r] = -1;",
        "for (int r = threadIdx.x; r < num_pairs; r += DISPATCH_THREADS) row_to_pair[r] = -1;",
        "the reset of rows no pair takes covers the taken rows too, racing their writes",
    ),
    Mutant(
        "place-gather-padding-row",
        "dispatch.cu",
        "const T* src = r < row_carry ? x + static_cast<long long>(pair_of_row[r] / top_k) * hidden : nullptr;",
        "const T* src = r <= row_carry && r < num_pairs ? x + static_cast<long long>(pair_of_row[r] / top_k) * hidden : nullptr;",
        "the first row past the taken ones is gathered from a stale shared entry instead of zeroed",
        count=2,  # the first: place_one_block_fp8's gather
        occurrence=2,
    ),
    Mutant(
        "place-fp8-gather-padding-row",
        "dispatch.cu",
        "const T* src = r < row_carry ? x + static_cast<long long>(pair_of_row[r] / top_k) * hidden : nullptr;",
        "const T* src = r <= row_carry && r < num_pairs ? x + static_cast<long long>(pair_of_row[r] / top_k) * hidden : nullptr;",
        "the FP8 gather quantizes the first row past the taken ones from a stale shared entry instead of zeros",
        count=2,
    ),
    Mutant(
        "place-dropped-every-block",
        "dispatch.cu",
        "if (writer && dropped != nullptr && lane == 0 && drops != 0u) {",
        "if (dropped != nullptr && lane == 0 && drops != 0u) {",
        "every block adds the dropped pairs: the count is multiplied by the grid",
    ),
    # grouped_gemm_sm90.cu: the schedule in shared memory, the next tile taken early (v14)
    Mutant(
        "sm90-table-row-ends-shifted",
        "grouped_gemm_sm90.cu",
        "table[2 * num_groups + 1 + i] = row_ends[i];",
        "table[2 * num_groups + i] = row_ends[i];",
        "the shared copy of row_ends one entry early: each group ends where the previous one did",
    ),
    Mutant(
        "sm90-table-last-tile-offset",
        "grouped_gemm_sm90.cu",
        "for (int i = threadIdx.x; i <= num_groups; i += SM90_THREADS) table[i] = tile_offsets[i];",
        "for (int i = threadIdx.x; i < num_groups; i += SM90_THREADS) table[i] = tile_offsets[i];",
        "tile_offsets[E] not copied: the last group's tile count is read from uninitialized shared memory",
    ),
    Mutant(
        "sm90-next-tile-taken-twice",
        "grouped_gemm_sm90.cu",
        "if (kt == take_at) next = static_cast<long long>(gridDim.x) + atomicAdd(tile_counter, 1);",
        "if (kt <= take_at) next = static_cast<long long>(gridDim.x) + atomicAdd(tile_counter, 1);",
        "the counter advanced at every stage up to the take: tiles skipped, never computed",
    ),
    Mutant(
        "fp8-table-row-ends-shifted",
        "grouped_gemm_fp8_sm90.cu",
        "table[2 * num_groups + 1 + i] = row_ends[i];",
        "table[2 * num_groups + i] = row_ends[i];",
        "the FP8 kernel's shared copy of row_ends one entry early: each group ends where the previous one did",
    ),
    Mutant(
        "fp8-a-small-box-row",
        "grouped_gemm_fp8_sm90.cu",
        "&full[s], kt * FP8_BLOCK_K, w.row0 + ra);",
        "&full[s], kt * FP8_BLOCK_K, w.row0);",
        "the FP8 kernel's small boxes of a all load the tile's first 16 rows: rows 17-64 of a thin tile read wrong rows",
        count=2,  # one CTA per tile, and CTA pairs (FP8_CLUSTER 2)
    ),
    Mutant(
        "fp8-thin-second-pass-rows",
        "grouped_gemm_fp8_sm90.cu",
        "w.row0 += FP8_TILE_M;",
        "w.row0 += 0;",
        "a thin tile's second pass multiplies the first 64 rows again: rows 65-128 of a group's tile never stored",
    ),
    Mutant(
        "fp8-thin-b-half",
        "grouped_gemm_fp8_sm90.cu",
        "const unsigned long long db = smem_descriptor(ring_b + s * FP8_B_STAGE_BYTES + half * FP8_B_BOX_BYTES);",
        "const unsigned long long db = smem_descriptor(ring_b + s * FP8_B_STAGE_BYTES);",
        "both math warpgroups of a thin tile read the first 128 columns' weights",
    ),
    Mutant(
        "fp8-thin-scale-half",
        "grouped_gemm_fp8_sm90.cu",
        "const int nb_row = min((t.n0 + col_in) / FP8_SCALE_BLOCK, n_blocks - 1);",
        "const int nb_row = min(t.n0 / FP8_SCALE_BLOCK, n_blocks - 1);",
        "a thin tile's second 128 columns use the first block's weight scales",
    ),
    Mutant(
        "sm90-second-counter-not-zeroed",
        "grouped_gemm_sm90.cu",
        "tile_counters[1] = 0;",
        "(void)tile_counters;",
        "a layer step's GEMM 2 starts from the last step's count on counter 1: it skips its tiles",
    ),
    Mutant(
        "sm90-offsets-no-cut-at-m",
        "grouped_gemm_sm90.cu",
        "const long long lo = min(before, rows_cap), hi = min(before + m, rows_cap);",
        "const long long lo = before, hi = before + m;",
        "device sizes summing past M are not cut: the GEMM reads and writes rows past M",
    ),
    Mutant(
        "sm90-counter-no-grid-offset",
        "grouped_gemm_sm90.cu",
        "if (kt == take_at) next = static_cast<long long>(gridDim.x) + atomicAdd(tile_counter, 1);",
        "if (kt == take_at) next = atomicAdd(tile_counter, 1);",
        "tiles from the counter start at 0, not past the first tiles: those run twice, the last never",
    ),
    Mutant(
        "sm90-mailbox-one-slot",
        "sm90.cuh",
        "mbarrier_wait(&m->full[slot], (j / SM90_SCHED_SLOTS) & 1);  // acquire: tile[slot] is written",
        "mbarrier_wait(&m->full[0], (j / SM90_SCHED_SLOTS) & 1);",
        "the math warpgroups wait on mailbox 0 for every tile: they read tiles before they are posted",
        count=2,
        occurrence=2,  # sm90_mailbox_take (the bf16 kernels'); the first is sm90_mailbox_read (the FP8 kernel's)
    ),
    Mutant(
        "fp8-mailbox-one-slot",
        "sm90.cuh",
        "mbarrier_wait(&m->full[slot], (j / SM90_SCHED_SLOTS) & 1);  // acquire: tile[slot] is written",
        "mbarrier_wait(&m->full[0], (j / SM90_SCHED_SLOTS) & 1);",
        "FP8 kernel: the math warpgroups wait on mailbox 0 for every tile",
        count=2,
        occurrence=1,
    ),
    Mutant(
        "sm90-acc-once-per-cta",
        "grouped_gemm_sm90.cu",
        "for (int i = 0; i < SM90_WG_N / 2; ++i) acc[i] = 0.0f;",
        "for (int i = 0; i < SM90_WG_N / 2; ++i) acc[i] = j == 0 ? 0.0f : acc[i];",
        "accumulators zeroed for a CTA's first tile only: later tiles add the tile before",
    ),
    Mutant(
        "sm90-last-stage-kept",
        "grouped_gemm_sm90.cu",
        "if ((threadIdx.x & 127) == 0) mbarrier_arrive(&empty[(fills + num_k - 1) % SM90_STAGES]);",
        "(void)0;",
        "a tile's last stage never freed (as in v5, harmless there): the load thread waits forever (a hang)",
    ),
    Mutant(
        "sm90-load-ring-restarts",
        "grouped_gemm_sm90.cu",
        "fills += num_k;",
        "fills = 0;",
        "the load thread restarts the ring at stage 0, phase 0 on each tile (stages and phases out of step)",
        count=4,  # the gathering loads (1), the TMA load thread (2), v12's idle warpgroup (3), the MMAs (4)
        occurrence=2,
    ),
    Mutant(
        "sm90-math-ring-restarts",
        "grouped_gemm_sm90.cu",
        "fills += num_k;",
        "fills = 0;",
        "the math warpgroups restart the ring at stage 0, phase 0 on each tile",
        count=4,
        occurrence=4,
    ),
    Mutant(
        "sm90-idle-ring-restarts",
        "grouped_gemm_sm90.cu",
        "fills += num_k;",
        "fills = 0;",
        "a thin tile's idle warpgroup restarts the ring at stage 0, phase 0 (v12)",
        count=4,
        occurrence=3,
    ),
    Mutant(
        "sm90-thin-mark-all",
        "grouped_gemm_sm90.cu",
        "(t.a_rows > SM90_BLOCK_M / 2 ? tile : tile | SM90_THIN_TILE) |",
        "(t.a_rows > SM90_BLOCK_M ? tile : tile | SM90_THIN_TILE) |",
        "every tile is marked thin: the second warpgroup's rows of full tiles are never computed (v12)",
    ),
    Mutant(
        "sm90-skip-ignores-mark",
        "grouped_gemm_sm90.cu",
        "if (half == 1 && (word & SM90_THIN_TILE) != 0) {",
        "if (half == 1 && (word & SM90_THIN_TILE) == 0) {",
        "the second warpgroup skips the full tiles and multiplies the thin ones (v12)",
    ),
    # v15's fold: a group's last 1 .. 16 rows computed by the tile before them.
    Mutant(
        "sm90-fold-skips-a-first-tile",
        "grouped_gemm_sm90.cu",
        "t.skip = m_tile > 0 && rows_left > 0 && rows_left <= SM90_FOLD_ROWS;",
        "t.skip = rows_left > 0 && rows_left <= SM90_FOLD_ROWS;",
        "a group of at most 16 rows (its first and only tile) is skipped as if another tile folded it",
    ),
    Mutant(
        "sm90-fold-one-row-short",
        "grouped_gemm_sm90.cu",
        "if (rows_left > SM90_BLOCK_M && rows_left <= SM90_BLOCK_M + SM90_FOLD_ROWS) {",
        "if (rows_left > SM90_BLOCK_M && rows_left <= SM90_BLOCK_M + SM90_FOLD_ROWS - 1) {",
        "a 16-row fold is not computed, while its tail tile is still skipped",
    ),
    Mutant(
        "sm90-fold-box-row",
        "grouped_gemm_sm90.cu",
        "tma_load_2d(sf + s * SM90_FOLD_STAGE_ELEMS, tmap_a_rows, &full[s], k0, row0 + SM90_BLOCK_M);",
        "tma_load_2d(sf + s * SM90_FOLD_STAGE_ELEMS, tmap_a_rows, &full[s], k0, row0 + SM90_BLOCK_M - 16);",
        "the fold's box loads the tile's last 16 rows instead of the 16 after them",
    ),
    Mutant(
        "sm90-fold-odd-lane-row",
        "grouped_gemm_sm90.cu",
        "const int row = even ? ra : ra + 1, c = even ? col : col - 1;",
        "const int row = ra, c = even ? col : col - 1;",
        "the odd-column threads store their pair into the even threads' row",
    ),
    Mutant(
        "sm90-fold-column-block",
        "grouped_gemm_sm90.cu",
        "const int jb = half + 2 * q;",
        "const int jb = half + q;",
        "the fold's second block multiplies the neighbouring 64 columns of b, not its own",
    ),
    # The fold in the FP8 kernel (FP8_FOLD_ROWS).
    Mutant(
        "fp8-fold-skips-a-first-tile",
        "grouped_gemm_fp8_sm90.cu",
        "t.skip = t.row0 > row_offsets[t.g] && rows_left > 0 && rows_left <= FP8_FOLD_ROWS;",
        "t.skip = rows_left > 0 && rows_left <= FP8_FOLD_ROWS;",
        "a group of at most 16 rows (its first and only tile) is skipped as if another tile folded it",
    ),
    Mutant(
        "fp8-fold-box-row",
        "grouped_gemm_fp8_sm90.cu",
        "w.row0 + FP8_BLOCK_M);",
        "w.row0 + FP8_BLOCK_M - 16);",
        "the fold's box loads the tile's last 16 rows instead of the 16 after them",
    ),
    Mutant(
        "fp8-fold-row-scale",
        "grouped_gemm_fp8_sm90.cu",
        "r.s1 = left > 1 ? load_scale(sf + num_k + kt) : 0.0f;",
        "r.s1 = left > 1 ? load_scale(sf + kt) : 0.0f;",
        "the fold's odd rows are promoted with the even rows' scales",
    ),
    Mutant(
        "fp8-fold-stage-scale",
        "grouped_gemm_fp8_sm90.cu",
        "fp8_promote_fold(facc, ftmp, fs.s0 * b, fs.s1 * b, fs.s8 * b, fs.s9 * b);",
        "fp8_promote_fold(facc, ftmp, fs.s0 * nb, fs.s1 * nb, fs.s8 * nb, fs.s9 * nb);",
        "the fold's partial sums take the next stage's weight scale",
    ),
    Mutant(
        "fp8-fold-columns",
        "grouped_gemm_fp8_sm90.cu",
        "const int i = 4 * jn + 2 * h, col = t.n0 + 64 * half + frag_row + 8 * h;",
        "const int i = 4 * jn + 2 * h, col = t.n0 + 64 * half + frag_row + 8 * jn;",
        "the fold's second eight columns of each thread are stored over its first",
    ),
    # The routing weight in GEMM 2's epilogue (the kernel step): the placement's
    # row weights, the epilogue's product, the plain-sum combine.
    Mutant(
        "dispatch-row-weight-repeats",
        "dispatch.cu",
        "if (topk_ids[p - j + i] == e) w += topk_weights != nullptr ? topk_weights[p - j + i] : 1.0f;",
        "if (topk_ids[p - j + i] != e) w += topk_weights != nullptr ? topk_weights[p - j + i] : 1.0f;",
        "a row's weight adds the token's other experts' weights instead of its repeats'",
    ),
    Mutant(
        "sm90-row-scale-dropped",
        "grouped_gemm_sm90.cu",
        "v1 = (v1 + bias1) * row_w[h];",
        "v1 = (v1 + bias1) * row_w[0];",
        "the odd columns of a thread's second row take its first row's weight",
    ),
    Mutant(
        "combine-sum-follows-repeats",
        "combine.cu",
        "const int row = WEIGHTED ? choice_row(pair_to_row, pair0, j) : pair_to_row[pair0 + j];",
        "const int row = choice_row(pair_to_row, pair0, j);",
        "the plain sum adds a repeat's aliased row again (its weight is already in the row)",
        count=2,
    ),
    # grouped_gemm_sm90.cu, the store through the staging area (v8, v9)
    Mutant(
        "sm90-store-row-mask",
        "grouped_gemm_sm90.cu",
        "if (r_first + r < row_end && col < out_n) {  // out_n % 8 == 0: a chunk is all in or all out",
        "if (col < N) {",
        "a partial tile's rows past its group's end are stored: the next group's rows, or past M",
    ),
    Mutant(
        "sm90-store-chunk-row",
        "grouped_gemm_sm90.cu",
        "const int r = chunk >> 3, col = c0 + 8 * (chunk & 7);",
        "const int r = chunk & 63, col = c0 + 8 * (chunk >> 6);",
        "chunks copied out row-major from a column-major count: rows and column chunks swapped",
    ),
    Mutant(
        "sm90-stage-reused-early",
        "grouped_gemm_sm90.cu",
        "named_barrier_sync(1 + half);  // the stage is read before the next pass writes it",
        "(void)0;",
        "no barrier between copying a pass out and writing the next one in: a race on the stage",
    ),
    # grouped_gemm_sm90.cu: a's loads of thin tiles (v10)
    Mutant(
        "sm90-a-box-row",
        "grouped_gemm_sm90.cu",
        "k0, row0 + ra);",
        "k0, row0);",
        "every 16-row box of a thin tile loads the tile's first 16 rows",
    ),
    Mutant(
        "sm90-a-box-place",
        "grouped_gemm_sm90.cu",
        "tma_load_2d(sa + s * SM90_A_STAGE_ELEMS + ra * SM90_BLOCK_K, tmap_a_rows, &full[s],",
        "tma_load_2d(sa + s * SM90_A_STAGE_ELEMS + ra * SM90_A_BOX_ROWS, tmap_a_rows, &full[s],",
        "the boxes land at an offset in the wrong unit (rows, not elements): rows 16 on are misplaced",
    ),
    # grouped_gemm_sm90.cu: the masked fixed-capacity layout and the gated epilogue (v9)
    Mutant(
        "sm90-masked-no-clamp",
        "grouped_gemm_sm90.cu",
        "if (masked) m = min(m, static_cast<long long>(capacity));",
        "if (masked) m = m;",
        "a count above the capacity is not cut: its tiles run into the next group's block",
    ),
    Mutant(
        "sm90-masked-contiguous-end",
        "grouped_gemm_sm90.cu",
        "t.row_end = min(row_ends[g], M);",
        "t.row_end = min(row_offsets[g + 1], M);",
        "the contiguous end rule under the masked layout: rows past a group's count are stored",
    ),
    Mutant(
        "sm90-epilogue-up-pair",
        "grouped_gemm_sm90.cu",
        "float u0 = acc[i + 64], u1 = acc[i + 65];",
        "float u0 = acc[i + 64], u1 = acc[i + 64];",
        "the gated epilogue multiplies both columns of a pair by the first one's up value",
    ),
    Mutant(
        "sm90-epilogue-up-bias",
        "grouped_gemm_sm90.cu",
        "u0 += to_float(bias_g[out_n + col]);",
        "u0 += to_float(bias_g[col]);",
        "the up projection gets the gate's bias",
    ),
    # grouped_gemm_sm90.cu: thin tiles (SM90_THIN), killed by test_sm90_thin_gpu.py
    Mutant(
        "sm90-thin-second-pass-rows",
        "grouped_gemm_sm90.cu",
        "t.row0 = row_offsets[g] + m_tile * SM90_BLOCK_M + (second ? SM90_TILE_M : 0);",
        "t.row0 = row_offsets[g] + m_tile * SM90_BLOCK_M + (second ? 0 : 0);",
        "a thin tile's second pass multiplies the first 64 rows again: rows 65-128 of a schedule tile never stored",
    ),
    Mutant(
        "sm90-thin-no-second-pass",
        "grouped_gemm_sm90.cu",
        "const bool more = !second && t.row_end - t.row0 > SM90_TILE_M;",
        "const bool more = !second && t.row_end - t.row0 > SM90_BLOCK_M;",
        "a schedule tile of 65-128 rows of its group runs one pass of 64: its other rows never computed",
    ),
    Mutant(
        "sm90-thin-b-half",
        "grouped_gemm_sm90.cu",
        "const T* b_stage = sb + s * SM90_B_STAGE_ELEMS + col_in * SM90_BLOCK_K;",
        "const T* b_stage = sb + s * SM90_B_STAGE_ELEMS;",
        "both math warpgroups of a thin tile read the first 128 columns' weights",
    ),
    Mutant(
        "sm90-thin-store-half",
        "grouped_gemm_sm90.cu",
        "const int c_tile = t.n0 + col_in;",
        "const int c_tile = t.n0;",
        "both math warpgroups of a thin tile store into the tile's first 128 columns",
    ),
    # grouped_gemm_fp8_sm90.cu: the FP8 kernel's descriptors, scales and masks
    Mutant(
        "fp8-k-step",
        "grouped_gemm_fp8_sm90.cu",
        "wgmma_m64n128k32_e4m3(d, da + 2 * kk, db + 2 * kk, kk > 0);",
        "wgmma_m64n128k32_e4m3(d, da + 2 * kk, db, kk > 0);",
        "every 32-deep K step multiplies by B's first K step",
    ),
    Mutant(
        "fp8-scale-d",
        "grouped_gemm_fp8_sm90.cu",
        "wgmma_m64n128k32_e4m3(d, da + 2 * kk, db + 2 * kk, kk > 0);",
        "wgmma_m64n128k32_e4m3(d, da + 2 * kk, db + 2 * kk, 1);",
        "a stage's first MMA adds to tmp instead of overwriting it: every stage re-adds the ones before",
    ),
    Mutant(
        "fp8-b-scale-block",
        "grouped_gemm_fp8_sm90.cu",
        "const float* sbt = sb + (static_cast<long long>(t.g) * n_blocks + nb_row) * num_k;",
        "const float* sbt = sb + static_cast<long long>(t.g) * n_blocks * num_k;",
        "every column tile uses the B scales of the group's first 128 columns",
    ),
    Mutant(
        "fp8-a-scale-row",
        "grouped_gemm_fp8_sm90.cu",
        "const float* sa1 = sa + static_cast<long long>(min(r0 + 8, M - 1)) * num_k;",
        "const float* sa1 = sa + static_cast<long long>(min(r0, M - 1)) * num_k;",
        "the fragment's second row (r + 8) is scaled with the first row's token scales",
    ),
    Mutant(
        "fp8-scale-prefetch",
        "grouped_gemm_fp8_sm90.cu",
        "na0 = load_scale(sa0 + kt + 2), na1 = load_scale(sa1 + kt + 2), nb = load_scale(sbt + kt + 2);",
        "na0 = load_scale(sa0 + kt + 1), na1 = load_scale(sa1 + kt + 1), nb = load_scale(sbt + kt + 1);",
        "overlapped promotion: each even stage after the first is promoted with its predecessor's scales",
    ),
    Mutant(
        "fp8-tail-scales",
        "grouped_gemm_fp8_sm90.cu",
        "fp8_promote(acc, tmp1, na0 * nb, na1 * nb);",
        "fp8_promote(acc, tmp1, a0 * b, a1 * b);",
        "overlapped promotion: a tile's last stage, of an even count, is promoted with its predecessor's scales",
    ),
    Mutant(
        "fp8-wide-split",
        "grouped_gemm_fp8_sm90.cu",
        "static constexpr int A = EVEN ? 12 : 8, B = EVEN ? 4 : 0;",
        "static constexpr int A = EVEN ? 12 : 8, B = EVEN ? 0 : 0;",
        "wide tiles: a tile on a scale block promotes its columns 96-127 with the next block's B scale",
    ),
    Mutant(
        "fp8-wide-hi-row",
        "grouped_gemm_fp8_sm90.cu",
        "const float* sb_hi = sb + (static_cast<long long>(t.g) * n_blocks + min(nb_lo + 1, n_blocks - 1)) * num_k;",
        "const float* sb_hi = sb_lo;",
        "wide tiles: the second B scale row is the first one again",
    ),
    Mutant(
        "fp8-promote-row",
        "grouped_gemm_fp8_sm90.cu",
        "acc[i + 2] = fmaf(d[i + 2], s1, acc[i + 2]);",
        "acc[i + 2] = fmaf(d[i + 2], s0, acc[i + 2]);",
        "one register of each row-(r + 8) pair promoted with row r's scale",
    ),
    Mutant(
        "fp8-row-mask",
        "grouped_gemm_fp8_sm90.cu",
        "t.row_end = min(row_ends[t.g], M);",
        "t.row_end = min(row_ends[t.g] + 1, M);",
        "a tile writes the next group's first row with this group's weights",
    ),
    Mutant(
        "quant-vec-half-reduce",
        "fp8.cuh",
        "for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));",
        "for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));",
        "vector quantizer: the amax is reduced over the whole warp, mixing its two tiles' scales",
    ),
    Mutant(
        "quant-vec-lane-cols",
        "fp8.cu",
        "const int c = (live[u] ? static_cast<int>(ct_step) * 128 : 0) + 8 * lane;",
        "const int c = (live[u] ? static_cast<int>(ct_step) * 128 : 0) + 4 * lane;",
        "vector quantizer: lanes step 4 columns while each converts 8: half of a tile is never written",
    ),
    Mutant(
        "quant-vec-step-row",
        "fp8.cu",
        "while (ct_step >= tcols) ct_step -= tcols, ++r_step;",
        "while (ct_step >= tcols) ct_step -= tcols;",
        "vector quantizer: a pass's later tiles past the end of a row are taken from the same row again",
    ),
    Mutant(
        "quant-hw-byte",
        "fp8.cuh",
        "return static_cast<unsigned char>(d & 0xFFu);  // b, the second operand, lands in the low byte",
        "return static_cast<unsigned char>(d >> 8);",
        "hardware e4m3 conversion: the code of the other operand (0.0) is returned",
    ),
    Mutant(
        "quant-pair-order",
        "fp8.cuh",
        'asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(b), "f"(a));',
        'asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(a), "f"(b));',
        "the paired conversion of the quantizer's quotients: each pair of neighbouring codes swapped",
    ),
    Mutant(
        "fp8-row-scale-past-row",
        "fp8.cuh",
        "if (t < tcols && lane == 0) s_row[t] = scale;",
        "if (lane == 0) s_row[t] = scale;",
        "a row quantized by a block (the FP8 gather and activation) with an odd number of 128-column "
        "blocks writes a scale past its end: the next row's first",
    ),
    Mutant(
        "fp8-store-row-mask",
        "sm90.cuh",
        "if (r_first + r < row_end && col < N) {",
        "if (col < N) {",
        "FP8 kernel (sm90_store_pass): a partial tile's rows past its group's end are stored",
    ),
    Mutant(
        "fp8-store-pair-order",
        "sm90.cuh",
        "pack_pair(T{}, acc[i], acc[i + 1]);",
        "pack_pair(T{}, acc[i + 1], acc[i]);",
        "FP8 kernel (sm90_store_pass): each bf16 output pair stored swapped",
    ),
    Mutant(
        "fp8-mailbox-tile",
        "grouped_gemm_fp8_sm90.cu",
        "if (tile >= 0) t = mail_tile[j % SM90_SCHED_SLOTS];  // the load thread's search",
        "if (tile >= 0) t = mail_tile[0];",
        "the math warpgroups read the tile description of mailbox slot 0 for every tile",
    ),
    # combine.cu: scatter_rows and combine_rows
    Mutant(
        "scatter-row-zero",
        "combine.cu",
        "const T* src = row >= 0 ? y + static_cast<long long>(row) * hidden : nullptr;",
        "const T* src = row > 0 ? y + static_cast<long long>(row) * hidden : nullptr;",
        "scatter treats row 0 as a dropped pair (< vs <=)",
    ),
    Mutant(
        "combine-weight-index",
        "combine.cu",
        "if (WEIGHTED && topk_weights != nullptr) ws[jj] = topk_weights[pair0 + j];",
        "if (WEIGHTED && topk_weights != nullptr) ws[jj] = topk_weights[pair0];",
        "combine (16-byte path) weighs every choice with the first choice's weight",
    ),
    # pointers.cu
    Mutant(
        "pointers-capacity-clamp",
        "pointers.cu",
        "const int q_end = min(prob_carry + prob_total, capacity);",
        "const int q_end = prob_carry + prob_total;",
        "pointer kernel ignores the arrays' capacity: writes past them when the counts need more problems",
    ),
)


class SetupError(Exception):
    pass


@dataclass
class Result:
    name: str
    file: str
    line: int
    original: str
    replacement: str
    why: str
    verdict: str
    seconds: float = 0.0
    detail: str = ""
    compiled: list = field(default_factory=list)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def apply(mutant: Mutant, root: Path) -> int:
    """Apply ``mutant`` to the tree at ``root``; returns the 1-based line number."""
    path = root / "kernels" / mutant.file
    lines = path.read_text().split("\n")
    hits = [i for i, line in enumerate(lines) if line.strip() == mutant.original]
    if len(hits) != mutant.count:
        raise SetupError(
            f"{mutant.name}: kernels/{mutant.file} has {len(hits)} lines equal to\n    {mutant.original}\n"
            f"(expected {mutant.count}): the source changed, update the mutant list in tools/kernel_mutants.py"
        )
    i = hits[mutant.occurrence - 1]
    lines[i] = _indent(lines[i]) + mutant.replacement
    path.write_text("\n".join(lines))
    return i + 1


def _all_programs(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "kernels").glob("*.cu"))


def _programs(mutant: Mutant, root: Path) -> list[str]:
    """The kernels/*.cu programs a change to ``mutant.file`` reaches (a header: all)."""
    return [mutant.file[: -len(".cu")]] if mutant.file.endswith(".cu") else _all_programs(root)


def _env(root: Path, cache: str = "off") -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["CUBLAS_GROUPED_CACHE_DIR"] = cache
    env.pop("PYTEST_ADDOPTS", None)
    return env


# Each program compiles with the defines its launcher passes.
_COMPILE = """
import sys
from pathlib import Path
import cublas_grouped
from cublas_grouped.gemm import fp8_kernels, pointers
from cublas_grouped.gemm.backends import hopper, hopper_fp8, hopper_variants
from cublas_grouped.moe import backward_kernels, kernels
from cublas_grouped.runtime import nvrtc as _kernels
root = Path(sys.argv[1]).resolve()
assert Path(cublas_grouped.__file__).resolve().is_relative_to(root), cublas_grouped.__file__
assert _kernels.kernel_dir().resolve() == root / "kernels", _kernels.kernel_dir()
defines = {
    **kernels.DEFINES,
    **backward_kernels.DEFINES,
    "pointers": pointers.DEFINES,
    "grouped_gemm_sm90": hopper.DEFINES,
    "grouped_gemm_fp8_sm90": hopper_fp8.DEFINES,
    "fp8": fp8_kernels.DEFINES,
}
# The Hopper kernels as launches with the fold compile them (their mutants too).
defines["grouped_gemm_sm90"] = hopper_variants.fold_defines(hopper.DEFINES, None, 256, 1)
defines["grouped_gemm_fp8_sm90"] = hopper_fp8.launch_defines(False, fold=True)
# wgmma and TMA build for sm_90a only
arches = {"grouped_gemm_sm90": hopper.ARCH, "grouped_gemm_fp8_sm90": hopper_fp8.ARCH}
for name in sys.argv[3:]:
    _kernels.compile_source(name, arches.get(name, sys.argv[2]), defines[name])
"""


def compile_check(root: Path, programs: list[str], arch: str) -> str | None:
    """None when every program compiles from the tree at ``root``, else NVRTC's message."""
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(root), arch, *programs],
        cwd=root,
        env=_env(root),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return (done.stderr or done.stdout).strip()[-3000:]
    return None


def _copy_tree(dest: Path) -> Path:
    tree = dest / "tree"
    shutil.copytree(ROOT, tree, ignore=_IGNORE, symlinks=True)
    return tree


def run_tests(root: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """(verdict for the tree at ``root``, seconds, last output lines)."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=root,
        env=_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills it all
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "timeout", time.monotonic() - start, out[-1500:]
    seconds = time.monotonic() - start
    tail = out[-1500:]
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if proc.returncode == 0:
        if not re.search(r"\b\d+ passed\b", summary):
            return "not run", seconds, tail  # everything skipped (no GPU) or deselected
        return "survived", seconds, tail
    if proc.returncode == 5:
        return "not run", seconds, tail  # no tests collected
    if proc.returncode in (2, 3, 4):
        return "error", seconds, tail  # interrupted, internal error or usage error: not a kill
    return "killed", seconds, tail


def _select(args) -> list[Mutant]:
    chosen = list(MUTANTS)
    if args.only:
        names = {m.name for m in MUTANTS}
        unknown = set(args.only) - names
        if unknown:
            raise SetupError(f"unknown mutants {sorted(unknown)}; known: {sorted(names)}")
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.shard:
        k, n = (int(v) for v in args.shard.split("/"))
        if not 1 <= k <= n:
            raise SetupError(f"--shard {args.shard}: expected K/N with 1 <= K <= N")
        chosen = chosen[k - 1 :: n]
    return chosen


def _table(results: list[Result]) -> str:
    rows = [("mutant", "where", "verdict", "s")]
    rows += [(r.name, f"{r.file}:{r.line}", r.verdict, f"{r.seconds:.0f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only apply and compile every mutant (no GPU)")
    parser.add_argument("--arch", default="sm_90", help="NVRTC architecture for --check (default sm_90)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--shard", help="K/N: every N-th mutant starting at the K-th")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS), help="GPU test files or node ids")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: 3x the baseline, >= 120)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="do not run the unmutated tree first (needs --timeout; only after a baseline passed on this machine)",
    )
    args = parser.parse_args(argv)

    if args.list:
        for m in MUTANTS:
            print(f"{m.name:28s} kernels/{m.file}\n    - {m.original}\n    + {m.replacement}\n      {m.why}")
        return 0
    try:
        mutants = _select(args)
        return _run(args, mutants)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args, mutants: list[Mutant]) -> int:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="kernel-mutants-") as tmp:
        pristine = _copy_tree(Path(tmp))
        arch = args.arch
        message = compile_check(pristine, _all_programs(pristine), arch)
        if message is not None:
            raise SetupError(f"the unmutated kernels do not compile:\n{message}")
        baseline = None
        if not args.check and args.skip_baseline:
            if not args.timeout:
                raise SetupError("--skip-baseline needs --timeout")
            timeout = args.timeout
            print("baseline: skipped (--skip-baseline)", flush=True)
        elif not args.check:
            # The unmutated tree must pass, else no verdict means anything.
            verdict, seconds, tail = run_tests(pristine, args.tests, args.timeout or 3600.0)
            print(f"baseline: {verdict} in {seconds:.0f} s", flush=True)
            if verdict != "survived":
                raise SetupError(f"the unmutated tree does not pass its GPU subset ({verdict}):\n{tail}")
            baseline = seconds
            timeout = args.timeout or max(120.0, 3.0 * seconds)
        for m in mutants:
            work = Path(tmp) / m.name
            shutil.copytree(pristine, work, symlinks=True)
            line = apply(m, work)
            result = Result(m.name, f"kernels/{m.file}", line, m.original, m.replacement, m.why, "")
            programs = _programs(m, work)
            message = compile_check(work, programs, arch)
            result.compiled = programs
            if message is not None:
                result.verdict, result.detail = "no compile", message
            elif args.check:
                result.verdict = "compiles"
            else:
                result.verdict, result.seconds, result.detail = run_tests(work, args.tests, timeout)
            shutil.rmtree(work)
            results.append(result)
            print(
                f"{m.name}: {result.verdict}" + (f" in {result.seconds:.0f} s" if result.seconds else ""),
                flush=True,
            )
            if result.verdict in ("no compile", "error", "not run"):
                print(result.detail, flush=True)
    print()
    print(_table(results))
    ran = [r for r in results if r.verdict in ("killed", "timeout", "survived")]
    killed = [r for r in ran if r.verdict != "survived"]
    if not args.check:
        print(f"\nkilled {len(killed)} of {len(ran)} mutants that ran ({len(results)} selected)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "mode": "check" if args.check else "gpu",
                    "arch": arch if args.check else None,
                    "tests": args.tests,
                    "baseline_seconds": None if args.check else baseline,
                    "killed": len(killed),
                    "ran": len(ran),
                    "results": [asdict(r) for r in results],
                },
                indent=1,
            )
        )
    if any(r.verdict in ("no compile", "not run", "error") for r in results):
        return 2
    return 1 if any(r.verdict == "survived" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
