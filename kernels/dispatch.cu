// dispatch.cu: stable counting sort of (token, choice) pairs by expert, and
// the gather of token rows into expert order.
//
// Pairs p = t * top_k + j (token-major). The sort runs in three launches over
// nb = ceil(num_pairs / PAIRS_PER_BLOCK) blocks of pairs, and is stable (pairs
// of one expert keep token order) and deterministic (no atomics whose order
// could change a result):
//   1. expert_block_histogram: count of each expert in each block of pairs.
//   2. expert_column_scan:     exclusive scan of those counts down the blocks,
//                              plus each expert's total (counts).
//   (the caller, e.g. build_pointers in pointers.cu, turns counts into
//    row_offsets[E + 1], possibly with padding between experts)
//   3. assign_rows:            each pair's row in the expert-ordered buffer.
//
// Constants shared with the launcher, which passes them as NVRTC defines
// (required, no defaults: the source stops with #error without them):
//   DISPATCH_THREADS   threads per block of all three sort kernels (a
//                      multiple of 32, at most 1024)
//   PAIRS_PER_BLOCK    pairs per block (kernels 1 and 3; a multiple of
//                      DISPATCH_THREADS)
//   SKIP_REPEATS       the bit of `flags` that turns repeat detection on
//   GATHER_UNITS       16-byte chunks (or elements) each thread of
//                      gather_rows_by_token carries: the launcher sizes the
//                      grid by it
//
// Which pairs take a row. A pair takes no row when its id is outside
// [0, E) (a "dropped" pair) or, with SKIP_REPEATS set in `flags`, when its
// token already chose the same expert at a lower j (a "repeat": it aliases
// the row of that first choice, so the expert computes the row once and the
// combine adds it once per choice; the result is the same as giving the
// repeat a row of its own). Kernels 1 and 3 must get the same top_k and
// flags, so that the counts and the rows agree. With SKIP_REPEATS no expert
// can get more than T rows, which the fixed-capacity step's bound relies on.
//
// Kernels:
//
//   expert_block_histogram(const int* topk_ids, int num_pairs, int top_k,
//                          int num_experts, int flags, int* block_counts,
//                          int* reset_rows, int num_reset, int* counts)
//     grid nb, block DISPATCH_THREADS, no dynamic shared memory.
//     block_counts [nb, E]: every entry written (zeros included):
//     block_counts[b, e] = #{p in block b taking a row : topk_ids[p] == e}.
//     counts non-null and nb == 1 (all pairs in one block: T*k at most
//     PAIRS_PER_BLOCK, decode): the column scan's results instead, written
//     here so that expert_column_scan is not launched: block_counts[0, e] =
//     0 (the one block's base) and counts[e] = that block's count, the values
//     expert_column_scan would write. Ignored (null or nb > 1) otherwise.
//     reset_rows[0 .. num_reset - 1] = -1 (grid-stride: any num_reset; none
//     when num_reset is 0): a row_to_pair that assign_rows fills next, reset
//     here rather than by a memset launch of its own (the same bytes, 0xFF).
//
//   expert_column_scan(int* block_counts, int num_blocks, int num_experts,
//                      int* counts)
//     grid E (one block per expert), block DISPATCH_THREADS, no dynamic
//     shared memory. In place: block_counts[b, e] becomes
//     sum_{b' < b} block_counts[b', e]; counts[e] = column total.
//
//   expert_histogram_schedule(const int* topk_ids, int num_pairs, int top_k,
//                             int num_experts, int flags, int* block_counts,
//                             int* reset_rows, int num_reset, int tile_rows,
//                             int* counts, int* row_offsets, int* row_ends,
//                             int* tile_offsets, int* tile_counters,
//                             unsigned* ticket)
//     grid nb, block DISPATCH_THREADS, no dynamic shared memory (40 KiB
//     static). What expert_block_histogram (without counts),
//     expert_column_scan and grouped_tile_offsets (grouped_gemm_sm90.cu,
//     contiguous, M = num_pairs, tiles of tile_rows rows) write, the same
//     values, in one launch: each block its histogram row, then the last
//     block to finish (a ticket taken after a __threadfence) scans every
//     column (block bases in place, counts) and writes the schedule
//     (row_offsets [E + 1], row_ends [E], tile_offsets [E + 1],
//     tile_counters[0..1] = 0). *ticket must be 0 at the launch; the last
//     block sets it to 0 again, so a graph replays it. Why: at prefill the
//     step's launches do not overlap (moe/kernel_step.py OVERLAP_MAX_PAIRS),
//     so each of the two launches this saves cost its start and drain.
//
//   assign_rows(const int* topk_ids, int num_pairs, int top_k, int num_experts,
//               int flags, const int* block_base, const int* row_offsets,
//               int num_rows, int* pair_to_row, int* row_to_pair,
//               unsigned long long* dropped, const float* topk_weights,
//               float* row_weights)
//     grid nb, block DISPATCH_THREADS.
//     Dynamic shared memory: (DISPATCH_THREADS / 32 + 1) * num_experts * 4
//     bytes (with 256 threads: 36 KiB for E = 1024; above 48 KiB the caller
//     must raise the kernel's shared memory limit).
//     block_base [nb, E] is the output of expert_column_scan; row_offsets
//     [E + 1] the first row of each expert; row_to_pair holds num_rows
//     entries. For pair p of expert e that takes a row:
//       row = row_offsets[e] + #{q < p taking a row : topk_ids[q] == e}
//       pair_to_row[p] = row, row_to_pair[row] = p.
//     Every pair_to_row entry is written:
//       a dropped pair:          -1;
//       a repeat of choice j':   -2 - j' (see combine.cu);
//       a row >= num_rows:       -1, and the pair counts as dropped (the
//                                caller's capacity was too small: no write
//                                ever lands past row_to_pair).
//     dropped (skipped when null): the number of dropped pairs is added to
//     *dropped (one atomic add per warp; the count is order-independent).
//     Rows never assigned keep what the caller put there (-1).
//     row_weights (skipped when null; then topk_weights is not read): the
//     routing weight each row carries, for an epilogue that applies it (GEMM
//     2 of the Hopper kernel step): row_weights[row] = the sum, in choice
//     order, of topk_weights[t, j'] (1 each when topk_weights is null) over
//     the pair's own choice j and, with SKIP_REPEATS, every later choice j'
//     of its token that names the same expert (the repeats aliasing this
//     row, which then add nothing of their own).
//
//   place_one_block_{f32,f16,bf16}(const int* topk_ids, int num_pairs, int top_k,
//                     int num_experts, int flags, const float* topk_weights,
//                     const X* x, int hidden, int tile_rows, int* counts,
//                     int* row_offsets, int* row_ends, int* tile_offsets,
//                     int* tile_counters, int* pair_to_row, int* row_to_pair,
//                     float* row_weights, unsigned long long* dropped, X* rows)
//     The decode step's whole placement in one launch, for num_pairs at most
//     PAIRS_PER_BLOCK: what expert_block_histogram (with counts),
//     grouped_tile_offsets (grouped_gemm_sm90.cu, contiguous, M = num_pairs,
//     tiles of tile_rows rows), assign_rows (num_rows = num_pairs) and
//     gather_rows write, the same values: counts [E], the Hopper kernel's
//     schedule (row_offsets [E + 1], row_ends [E], tile_offsets [E + 1],
//     tile_counters[0..1] = 0), pair_to_row [num_pairs], row_to_pair
//     [num_pairs] (-1 past the rows taken), row_weights (skipped when null),
//     *dropped (skipped when null), and rows [num_pairs, hidden] (skipped when
//     null: a GEMM that gathers itself).
//     Any grid of blocks of DISPATCH_THREADS: every block ranks all the pairs
//     (a few KiB of ids, read by each block: no grid-wide barrier), block 0
//     writes every index array, and block b gathers rows b, b + gridDim.x, ...
//     Dynamic shared memory: (DISPATCH_WARPS + 2) * num_experts * 4 +
//     PAIRS_PER_BLOCK * 4 bytes (44 KiB for E = 1024 with 256 threads).
//
//   place_one_block_fp8_{f32,f16,bf16}(the same parameters but the last,
//                     ..., unsigned long long* dropped, unsigned char* rows_q,
//                     float* rows_s)
//     place_one_block with the gathered rows written as the FP8 GEMM's A
//     operand instead of as X: rows_q [num_pairs, hidden] e4m3 codes and
//     rows_s [num_pairs, ceil(hidden / 128)] fp32 scales, bit for bit what
//     quantize_rows_fp8 (fp8.cu) writes for the rows place_one_block
//     gathers (padding rows: codes 0, scales 1). Saves the FP8 step the
//     quantize launch before GEMM 1. Same launch, every other output the
//     same. A warp quantizes two 128-column blocks of a row per pass (a
//     half-warp each, 16-byte loads, 8-byte code stores) when hidden % 8 ==
//     0, x is 16-byte aligned and rows_q 8-byte aligned; one block (one
//     element per access) otherwise.
//
//   gather_rows_{f32,f16,bf16}(const X* x, int hidden, const int* row_to_pair,
//                              int top_k, int num_rows, X* out)
//     out[r, :] = x[row_to_pair[r] / top_k, :], zeros when row_to_pair[r] < 0.
//     One block per row, grid-stride over rows; any grid size and any block
//     size work.
//     Uses 16-byte loads/stores when hidden * sizeof(X) % 16 == 0 and x and
//     out are 16-byte aligned; element copies otherwise. Bit-exact copy.
//
//   gather_rows_by_token_{f32,f16,bf16}(const X* x, int hidden, const int* pair_to_row,
//                                       const int* row_to_pair, int top_k, int num_tokens,
//                                       int num_rows, X* out)
//     gather_rows' output, bit for bit, walked by token: each token's row of x
//     is read once and written to the rows of its top_k pairs (pair_to_row[p]
//     in [0, num_rows); a pair without a row, -1 or a repeat's -2 - j, is
//     skipped), then every row with row_to_pair[r] < 0 is zeroed. Why: in row
//     order each token's row is read top_k times in an order that leaves it
//     no time in L2 once x outgrows L2 (DeepSeek-V3 at 16384 tokens: 235 MB
//     of x read as 1.9 GB from HBM, as many bytes as the gather writes).
//     pair_to_row and row_to_pair must be each other's inverse (assign_rows
//     writes them so). Work items are (token, slice of GATHER_UNITS *
//     blockDim.x 16-byte chunks, or elements when not vectorizable), grid-
//     strided; any grid and any block size work.
//
//   gather_rows_fp8_{f32,f16,bf16}(const X* x, int hidden, const int* row_to_pair,
//                                  int top_k, int num_rows, unsigned char* rows_q,
//                                  float* rows_s)
//     gather_rows' rows written as the FP8 GEMM's A operand instead (the FP8
//     step's GEMM 1 above decode sizes, where place_one_block_fp8 does not
//     run): rows_q [num_rows, hidden] e4m3 codes and rows_s [num_rows,
//     ceil(hidden / 128)] fp32 scales, bit for bit what quantize_rows_fp8
//     (fp8.cu) writes for the rows gather_rows gathers (a row with no pair:
//     codes 0, scales 1). The bf16 rows are never stored, and no quantize
//     launch reads them back. One block per row, grid-stride over rows (any
//     grid; blockDim.x a multiple of 32); the row's tiles as
//     place_one_block_fp8 takes them (fp8_gathered_row below).
//
//   gather_rows_fp8_by_token_{f32,f16,bf16}(the parameters of gather_rows_by_token
//                                           but the last, ..., unsigned char* rows_q,
//                                           float* rows_s)
//     gather_rows_fp8's output, bit for bit, walked by token as
//     gather_rows_by_token walks: a block per token (grid-strided) reads its
//     row once, and each half-warp quantizes a 128-column block of it once
//     and stores the codes and the scale to each of the token's rows; then
//     the rows with row_to_pair[r] < 0 get codes 0 and scales 1. (Rows not
//     vectorizable, see gather_rows_fp8: each of the token's rows quantized
//     afresh, one element per access.)

#include "common.cuh"
#include "fp8.cuh"

#ifndef DISPATCH_THREADS
#error "DISPATCH_THREADS is not defined: the launcher passes it as an NVRTC define"
#endif
#ifndef PAIRS_PER_BLOCK
#error "PAIRS_PER_BLOCK is not defined: the launcher passes it as an NVRTC define"
#endif
#ifndef GATHER_UNITS
#error "GATHER_UNITS is not defined: the launcher passes it as an NVRTC define"
#endif
#if GATHER_UNITS < 1 || GATHER_UNITS > 16
#error "GATHER_UNITS must be 1 .. 16 (registers a thread of gather_rows_by_token holds)"
#endif
#ifndef SKIP_REPEATS
#error "SKIP_REPEATS is not defined: the launcher passes it as an NVRTC define"
#endif
#if DISPATCH_THREADS % 32 != 0 || DISPATCH_THREADS > 1024 || PAIRS_PER_BLOCK % DISPATCH_THREADS != 0
#error "DISPATCH_THREADS must be a multiple of 32 up to 1024, and divide PAIRS_PER_BLOCK"
#endif

#define DISPATCH_WARPS (DISPATCH_THREADS / 32)
#define PAIRS_PER_THREAD (PAIRS_PER_BLOCK / DISPATCH_THREADS)

// The expert pair p takes a row for, or -1 when it takes none: an id outside
// [0, E), or (with SKIP_REPEATS) an expert its token already chose at a lower
// j. *first_choice is that lower j for a repeat, else -1.
__device__ __forceinline__ int pair_expert(const int* __restrict__ topk_ids, long long p, int top_k,
                                           int num_experts, int flags, int* first_choice) {
    *first_choice = -1;
    const int e = topk_ids[p];
    if (e < 0 || e >= num_experts) return -1;
    if (flags & SKIP_REPEATS) {
        const int j = static_cast<int>(p % top_k);
        const int* token = topk_ids + (p - j);
        for (int i = 0; i < j; ++i) {
            if (token[i] == e) {
                *first_choice = i;
                return -1;
            }
        }
    }
    return e;
}

// The routing weight of the row that pair p (its token's first choice of
// expert e) takes: its own weight plus, with SKIP_REPEATS, those of the later
// choices of the same expert, added in choice order (deterministic).
__device__ __forceinline__ float row_weight(const int* __restrict__ topk_ids, const float* __restrict__ topk_weights,
                                            long long p, int top_k, int e, int flags) {
    float w = topk_weights != nullptr ? topk_weights[p] : 1.0f;
    if (flags & SKIP_REPEATS) {
        const int j = static_cast<int>(p % top_k);
        for (int i = j + 1; i < top_k; ++i) {
            if (topk_ids[p - j + i] == e) w += topk_weights != nullptr ? topk_weights[p - j + i] : 1.0f;
        }
    }
    return w;
}

// The histogram keeps one counter per expert in static shared memory; more
// experts than this are handled in several passes over the block's pairs.
#define HIST_CHUNK 2048

// The histogram of one block of pairs (expert_block_histogram and
// expert_histogram_schedule; see the header): block_counts' row blockIdx.x,
// or with `counts` and one block the column scan's results; reset_rows' share.
__device__ __forceinline__ void block_histogram_body(const int* __restrict__ topk_ids, int num_pairs, int top_k,
                                                     int num_experts, int flags, int* __restrict__ block_counts,
                                                     int* __restrict__ reset_rows, int num_reset,
                                                     int* __restrict__ counts, int* hist) {
    for (long long r = static_cast<long long>(blockIdx.x) * DISPATCH_THREADS + threadIdx.x; r < num_reset;
         r += static_cast<long long>(gridDim.x) * DISPATCH_THREADS) {
        reset_rows[r] = -1;
    }
    const long long first = static_cast<long long>(blockIdx.x) * PAIRS_PER_BLOCK;
    // Each thread loads its pairs once (coalesced: consecutive threads read
    // consecutive ids) and reuses them for every expert chunk.
    int ids[PAIRS_PER_THREAD];
#pragma unroll
    for (int i = 0; i < PAIRS_PER_THREAD; ++i) {
        const long long p = first + i * DISPATCH_THREADS + threadIdx.x;
        int repeat_of;
        ids[i] = p < num_pairs ? pair_expert(topk_ids, p, top_k, num_experts, flags, &repeat_of) : -1;
    }
    int* out = block_counts + static_cast<long long>(blockIdx.x) * num_experts;
    for (int base = 0; base < num_experts; base += HIST_CHUNK) {
        const int n = min(HIST_CHUNK, num_experts - base);
        for (int e = threadIdx.x; e < n; e += DISPATCH_THREADS) hist[e] = 0;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < PAIRS_PER_THREAD; ++i) {
            const int e = ids[i] - base;
            // Shared atomics: the order of increments cannot change a count.
            if (e >= 0 && e < n) atomicAdd(&hist[e], 1);
        }
        __syncthreads();
        if (counts != nullptr && gridDim.x == 1) {
            for (int e = threadIdx.x; e < n; e += DISPATCH_THREADS) {
                out[base + e] = 0;  // the one block's base: what expert_column_scan would write
                counts[base + e] = hist[e];
            }
        } else {
            for (int e = threadIdx.x; e < n; e += DISPATCH_THREADS) out[base + e] = hist[e];
        }
        __syncthreads();  // hist is cleared again by the next chunk
    }
}

extern "C" __global__ void __launch_bounds__(DISPATCH_THREADS)
    expert_block_histogram(const int* __restrict__ topk_ids, int num_pairs, int top_k,
                           int num_experts, int flags, int* __restrict__ block_counts,
                           int* __restrict__ reset_rows, int num_reset, int* __restrict__ counts) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    __shared__ int hist[HIST_CHUNK];
    block_histogram_body(topk_ids, num_pairs, top_k, num_experts, flags, block_counts, reset_rows, num_reset, counts,
                         hist);
}

// The offsets kernel's contiguous schedule (grouped_tile_offsets of
// grouped_gemm_sm90.cu with M = the pairs, capacity 0: the counts sum to at
// most M, so its cut at M changes nothing) of the counts m_of[0 .. E - 1],
// by the whole block: row_offsets, row_ends, tile_offsets and both tile
// counters zeroed where `writer`, counts[e] = m_of[e] too where counts is
// not null, and each expert's first row into first_row (shared) where it is
// not null. Returns the rows of all experts.
__device__ __forceinline__ int contiguous_schedule(const int* m_of, int E, int tile_rows, bool writer,
                                                    int* __restrict__ counts, int* __restrict__ row_offsets,
                                                    int* __restrict__ row_ends, int* __restrict__ tile_offsets,
                                                    int* __restrict__ tile_counters, int* first_row,
                                                    int* scratch) {
    int row_carry = 0, tile_carry = 0;
    for (int base = 0; base < E; base += DISPATCH_THREADS) {
        const int e = base + threadIdx.x;
        const int m = e < E ? m_of[e] : 0;
        int rows_total, tiles_total;
        const int row_ex = block_exclusive_scan(m, &rows_total, scratch);
        const int tile_ex = block_exclusive_scan((m + tile_rows - 1) / tile_rows, &tiles_total, scratch);
        if (e < E) {
            if (first_row != nullptr) first_row[e] = row_carry + row_ex;
            if (writer) {
                if (counts != nullptr) counts[e] = m;
                row_offsets[e] = row_carry + row_ex;
                row_ends[e] = row_carry + row_ex + m;
                tile_offsets[e] = tile_carry + tile_ex;
            }
        }
        row_carry += rows_total;
        tile_carry += tiles_total;
    }
    if (writer && threadIdx.x == 0) {
        row_offsets[E] = row_carry;
        tile_offsets[E] = tile_carry;
        tile_counters[0] = 0;  // the two GEMMs after this launch hand out tiles from 0
        tile_counters[1] = 0;
    }
    return row_carry;
}

// The last block's column scan stages this many ints of block_counts at a
// time (nb rows of a chunk of experts) in shared memory.
#define SCHEDULE_STAGE_INTS 8192

extern "C" __global__ void __launch_bounds__(DISPATCH_THREADS)
    expert_histogram_schedule(const int* __restrict__ topk_ids, int num_pairs, int top_k, int num_experts,
                              int flags, int* __restrict__ block_counts, int* __restrict__ reset_rows,
                              int num_reset, int tile_rows, int* __restrict__ counts,
                              int* __restrict__ row_offsets, int* __restrict__ row_ends,
                              int* __restrict__ tile_offsets, int* __restrict__ tile_counters,
                              unsigned* __restrict__ ticket) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    __shared__ int hist[HIST_CHUNK];
    __shared__ int stage[SCHEDULE_STAGE_INTS];
    __shared__ int scratch[SCAN_SCRATCH_INTS];
    __shared__ bool last;
    block_histogram_body(topk_ids, num_pairs, top_k, num_experts, flags, block_counts, reset_rows, num_reset,
                         nullptr, hist);
    // The last block to finish its row scans them all (the pattern of CUDA's
    // threadFenceReduction sample): every block's row is visible device-wide
    // before its ticket, and the last one reads them after its own.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int E = num_experts, nb = gridDim.x;
    // expert_column_scan's results, a chunk of experts at a time: the chunk's
    // nb x chunk counts into shared memory (many loads in flight at once),
    // each expert's column scanned there by one thread, written back as bases.
    const int chunk = max(1, min(E, SCHEDULE_STAGE_INTS / nb));
    for (int e0 = 0; e0 < E; e0 += chunk) {
        const int n = min(chunk, E - e0);
        for (int i = threadIdx.x; i < nb * n; i += DISPATCH_THREADS) {
            stage[i] = __ldcg(block_counts + static_cast<long long>(i / n) * E + e0 + i % n);
        }
        __syncthreads();
        for (int e = threadIdx.x; e < n; e += DISPATCH_THREADS) {
            int total = 0;
            for (int b = 0; b < nb; ++b) {
                const int c = stage[b * n + e];
                stage[b * n + e] = total;
                total += c;
            }
            counts[e0 + e] = total;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < nb * n; i += DISPATCH_THREADS) {
            block_counts[static_cast<long long>(i / n) * E + e0 + i % n] = stage[i];
        }
        __syncthreads();  // stage is refilled by the next chunk
    }
    // counts is this block's own writes, seen by all its threads after the barrier above.
    contiguous_schedule(counts, E, tile_rows, true, nullptr, row_offsets, row_ends, tile_offsets, tile_counters,
                        nullptr, scratch);
    if (threadIdx.x == 0) *ticket = 0u;  // every block has taken its ticket: ready for the next launch
}

extern "C" __global__ void __launch_bounds__(DISPATCH_THREADS)
    expert_column_scan(int* __restrict__ block_counts, int num_blocks, int num_experts,
                       int* __restrict__ counts) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    __shared__ int scratch[SCAN_SCRATCH_INTS];
    const int e = blockIdx.x;
    if (e >= num_experts) return;
    // Column e is strided by E; nb is small (pairs / PAIRS_PER_BLOCK), so the strided
    // reads cost little next to the other passes.
    const int total =
        block_exclusive_scan_strided(block_counts + e, num_blocks, num_experts, scratch);
    if (threadIdx.x == 0) counts[e] = total;
}

extern "C" __global__ void __launch_bounds__(DISPATCH_THREADS)
    assign_rows(const int* __restrict__ topk_ids, int num_pairs, int top_k, int num_experts,
                int flags, const int* __restrict__ block_base, const int* __restrict__ row_offsets,
                int num_rows, int* __restrict__ pair_to_row, int* __restrict__ row_to_pair,
                unsigned long long* __restrict__ dropped, const float* __restrict__ topk_weights,
                float* __restrict__ row_weights) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    // Shared layout (ints): next_row[E] | warp_counts[DISPATCH_WARPS][E].
    //   next_row[e]       first row of the next pair of expert e in this
    //                     block (global row, so no addition needed later).
    //   warp_counts[w][e] pairs of expert e in warp w in the current round.
    extern __shared__ int dispatch_smem[];
    const int E = num_experts;
    int* next_row = dispatch_smem;
    int* warp_counts = dispatch_smem + E;

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int* base = block_base + static_cast<long long>(blockIdx.x) * E;
    for (int e = threadIdx.x; e < E; e += DISPATCH_THREADS) next_row[e] = row_offsets[e] + base[e];
    for (int i = threadIdx.x; i < DISPATCH_WARPS * E; i += DISPATCH_THREADS) warp_counts[i] = 0;
    __syncthreads();

    const unsigned lanes_below = (1u << lane) - 1u;
    const long long first = static_cast<long long>(blockIdx.x) * PAIRS_PER_BLOCK;
    // Rounds of DISPATCH_THREADS consecutive pairs; within a round pair order
    // is (warp, lane) order, so ranking by (earlier rounds, earlier warps,
    // lower lanes) reproduces pair order exactly.
    for (int round = 0; round < PAIRS_PER_THREAD; ++round) {
        const long long p = first + round * DISPATCH_THREADS + threadIdx.x;
        const bool real = p < num_pairs;
        int repeat_of = -1;
        const int e = real ? pair_expert(topk_ids, p, top_k, num_experts, flags, &repeat_of) : -1;

        // Lanes of this warp holding the same expert, and our rank among them.
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int rank = __popc(peers & lanes_below);
        const bool leader = rank == 0;
        if (e >= 0 && leader) warp_counts[warp * E + e] = __popc(peers);
        __syncthreads();

        int row = 0;
        if (e >= 0) {
            row = next_row[e] + rank;
            for (int w = 0; w < warp; ++w) row += warp_counts[w * E + e];
        }
        __syncthreads();  // all reads of next_row done before it moves on

        bool drop = real && e < 0 && repeat_of < 0;  // an id outside [0, E)
        if (e >= 0) {
            if (row < num_rows) {
                pair_to_row[p] = row;
                row_to_pair[row] = static_cast<int>(p);
                if (row_weights != nullptr) row_weights[row] = row_weight(topk_ids, topk_weights, p, top_k, e, flags);
            } else {
                pair_to_row[p] = -1;  // past the caller's capacity: never written
                drop = true;
            }
            if (leader) {
                // Sum of per-warp counts: the order of the adds cannot change
                // the result. The leader also clears its entry, so the next
                // round starts from zeros without a full clear.
                atomicAdd(&next_row[e], __popc(peers));
                warp_counts[warp * E + e] = 0;
            }
        } else if (real) {
            pair_to_row[p] = repeat_of >= 0 ? -2 - repeat_of : -1;
        }
        const unsigned drops = __ballot_sync(0xffffffffu, drop);
        if (dropped != nullptr && lane == 0 && drops != 0u) {
            atomicAdd(dropped, static_cast<unsigned long long>(__popc(drops)));
        }
        __syncthreads();
    }
}

template <class T>
__device__ __forceinline__ void gather_rows_impl(const T* __restrict__ x, int hidden,
                                                 const int* __restrict__ row_to_pair, int top_k,
                                                 int num_rows, T* __restrict__ out) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    const bool vec = rows_vectorizable<T>(hidden, x, out);
    for (int r = blockIdx.x; r < num_rows; r += gridDim.x) {
        const int p = row_to_pair[r];
        const T* src = p >= 0 ? x + static_cast<long long>(p / top_k) * hidden : nullptr;
        copy_row(out + static_cast<long long>(r) * hidden, src, hidden, vec);
    }
}

#define GATHER_ROWS_PARAMS(X) \
    (const X* x, int hidden, const int* row_to_pair, int top_k, int num_rows, X* out)
DEFINE_KERNEL_3TYPES(gather_rows, GATHER_ROWS_PARAMS, (x, hidden, row_to_pair, top_k, num_rows, out))

// gather_rows_by_token: see the header. Each thread loads up to
// GATHER_UNITS units (16-byte chunks, or elements) of the token's row before it
// stores any, so that several loads are in flight per thread.

template <class U>
__device__ __forceinline__ void scatter_token_units(const U* __restrict__ src, U* __restrict__ out,
                                                    long long row_units, long long first,
                                                    const int* __restrict__ rows, int top_k,
                                                    int num_rows) {
    U v[GATHER_UNITS];
#pragma unroll
    for (int u = 0; u < GATHER_UNITS; ++u) {
        const long long i = first + static_cast<long long>(u) * blockDim.x;
        if (i < row_units) v[u] = src[i];
    }
    for (int j = 0; j < top_k; ++j) {
        const int r = rows[j];
        if (r < 0 || r >= num_rows) continue;  // no row (dropped or a repeat's alias)
        U* dst = out + static_cast<long long>(r) * row_units;
#pragma unroll
        for (int u = 0; u < GATHER_UNITS; ++u) {
            const long long i = first + static_cast<long long>(u) * blockDim.x;
            if (i < row_units) dst[i] = v[u];
        }
    }
}

template <class T>
__device__ __forceinline__ void gather_rows_by_token_impl(const T* __restrict__ x, int hidden,
                                                          const int* __restrict__ pair_to_row,
                                                          const int* __restrict__ row_to_pair, int top_k,
                                                          int num_tokens, int num_rows, T* __restrict__ out) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    const bool vec = rows_vectorizable<T>(hidden, x, out);
    const long long row_units = vec ? hidden / Vec16<T>::N : hidden;
    const long long per_slice = static_cast<long long>(GATHER_UNITS) * blockDim.x;
    const long long slices = (row_units + per_slice - 1) / per_slice;
    const long long work = static_cast<long long>(num_tokens) * slices;
    for (long long w = blockIdx.x; w < work; w += gridDim.x) {
        const long long t = w / slices;
        const long long first = (w - t * slices) * per_slice + threadIdx.x;
        const int* rows = pair_to_row + t * top_k;
        if (vec) {
            scatter_token_units(reinterpret_cast<const Raw16*>(x) + t * row_units, reinterpret_cast<Raw16*>(out),
                                row_units, first, rows, top_k, num_rows);
        } else {
            scatter_token_units(x + t * row_units, out, row_units, first, rows, top_k, num_rows);
        }
    }
    // Rows no pair fills (padding, the capacity's unused rows): zeros, as gather_rows writes.
    for (int r = blockIdx.x; r < num_rows; r += gridDim.x) {
        if (row_to_pair[r] < 0) copy_row(out + static_cast<long long>(r) * hidden, static_cast<const T*>(nullptr), hidden, vec);
    }
}

#define GATHER_ROWS_BY_TOKEN_PARAMS(X)                                                                  \
    (const X* x, int hidden, const int* pair_to_row, const int* row_to_pair, int top_k, int num_tokens, \
     int num_rows, X* out)
DEFINE_KERNEL_3TYPES(gather_rows_by_token, GATHER_ROWS_BY_TOKEN_PARAMS,
                     (x, hidden, pair_to_row, row_to_pair, top_k, num_tokens, num_rows, out))

// One gathered row (src: the token's row of x, or null for zeros) quantized
// into its scales at s_row and codes at q_row by the block's threads, as
// quantize_rows_fp8 quantizes the row gather_rows would write (fp8.cuh's
// fp8_row_by_block). vec8: hidden % 8 == 0, x 16-byte aligned and the codes
// 8-byte aligned (uniform across the launch: the caller checks once).
template <class T>
__device__ __forceinline__ void fp8_gathered_row(const T* __restrict__ src, int hidden, bool vec8,
                                                 float* __restrict__ s_row, unsigned char* __restrict__ q_row) {
    auto eight = [&](int c, float* v) {
        if (src != nullptr) {
            unpack8(load_raw8(src + c), v);
        } else {
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = 0.0f;
        }
    };
    auto one = [&](int c) -> float { return src != nullptr ? load_as_float(src + c) : 0.0f; };
    fp8_row_by_block(hidden, vec8, s_row, q_row, eight, one);
}

template <class T>
__device__ __forceinline__ bool fp8_rows_vectorizable(int hidden, const T* x, const unsigned char* rows_q) {
    return (hidden & 7) == 0 && is_aligned16(x) && (reinterpret_cast<unsigned long long>(rows_q) & 7ull) == 0ull;
}

template <class T>
__device__ __forceinline__ void gather_rows_fp8_impl(const T* __restrict__ x, int hidden,
                                                     const int* __restrict__ row_to_pair, int top_k, int num_rows,
                                                     unsigned char* __restrict__ rows_q,
                                                     float* __restrict__ rows_s) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    const bool vec8 = fp8_rows_vectorizable<T>(hidden, x, rows_q);
    const long long scales_per_row = (hidden + 127) / 128;
    for (int r = blockIdx.x; r < num_rows; r += gridDim.x) {
        const int p = row_to_pair[r];
        const T* src = p >= 0 ? x + static_cast<long long>(p / top_k) * hidden : nullptr;
        fp8_gathered_row(src, hidden, vec8, rows_s + r * scales_per_row, rows_q + static_cast<long long>(r) * hidden);
    }
}

#define GATHER_ROWS_FP8_PARAMS(X)                                                                    \
    (const X* x, int hidden, const int* row_to_pair, int top_k, int num_rows, unsigned char* rows_q, \
     float* rows_s)
DEFINE_KERNEL_3TYPES(gather_rows_fp8, GATHER_ROWS_FP8_PARAMS,
                     (x, hidden, row_to_pair, top_k, num_rows, rows_q, rows_s))

// gather_rows_fp8_by_token: see the header. The vector path is fp8_row_by_block's
// (fp8.cuh), each tile's codes computed once and stored once per row.
template <class T>
__device__ __forceinline__ void gather_rows_fp8_by_token_impl(const T* __restrict__ x, int hidden,
                                                              const int* __restrict__ pair_to_row,
                                                              const int* __restrict__ row_to_pair, int top_k,
                                                              int num_tokens, int num_rows,
                                                              unsigned char* __restrict__ rows_q,
                                                              float* __restrict__ rows_s) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    const bool vec8 = fp8_rows_vectorizable<T>(hidden, x, rows_q);
    const int tcols = (hidden + 127) / 128;
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int lane = threadIdx.x & 15, half = (threadIdx.x >> 4) & 1;
    for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        const T* src = x + static_cast<long long>(t) * hidden;
        const int* rows = pair_to_row + static_cast<long long>(t) * top_k;
        if (!vec8) {
            for (int j = 0; j < top_k; ++j) {
                const int r = rows[j];
                if (r < 0 || r >= num_rows) continue;
                fp8_gathered_row(src, hidden, false, rows_s + static_cast<long long>(r) * tcols,
                                 rows_q + static_cast<long long>(r) * hidden);
            }
            continue;
        }
        // The bound is the same for both halves of a warp: all 32 lanes reach the shuffles.
        for (int t0 = 2 * warp; t0 < tcols; t0 += 2 * warps) {
            const int tile = t0 + half;
            const int c = tile * 128 + 8 * lane;
            const bool mine = tile < tcols && c < hidden;  // hidden % 8 == 0: all 8 columns are in the row
            float v[8] = {};
            if (mine) unpack8(load_raw8(src + c), v);
            unsigned int b[2];
            const float scale = fp8_codes_by_half_warp(v, mine, b);
            for (int j = 0; j < top_k; ++j) {
                const int r = rows[j];
                if (r < 0 || r >= num_rows) continue;  // no row (dropped or a repeat's alias)
                if (mine) store_codes8(rows_q + static_cast<long long>(r) * hidden + c, b);
                if (tile < tcols && lane == 0) rows_s[static_cast<long long>(r) * tcols + tile] = scale;
            }
        }
    }
    // Rows no pair fills: codes 0, scales 1, as gather_rows_fp8 writes them.
    for (int r = blockIdx.x; r < num_rows; r += gridDim.x) {
        if (row_to_pair[r] < 0) {
            fp8_gathered_row(static_cast<const T*>(nullptr), hidden, vec8,
                             rows_s + static_cast<long long>(r) * tcols, rows_q + static_cast<long long>(r) * hidden);
        }
    }
}

#define GATHER_ROWS_FP8_BY_TOKEN_PARAMS(X)                                                              \
    (const X* x, int hidden, const int* pair_to_row, const int* row_to_pair, int top_k, int num_tokens, \
     int num_rows, unsigned char* rows_q, float* rows_s)
DEFINE_KERNEL_3TYPES(gather_rows_fp8_by_token, GATHER_ROWS_FP8_BY_TOKEN_PARAMS,
                     (x, hidden, pair_to_row, row_to_pair, top_k, num_tokens, num_rows, rows_q, rows_s))

// place_one_block and place_one_block_fp8: see the header. The ranking is
// assign_rows' (rounds of DISPATCH_THREADS pairs, a warp's peers by
// __match_any_sync, earlier warps' counts from shared memory), run from
// zero, so that the counts are what the ranks leave behind and no histogram
// pass comes first. The gathered rows go to `rows` (X) or, as e4m3, to
// rows_q and rows_s: each entry point passes null constants for the other,
// so each compiles to its own gather alone.
template <class T>
__device__ __forceinline__ void place_one_block_body(
    const int* __restrict__ topk_ids, int num_pairs, int top_k, int num_experts, int flags,
    const float* __restrict__ topk_weights, const T* __restrict__ x, int hidden, int tile_rows,
    int* __restrict__ counts, int* __restrict__ row_offsets, int* __restrict__ row_ends,
    int* __restrict__ tile_offsets, int* __restrict__ tile_counters, int* __restrict__ pair_to_row,
    int* __restrict__ row_to_pair, float* __restrict__ row_weights, unsigned long long* __restrict__ dropped,
    T* __restrict__ rows, unsigned char* __restrict__ rows_q, float* __restrict__ rows_s) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    // Shared layout (ints): taken[E] | first_row[E] | warp_counts[DISPATCH_WARPS][E] | pair_of_row[PAIRS_PER_BLOCK].
    extern __shared__ int place_smem[];
    __shared__ int scratch[SCAN_SCRATCH_INTS];
    const int E = num_experts;
    int* taken = place_smem;        // rows of each expert ranked so far, then its count
    int* first_row = taken + E;        // each expert's first row (the exclusive prefix of counts)
    int* warp_counts = first_row + E;  // pairs of expert e in warp w in the current round
    int* pair_of_row = warp_counts + DISPATCH_WARPS * E;
    const bool writer = blockIdx.x == 0;

    for (int e = threadIdx.x; e < E; e += DISPATCH_THREADS) taken[e] = 0;
    for (int i = threadIdx.x; i < DISPATCH_WARPS * E; i += DISPATCH_THREADS) warp_counts[i] = 0;
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const unsigned lanes_below = (1u << lane) - 1u;
    int expert[PAIRS_PER_THREAD], rank[PAIRS_PER_THREAD], repeat_of[PAIRS_PER_THREAD];
#pragma unroll
    for (int round = 0; round < PAIRS_PER_THREAD; ++round) {
        const int p = round * DISPATCH_THREADS + threadIdx.x;
        repeat_of[round] = -1;
        const int e = p < num_pairs ? pair_expert(topk_ids, p, top_k, num_experts, flags, &repeat_of[round]) : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int r = __popc(peers & lanes_below);
        if (e >= 0 && r == 0) warp_counts[warp * E + e] = __popc(peers);
        __syncthreads();
        int before = 0;
        if (e >= 0) {
            before = taken[e] + r;
            for (int w = 0; w < warp; ++w) before += warp_counts[w * E + e];
        }
        __syncthreads();  // every read of taken done before it moves on
        if (e >= 0 && r == 0) {
            atomicAdd(&taken[e], __popc(peers));  // integer adds: order-free
            warp_counts[warp * E + e] = 0;
        }
        expert[round] = e;
        rank[round] = before;
        __syncthreads();
    }

    // Each expert's first row and tile: the offsets kernel's contiguous layout
    // (the counts sum to at most num_pairs = M, so its cut at M changes nothing).
    const int row_carry = contiguous_schedule(taken, E, tile_rows, writer, counts, row_offsets, row_ends,
                                              tile_offsets, tile_counters, first_row, scratch);
    __syncthreads();  // first_row is complete

#pragma unroll
    for (int round = 0; round < PAIRS_PER_THREAD; ++round) {
        const int p = round * DISPATCH_THREADS + threadIdx.x;
        const int e = expert[round];
        if (e >= 0) {
            const int row = first_row[e] + rank[round];
            pair_of_row[row] = p;
            if (writer) {
                pair_to_row[p] = row;
                row_to_pair[row] = p;
                if (row_weights != nullptr) row_weights[row] = row_weight(topk_ids, topk_weights, p, top_k, e, flags);
            }
        } else if (writer && p < num_pairs) {
            pair_to_row[p] = repeat_of[round] >= 0 ? -2 - repeat_of[round] : -1;
        }
        const bool drop = p < num_pairs && e < 0 && repeat_of[round] < 0;  // an id outside [0, E)
        const unsigned drops = __ballot_sync(0xffffffffu, drop);
        if (writer && dropped != nullptr && lane == 0 && drops != 0u) {
            atomicAdd(dropped, static_cast<unsigned long long>(__popc(drops)));
        }
    }
    if (writer) {
        for (int r = row_carry + threadIdx.x; r < num_pairs; r += DISPATCH_THREADS) row_to_pair[r] = -1;
    }
    if (rows == nullptr && rows_q == nullptr) return;
    __syncthreads();  // pair_of_row is complete
    if (rows_q != nullptr) {
        // Eight columns per lane: every row of x starts 16-byte aligned when
        // hidden % 8 == 0 and x is, every row of codes 8-byte aligned when
        // rows_q is. Uniform across the launch.
        const bool vec8 = fp8_rows_vectorizable<T>(hidden, x, rows_q);
        const long long scales_per_row = (hidden + 127) / 128;
        for (int r = blockIdx.x; r < num_pairs; r += gridDim.x) {
            // No pair on this row: zeros, as place_one_block gathers them (codes 0, scales 1).
            const T* src = r < row_carry ? x + static_cast<long long>(pair_of_row[r] / top_k) * hidden : nullptr;
            fp8_gathered_row(src, hidden, vec8, rows_s + r * scales_per_row, rows_q + static_cast<long long>(r) * hidden);
        }
        return;
    }
    const bool vec = rows_vectorizable<T>(hidden, x, rows);
    for (int r = blockIdx.x; r < num_pairs; r += gridDim.x) {
        const T* src = r < row_carry ? x + static_cast<long long>(pair_of_row[r] / top_k) * hidden : nullptr;
        copy_row(rows + static_cast<long long>(r) * hidden, src, hidden, vec);
    }
}

// The parameters both entry points share (all but the gathered rows' outputs).
#define PLACE_ONE_BLOCK_COMMON_PARAMS(X)                                                                    \
    const int* topk_ids, int num_pairs, int top_k, int num_experts, int flags, const float* topk_weights,  \
        const X* x, int hidden, int tile_rows, int* counts, int* row_offsets, int* row_ends, int* tile_offsets, \
        int* tile_counters, int* pair_to_row, int* row_to_pair, float* row_weights, unsigned long long* dropped
#define PLACE_ONE_BLOCK_COMMON_ARGS                                                                            \
    topk_ids, num_pairs, top_k, num_experts, flags, topk_weights, x, hidden, tile_rows, counts, row_offsets, \
        row_ends, tile_offsets, tile_counters, pair_to_row, row_to_pair, row_weights, dropped

template <class T>
__device__ __forceinline__ void place_one_block_impl(PLACE_ONE_BLOCK_COMMON_PARAMS(T), T* rows) {
    place_one_block_body<T>(PLACE_ONE_BLOCK_COMMON_ARGS, rows, nullptr, nullptr);
}
template <class T>
__device__ __forceinline__ void place_one_block_fp8_impl(PLACE_ONE_BLOCK_COMMON_PARAMS(T), unsigned char* rows_q,
                                                         float* rows_s) {
    place_one_block_body<T>(PLACE_ONE_BLOCK_COMMON_ARGS, nullptr, rows_q, rows_s);
}

#define PLACE_ONE_BLOCK_PARAMS(X) (PLACE_ONE_BLOCK_COMMON_PARAMS(X), X* rows)
DEFINE_KERNEL_3TYPES(place_one_block, PLACE_ONE_BLOCK_PARAMS, (PLACE_ONE_BLOCK_COMMON_ARGS, rows))
#define PLACE_ONE_BLOCK_FP8_PARAMS(X) (PLACE_ONE_BLOCK_COMMON_PARAMS(X), unsigned char* rows_q, float* rows_s)
DEFINE_KERNEL_3TYPES(place_one_block_fp8, PLACE_ONE_BLOCK_FP8_PARAMS, (PLACE_ONE_BLOCK_COMMON_ARGS, rows_q, rows_s))
