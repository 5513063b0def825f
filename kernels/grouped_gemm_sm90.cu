// grouped_gemm_sm90.cu: a grouped GEMM for Hopper (sm_90a): TMA bulk-tensor
// loads into a shared-memory ring guarded by mbarriers, and wgmma with fp32
// accumulators in registers. Group sizes are read on the device: nothing
// crosses to the host.
//
//   out[o_g + r, :] = a[o_g + r, :] @ b[g]^T   for every group g, row r < m_g   (nt kernels)
//   out[o_g + r, :] = a[o_g + r, :] @ b[g]     for every group g, row r < m_g   (nn kernels)
//
// Two row layouts, both with the group sizes on the device:
//   grouped-contiguous: o_g = m_0 + ... + m_{g-1} (group after group, no gaps);
//   masked fixed capacity: a is [E, C, K] and out [E, C, N], o_g = g * C and
//     m_g = min(sizes[g], C): rows m_g .. C - 1 of each group are neither
//     computed as tiles of their own nor written (the decode layout: the
//     launch depends on E and C only, so a CUDA graph replays it with new sizes).
//
//   a    [M, K]      rows of group g at o_g .. o_g + m_g - 1
//   b    nt: [E, N, K], one K-major matrix per group (the nn.Linear layout),
//            seen by its tensor map as [E * N, K];
//        nn: [E, K, N], one N-major matrix per group (gmm's default layout),
//            seen by its tensor map as the 3-D [E, K, N] (so a K tail reads
//            zeros, not the next group's first rows)
//   out  [M, N]      row-major, the inputs' dtype (bf16 or fp16), fp32 accumulation
//
// Defines (the launcher, gemm/backends/hopper.py, is their one source):
//   SM90_BLOCK_M        rows of a tile: 128, two math warpgroups of 64 rows (wgmma m64)
//   SM90_BLOCK_N        columns of a tile: 256 (wgmma n256) or 128 (n128: half the
//                       accumulators, twice the tiles: finer tails where a
//                       tile's weights take long to stream, as at decode; not
//                       with SM90_EPILOGUE_ACT)
//   SM90_BLOCK_K        K of one pipeline stage: 64 (128 bytes of a 16-bit
//                       type: one row of the 128-byte swizzle)
//   SM90_A_BOX_ROWS     rows of a's small TMA box: 16 (a multiple of 8, at
//                       most SM90_BLOCK_M). A tile of at most
//                       SM90_BLOCK_M / 2 rows of its group loads only the
//                       small boxes holding them (v10); SM90_BLOCK_M gives
//                       v9's loads (one whole box for every tile)
//   SM90_SMALL_A_ROWS   0 .. SM90_BLOCK_M / 2: a 128-row tile with at most
//                       this many rows of its group loads them in small boxes,
//                       one with more a's whole box (thin tiles: always the
//                       small boxes). Small boxes save bytes at decode; several
//                       a stage cost more than one whole box
//                       (docs/kernel-notes.md, "What an FP8 tail tile costs")
//   SM90_STAGES         shared-memory stages of the ring
//   SM90_SKIP_IDLE      optional, 1: the second math warpgroup of a thin tile (at most
//                       SM90_BLOCK_M / 2 rows of its group) runs no MMAs and
//                       only releases the stages (v12); 0 or undefined
//                       (the default): it multiplies stale rows it never
//                       stores (v10, v11)
//   SM90_THIN           0: tiles of SM90_BLOCK_M rows, math warpgroup w
//                       multiplying rows 64 (w - 1) .. + 63 over all the
//                       tile's columns. 1 (thin tiles, for decode): math
//                       warpgroup w multiplies columns 128 (w - 1) .. + 127
//                       of the same 64 rows (wgmma m64n128; SM90_BLOCK_N =
//                       256), so a stage is 8 KiB of a and 32 KiB of b and
//                       the ring holds one more stage of weights (5 stages:
//                       160 KiB of b in flight, where 4 stages of 128-row
//                       tiles hold 128 KiB). The schedule keeps its tiles of
//                       SM90_BLOCK_M rows (grouped_tile_offsets is shared
//                       with the other GEMMs of a step); one with more than
//                       64 of its group's rows runs as two passes of 64, each
//                       streaming the tile's band of b again: right for
//                       decode, wrong for prefill. Not with
//                       SM90_EPILOGUE_ACT (gate and up would lie in
//                       different warpgroups), SM90_GATHER_A or SM90_SKIP_IDLE.
//   SM90_PREFETCH_B     optional, 1: the launch's schedule was complete before the
//                       previous kernel started (a step's GEMM 2, whose
//                       offsets came before GEMM 1): each CTA reads it and
//                       prefetches its first tile's first SM90_STAGES stages
//                       of b into L2 before griddepcontrol.wait, so the
//                       weights stream while the previous kernel (the
//                       activation, which lets this one launch early) runs.
//                       0 or undefined: the wait first, as every other launch.
//   SM90_TILE_THREADS   threads of grouped_tile_offsets' one block
//   SM90_TABLE_MAX_GROUPS  the most groups whose schedule the GEMMs copy into
//                       shared memory (v14); the launcher's dynamic shared
//                       memory then holds 4 * (3E + 1) bytes more
//   SM90_EPILOGUE_ACT   optional: an activation code (ACT_SILU, ACT_GELU or
//                       ACT_RELU, also defined) for the gated epilogue below
//   SM90_FAST_ACT       optional, default 1: the epilogue's SiLU from fast
//                       intrinsics (common.cuh, apply_act_fast); 0: IEEE
//   SM90_GATHER_A       optional (v11): a's rows are read through an index
//                       array instead of from a gathered copy (see "Gathered
//                       a" below); the kernels take four more arguments
//   SM90_FOLD_ROWS      v15: 0 (off) or SM90_A_BOX_ROWS: a
//                       group whose rows end at most SM90_FOLD_ROWS past a
//                       whole tile has those last rows (its "fold") computed
//                       by the tile before them, not as a tile of their own
//                       that would stream the same band of b again for a few
//                       rows. The schedule is unchanged (grouped_tile_offsets
//                       and the placement kernels stay the only writers of
//                       it, shared with the FP8 kernel): the load thread
//                       skips such a tail tile when it takes it, and the
//                       tile before it loads the fold's rows (one
//                       tmap_a_rows box a stage, into a region of the ring
//                       after b's stages) and multiplies them as a swapped
//                       product: b's stage as wgmma's a (64 columns of the
//                       tile at a time, K-major or, for [E, K, N] weights,
//                       transposed), the fold's rows as its b (m64n16k16);
//                       each math warpgroup computes two 64-column blocks of
//                       the fold (half and half + 2: for the gated epilogue
//                       the gate and up columns of the same outputs) into 16
//                       more accumulators, which the load warpgroup's
//                       registers pay for (setmaxnreg 40 / 232). Not with
//                       SM90_THIN or SM90_GATHER_A; SM90_BLOCK_N 256 only.
//   SM90_EPILOGUE_ROW_SCALE  optional, 1: the weighting epilogue (a layer's
//                       GEMM 2): out[r, c] = row_scale[r] * (acc + bias[g, c]),
//                       the product in fp32, rounded once; the kernels take
//                       one more argument, row_scale (fp32 [M]). Not with
//                       SM90_EPILOGUE_ACT or SM90_GATHER_A.
//
// Kernels:
//
//   grouped_tile_offsets{,_i64}(const S* sizes, int num_groups, int total_rows,
//                               int capacity, int* row_offsets, int* row_ends,
//                               int* tile_offsets, int* tile_counters)
//     S = int (grouped_tile_offsets) or long long (_i64): the caller's sizes
//     read where they are, with no cast or clamp kernel before.
//     ONE block of SM90_TILE_THREADS threads (a multiple of 32, at most 1024).
//     Each size is read as signed and negative ones count as 0. Then
//     contiguous (capacity 0), with M = max(total_rows, 0): m_g =
//     min(P_g, M) - min(P_g - s_g, M), where s_g = min(max(sizes[g], 0), M)
//     and P_g = s_0 + ... + s_g in 64 bits (no overflow for any int32 or int64
//     sizes): the rows of group g inside [0, M) when the groups lie back to
//     back, so every m_g >= 0, they sum to at most M, no row at or past M is
//     read or written and no int32 offset overflows; sizes that are valid
//     (non-negative, summing to M) come out unchanged (the clamp that
//     group_sizes.cu ran as a launch of its own before). Masked (capacity
//     > 0): m_g = min(max(sizes[g], 0), capacity); total_rows is not read.
//     row_offsets [E + 1]: the first row o_g of each group, then the end of
//     the layout (contiguous: the exclusive prefix of m_g, then the total;
//     masked: g * capacity, then E * capacity); row_ends [E]: o_g + m_g;
//     tile_offsets [E + 1]: exclusive prefix of ceil(m_g / SM90_BLOCK_M),
//     then the total. Any E. tile_counters[0] = tile_counters[1] = 0: the
//     GEMM launched next after it hands out tiles from the first, and a second
//     GEMM over the same sizes (a layer's GEMM 2) from the second, so the
//     offsets are not computed twice.
//
//   grouped_gemm_{nt,nn}_{bf16,f16}(tmap_a, tmap_a_rows, tmap_b, row_offsets, row_ends,
//                                   tile_offsets, tile_counter, num_groups,
//                                   M, N, K, out, bias
//                                   [, gather_x, gather_src, gather_top_k,
//                                   gather_x_rows: with SM90_GATHER_A only]
//                                   [, row_scale: with SM90_EPILOGUE_ROW_SCALE only])
//     bias: read only with SM90_EPILOGUE_ACT ([E, N]: gate | up in the plain
//     order) or SM90_EPILOGUE_ROW_SCALE ([E, N]) (null: none).
//     With SM90_EPILOGUE_ACT (the first expert GEMM with its activation,
//     gated): b holds [gate | up] packed in blocks of 128 columns, column
//     block j of 256 = gate columns 128j .. 128j + 127, then up columns
//     128j .. 128j + 127 (N = 2I, I a multiple of 128); bias is [E, 2I] in
//     the plain order (gate columns, then up columns) or null; out is
//     [M, I] = act(gate + bias) * (up + bias), computed from the fp32
//     accumulators (the [M, 2I] product is never stored).
//     tmap_a: tiled TMA map of a [M, K], box [SM90_BLOCK_M, SM90_BLOCK_K],
//             128-byte swizzle; tmap_a_rows: the same with box
//             [SM90_A_BOX_ROWS, SM90_BLOCK_K]. A tile whose group has r rows
//             from the tile's first row loads one tmap_a box per stage when
//             r > SM90_BLOCK_M / 2, else ceil(r / SM90_A_BOX_ROWS) tmap_a_rows
//             boxes (a decode tile of 4 rows: 2 KiB of a per stage, not 16;
//             one issuing thread cannot afford 8 loads per stage on full
//             tiles). The A stage's rows past them keep older data: each
//             output row reads only its own row of A, and those rows are
//             never stored; when r <= 64 the second math warpgroup stores
//             nothing.
//     tmap_b, nt: of b as [E * N, K], box [SM90_BLOCK_N, SM90_BLOCK_K],
//             128-byte swizzle (one load per stage).
//     tmap_b, nn: of b as [E, K, N], box [1, SM90_BLOCK_K, SM90_B_SPAN],
//             128-byte swizzle: SM90_B_SPAN = 64 columns are the swizzle's
//             128-byte row, so a 256-wide tile is 4 boxes per stage, each
//             SM90_BLOCK_K rows of K by 64 columns of N (8 KiB), placed one
//             after the other (the layout wgmma's N-major descriptor reads);
//             boxes wholly past N are not loaded (nor counted in the stage's
//             bytes), so no load depends on how TMA treats a box with no
//             element inside the tensor.
//     All maps fill out-of-bounds elements with zeros (so a K tail adds nothing).
//     tile_counter: one int, zeroed by grouped_tile_offsets (one of its two
//     tile_counters) before, on the same stream, with no other launch using
//     it in between; incremented once per tile a CTA takes after its first.
//     Grid: any x >= 1 CTAs (persistent: CTA x takes tile x first, then
//     whichever tile of the schedule below is next when it has room for one,
//     gridDim.x + atomicAdd(tile_counter, 1), until they run out). The launcher gives one CTA
//     per SM ("persistent"), or one per tile that any sizes summing to M can
//     need, (ceil(M / SM90_BLOCK_M) + E) * ceil(N / SM90_BLOCK_N) ("per_tile":
//     each CTA's loop runs at most once, as in v5). Block SM90_THREADS = 384
//     threads: warpgroup 0 loads (one thread issues every TMA), warpgroups 1
//     and 2 multiply 64 rows each (warp specialization: the loads run ahead
//     while the MMAs run, and into the next tile while a tile is stored).
//     Dynamic shared memory: SM90_STAGES * (SM90_TILE_M + SM90_BLOCK_N) *
//     SM90_BLOCK_K * 2 (the ring; SM90_TILE_M: 64 with SM90_THIN, else SM90_BLOCK_M) + 2 * 64 * 72 * 2 (the store's staging
//     areas) + 1024 bytes (the 1024 align the ring for the swizzle).
//     Schedule: with n_tiles = ceil(N / SM90_BLOCK_N), tile x belongs to group
//     g with tile_offsets[g] <= x / n_tiles < tile_offsets[g + 1]; with
//     local = x - tile_offsets[g] * n_tiles and m_g tiles in the group, rows
//     row_offsets[g] + (local % m_g) * SM90_BLOCK_M and columns
//     (local / m_g) * SM90_BLOCK_N onwards (M tiles fastest, group by group).
//     Rows of the tile at or past row_ends[g] (the next group's rows, or a
//     masked group's unused ones) and columns past N are computed but never
//     stored; no row at or past M is ever stored.
//     Every output element is computed by one CTA in a fixed K order:
//     bitwise deterministic.
//
// Gathered a (SM90_GATHER_A, v11: the first expert GEMM reading the tokens
// themselves, so the MoE step writes no gathered copy of them). The GEMM
// kernels take, after bias:
//     gather_x [T, K] (the tokens), gather_src int32 [M], gather_top_k,
//     gather_x_rows (T),
//   and row r of the layout above is a[r] = gather_x[gather_src[r] / gather_top_k]
//   (the MoE step passes its row_to_pair and k: the pair's token; top_k 1
//   makes gather_src a plain row index), zeros where gather_src[r] < 0 or the
//   token is >= gather_x_rows. gather_x must be 16-byte aligned (K % 8 == 0:
//   so is every row). tmap_a and tmap_a_rows are not read (the launcher
//   passes b's map there). b stays on TMA; a's stage is written by all 128
//   threads of the load warpgroup with cp.async, 16 bytes each, in the layout
//   the 128-byte-swizzled TMA box gives (swizzle_128b_offset in sm90.cuh), so
//   the math warpgroups' descriptors are unchanged. Thread t copies chunk t % 8
//   of rows t / 8 + 16 i (i = 0 .. 7): a warp writes 4 whole 128-byte rows
//   per instruction. Only the rows the group holds are written (v10's rule:
//   the others keep older data and are never stored); chunks past K and
//   missing rows are written as zeros (src-size 0). Each thread then arrives
//   on the stage's full barrier through cp.async.mbarrier.arrive.noinc (the
//   arrival lands when its copies have), so full[s] counts 1 + 128 arrivals:
//   the TMA thread's arrive.expect_tx of b's bytes and the 128 copiers'. The
//   load warpgroup's thread 0 still takes the tiles from the counter; the
//   other 127 read them from the mailboxes the math warpgroups read (which
//   then count 256 + 127 readers). The math warpgroups order their reads of
//   a stage after its copies with fence.proxy.async (cp.async writes through
//   the generic proxy; wgmma reads through the async proxy).

#include "common.cuh"
#include "sm90.cuh"

#if !defined(SM90_BLOCK_M) || !defined(SM90_BLOCK_N) || !defined(SM90_BLOCK_K) || \
    !defined(SM90_STAGES) || !defined(SM90_TILE_THREADS) || !defined(SM90_A_BOX_ROWS) || \
    !defined(SM90_TABLE_MAX_GROUPS) || !defined(SM90_THIN) || !defined(SM90_FOLD_ROWS) || !defined(SM90_SMALL_A_ROWS)
#error "grouped_gemm_sm90.cu needs SM90_BLOCK_M, SM90_BLOCK_N, SM90_BLOCK_K, SM90_STAGES, SM90_TILE_THREADS, SM90_A_BOX_ROWS, SM90_TABLE_MAX_GROUPS, SM90_THIN, SM90_FOLD_ROWS and SM90_SMALL_A_ROWS from its launcher"
#endif
#if SM90_SMALL_A_ROWS < 0 || SM90_SMALL_A_ROWS > SM90_BLOCK_M / 2
#error "SM90_SMALL_A_ROWS must be 0 .. SM90_BLOCK_M / 2"
#endif
#ifndef SM90_PREFETCH_B
#define SM90_PREFETCH_B 0
#endif
// The gated epilogue's activation: SiLU from the fast intrinsics
// (apply_act_fast, the default), or 0: apply_act's IEEE form, as the
// activation kernel computes it (a probe's A/B: docs/kernel-notes.md).
#ifndef SM90_FAST_ACT
#define SM90_FAST_ACT 1
#endif
#if SM90_FAST_ACT
#define SM90_ACT apply_act_fast
#else
#define SM90_ACT apply_act
#endif
#if SM90_FOLD_ROWS && (SM90_FOLD_ROWS != SM90_A_BOX_ROWS || SM90_FOLD_ROWS != 16 || SM90_THIN || \
                       SM90_BLOCK_N != 256 || defined(SM90_GATHER_A))
#error "SM90_FOLD_ROWS (v15) must equal SM90_A_BOX_ROWS = 16 (one box, wgmma n16), with SM90_BLOCK_N=256, not SM90_THIN or SM90_GATHER_A"
#endif
#if SM90_PREFETCH_B && defined(SM90_GATHER_A)
#error "SM90_PREFETCH_B is for a step's GEMM 2 (its schedule written before the previous kernel), never gathered"
#endif
#if SM90_THIN && (SM90_BLOCK_N != 256 || SM90_A_BOX_ROWS > 64 || defined(SM90_EPILOGUE_ACT) || \
                  defined(SM90_GATHER_A) || (defined(SM90_SKIP_IDLE) && SM90_SKIP_IDLE))
#error "thin tiles (SM90_THIN) need SM90_BLOCK_N=256 and SM90_A_BOX_ROWS <= 64, and take no SM90_EPILOGUE_ACT, SM90_GATHER_A or SM90_SKIP_IDLE"
#endif
#if SM90_A_BOX_ROWS % 8 != 0 || SM90_A_BOX_ROWS > SM90_BLOCK_M
#error "SM90_A_BOX_ROWS must be a multiple of 8 (one 1024-byte swizzle atom), at most SM90_BLOCK_M"
#endif
#if SM90_BLOCK_M != 128 || (SM90_BLOCK_N != 256 && SM90_BLOCK_N != 128) || SM90_BLOCK_K != 64
#error "this kernel's two math warpgroups issue wgmma m64n256k16 (or m64n128k16) over 64-wide K stages: SM90_BLOCK_M=128, SM90_BLOCK_N=256 or 128, SM90_BLOCK_K=64"
#endif
#if defined(SM90_EPILOGUE_ACT) && SM90_BLOCK_N != 256
#error "SM90_EPILOGUE_ACT needs SM90_BLOCK_N=256: a tile holds the gate and the up columns of the same 128 outputs"
#endif
#if defined(SM90_EPILOGUE_ACT) && !(defined(ACT_SILU) && defined(ACT_GELU) && defined(ACT_RELU))
#error "SM90_EPILOGUE_ACT needs the activation codes ACT_SILU, ACT_GELU and ACT_RELU"
#endif
#if SM90_TILE_THREADS % 32 != 0 || SM90_TILE_THREADS > 1024
#error "SM90_TILE_THREADS must be a multiple of 32, at most 1024"
#endif

#if defined(SM90_EPILOGUE_ROW_SCALE) && (defined(SM90_EPILOGUE_ACT) || defined(SM90_GATHER_A))
#error "SM90_EPILOGUE_ROW_SCALE is GEMM 2's epilogue: not with SM90_EPILOGUE_ACT or SM90_GATHER_A"
#endif

#define SM90_MATH_WARPGROUPS 2
// Set in a posted tile whose rows all lie in the first math warpgroup's half
// (at most SM90_BLOCK_M / 2 rows of its group): bit 61, above any tile index.
#define SM90_THIN_TILE (1LL << 61)
// Set in a posted tile (thin tiles) for its second pass of 64 rows: bit 62.
#define SM90_SECOND_PASS (1LL << 62)
// One pass of the math warpgroups: SM90_TILE_M rows, SM90_WG_N columns each.
#if SM90_THIN
#define SM90_TILE_M 64
#define SM90_WG_N (SM90_BLOCK_N / 2)
#else
#define SM90_TILE_M SM90_BLOCK_M
#define SM90_WG_N SM90_BLOCK_N
#endif
#ifdef SM90_GATHER_A
// full[s]: the TMA thread's arrive.expect_tx (b) and one cp.async arrival per load thread (a).
#define SM90_FULL_ARRIVALS (1 + 128)
// Readers of the tile mailboxes: the math threads and the load threads but the one posting.
#define SM90_MAIL_READERS (128 * SM90_MATH_WARPGROUPS + 127)
#define SM90_GATHER_PARAMS(T) \
    , const T *__restrict__ gather_x, const int *__restrict__ gather_src, int gather_top_k, int gather_x_rows
#define SM90_GATHER_ARGS , gather_x, gather_src, gather_top_k, gather_x_rows
#else
#define SM90_FULL_ARRIVALS 1
#define SM90_MAIL_READERS (128 * SM90_MATH_WARPGROUPS)
#define SM90_GATHER_PARAMS(T)
#define SM90_GATHER_ARGS
#endif
#ifdef SM90_EPILOGUE_ROW_SCALE
#define SM90_ROW_SCALE_PARAMS , const float *__restrict__ row_scale
#define SM90_ROW_SCALE_ARGS , row_scale
#else
#define SM90_ROW_SCALE_PARAMS
#define SM90_ROW_SCALE_ARGS
#endif
#define SM90_THREADS (128 * (1 + SM90_MATH_WARPGROUPS))
#define SM90_A_STAGE_ELEMS (SM90_TILE_M * SM90_BLOCK_K)
#define SM90_B_STAGE_ELEMS (SM90_BLOCK_N * SM90_BLOCK_K)
// A stage's fold rows (SM90_FOLD_ROWS): after all stages of a and of b.
#define SM90_FOLD_STAGE_ELEMS (SM90_FOLD_ROWS * SM90_BLOCK_K)
#define SM90_STAGE_BYTES ((SM90_A_STAGE_ELEMS + SM90_B_STAGE_ELEMS + SM90_FOLD_STAGE_ELEMS) * 2)
// Set in a posted tile that also computes its group's fold (SM90_FOLD_ROWS): bit 60.
#define SM90_FOLD_TILE (1LL << 60)
#define SM90_A_BOX_ELEMS (SM90_A_BOX_ROWS * SM90_BLOCK_K)
// Columns of N in one box of an N-major (nn) B tile: 64 16-bit elements, the
// 128 bytes that the 128-byte swizzle permutes within.
#define SM90_B_SPAN 64
#define SM90_B_BOX_ELEMS (SM90_BLOCK_K * SM90_B_SPAN)
// The store's staging area, one per math warpgroup, after the ring: 64 rows
// of 64 columns at a pitch of SM90_C_PITCH = 72 elements (sm90.cuh; 144
// bytes: 16-byte chunks stay aligned, and rows fall 4 banks apart).

// Exclusive prefix sum of one 64-bit value per thread across the block
// (block_exclusive_scan of common.cuh for long long: the sizes' running sum
// before the cut at M may pass 2^31). Same calling rules; `scratch` is
// SCAN_SCRATCH_INTS long longs of shared memory.
__device__ __forceinline__ long long block_exclusive_scan_ll(long long v, long long* total, long long* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    long long inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const long long n = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += n;
    }
    __syncthreads();  // earlier readers of scratch are done
    if (lane == 31) scratch[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        const long long s = lane < nwarps ? scratch[lane] : 0;
        long long si = s;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const long long n = __shfl_up_sync(0xffffffffu, si, o);
            if (lane >= o) si += n;
        }
        if (lane < nwarps) scratch[lane] = si - s;  // exclusive offset of each warp
        if (lane == 31) scratch[32] = si;           // block total
    }
    __syncthreads();
    *total = scratch[32];
    return scratch[warp] + inc - v;
}

template <class S>
__device__ __forceinline__ void tile_offsets_impl(const S* __restrict__ sizes, int num_groups, int total_rows,
                                                  int capacity, int* __restrict__ row_offsets,
                                                  int* __restrict__ row_ends, int* __restrict__ tile_offsets,
                                                  int* __restrict__ tile_counters) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    __shared__ int scratch[SCAN_SCRATCH_INTS];
    __shared__ long long scratch_ll[SCAN_SCRATCH_INTS];
    const bool masked = capacity > 0;
    const long long rows_cap = total_rows > 0 ? total_rows : 0;  // M
    long long row_carry = 0;  // rows of every group before this pass, before the cut at M
    int tile_carry = 0;
    for (int base = 0; base < num_groups; base += SM90_TILE_THREADS) {
        const int g = base + threadIdx.x;
        const long long s = g < num_groups ? static_cast<long long>(sizes[g]) : 0;
        long long m = s > 0 ? s : 0;  // negative: 0
        if (masked) m = min(m, static_cast<long long>(capacity));
        int first;
        if (masked) {
            first = g * capacity;  // the launcher keeps E * C < 2^31
        } else {
            // group_sizes.cu's clamp, in place: each size at most M, then the
            // groups cut where their running sum (64-bit: no overflow) reaches M.
            m = min(m, rows_cap);
            long long pass_total;
            const long long before = row_carry + block_exclusive_scan_ll(m, &pass_total, scratch_ll);
            const long long lo = min(before, rows_cap), hi = min(before + m, rows_cap);
            first = static_cast<int>(lo);
            m = hi - lo;
            row_carry += pass_total;
        }
        int tiles_total;
        const int tiles_ex =
            block_exclusive_scan(static_cast<int>((m + SM90_BLOCK_M - 1) / SM90_BLOCK_M), &tiles_total, scratch);
        if (g < num_groups) {
            row_offsets[g] = first;
            row_ends[g] = first + static_cast<int>(m);
            tile_offsets[g] = tile_carry + tiles_ex;
        }
        tile_carry += tiles_total;
    }
    if (threadIdx.x == 0) {
        row_offsets[num_groups] = masked ? num_groups * capacity : static_cast<int>(min(row_carry, rows_cap));
        tile_offsets[num_groups] = tile_carry;
        // The two GEMMs launched next on this stream hand out tiles from 0:
        // the first from tile_counters[0], the second (a layer's GEMM 2 over
        // the same sizes) from tile_counters[1], with no second scan.
        tile_counters[0] = 0;
        tile_counters[1] = 0;
    }
}

extern "C" __global__ void __launch_bounds__(SM90_TILE_THREADS)
    grouped_tile_offsets(const int* __restrict__ sizes, int num_groups, int total_rows, int capacity,
                         int* __restrict__ row_offsets, int* __restrict__ row_ends,
                         int* __restrict__ tile_offsets, int* __restrict__ tile_counters) {
    tile_offsets_impl<int>(sizes, num_groups, total_rows, capacity, row_offsets, row_ends, tile_offsets,
                           tile_counters);
}

extern "C" __global__ void __launch_bounds__(SM90_TILE_THREADS)
    grouped_tile_offsets_i64(const long long* __restrict__ sizes, int num_groups, int total_rows, int capacity,
                             int* __restrict__ row_offsets, int* __restrict__ row_ends,
                             int* __restrict__ tile_offsets, int* __restrict__ tile_counters) {
    tile_offsets_impl<long long>(sizes, num_groups, total_rows, capacity, row_offsets, row_ends, tile_offsets,
                                 tile_counters);
}

// The descriptor of an N-major (MN-major) B tile with the 128-byte swizzle:
// boxes of SM90_BLOCK_K K-rows by 64 N-columns (one 128-byte swizzled row per
// K row), box after box. For MN-major swizzled layouts PTX defines the leading
// byte offset as the step between 64-column spans of N (one box: 8 KiB, >> 4:
// 512) and the stride byte offset as the step between groups of 8 K rows
// (8 rows of 128 bytes: 1024, >> 4: 64).
__device__ __forceinline__ unsigned long long smem_descriptor_n_major(const void* tile) {
    const unsigned long long address = shared_address(tile);
    return ((address & 0x3FFFF) >> 4) | (static_cast<unsigned long long>(SM90_B_BOX_ELEMS * 2 / 16) << 16) |
           (64ull << 32) | (1ull << 62);
}

// D[64 x 256] += A[64 x 16] B[16 x 256], A K-major in shared memory, B K-major
// (TRANS_B = 0: stored as B^T, [256 x 16]) or N-major (TRANS_B = 1, wgmma's
// imm-trans-b; 16-bit types only).
// Accumulator layout (PTX, wgmma .m64nNk16 D fragment): thread t holds rows
// 16 * (t / 32) + (t % 32) / 4 and that + 8, columns 8 * j + 2 * (t % 4) and
// that + 1: d[4j] (row, col), d[4j + 1] (row, col + 1), d[4j + 2] (row + 8,
// col), d[4j + 3] (row + 8, col + 1), for j = 0 .. 31.
// One wrapper per element type (TAG selects it in the template below; TYPES
// is the PTX type pair of A and B).
#define SM90_WGMMA_M64N256K16(TAG, TYPES)                                                                                      \
    template <int TRANS_B>                                                                                                     \
    __device__ __forceinline__ void wgmma_m64n256k16(TAG, float (&d)[128], unsigned long long desc_a,                          \
                                                     unsigned long long desc_b, int scale_d) {                                 \
        asm volatile(                                                                                                          \
            "{\n"                                                                                                              \
            ".reg .pred p;\n"                                                                                                  \
            "setp.ne.b32 p, %130, 0;\n"                                                                                        \
            "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPES " "                                                           \
            "{"                                                                                                                \
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                           \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                                 \
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                                 \
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                                 \
            "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                                 \
            "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                                 \
            "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "                     \
            "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"                   \
            "}, %128, %129, p, 1, 1, 0, %131;\n"                                                                                \
            "}\n"                                                                                                              \
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                  \
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),            \
              "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),          \
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),          \
              "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),          \
              "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),          \
              "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),          \
              "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),          \
              "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),          \
              "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),          \
              "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),          \
              "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),          \
              "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),      \
              "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),  \
              "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),  \
              "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])   \
            : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));                                                          \
    }

SM90_WGMMA_M64N256K16(bf16_t, "bf16.bf16")
SM90_WGMMA_M64N256K16(f16_t, "f16.f16")

// The same for 128-column tiles (SM90_BLOCK_N = 128): D is [64 x 128], 64
// registers per thread, j = 0 .. 15 in the layout above.
#define SM90_WGMMA_M64N128K16(TAG, TYPES)                                                                     \
    template <int TRANS_B>                                                                                    \
    __device__ __forceinline__ void wgmma_m64n128k16(TAG, float (&d)[64], unsigned long long desc_a,          \
                                                     unsigned long long desc_b, int scale_d) {                \
        asm volatile(                                                                                         \
            "{\n"                                                                                             \
            ".reg .pred p;\n"                                                                                 \
            "setp.ne.b32 p, %66, 0;\n"                                                                        \
            "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPES " "                                          \
            "{"                                                                                               \
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                          \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                \
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                \
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                  \
            "}, %64, %65, p, 1, 1, 0, %67;\n"                                                                 \
            "}\n"                                                                                             \
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),        \
              "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),      \
              "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),      \
              "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),      \
              "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),      \
              "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),      \
              "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),      \
              "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])       \
            : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));                                         \
    }

SM90_WGMMA_M64N128K16(bf16_t, "bf16.bf16")
SM90_WGMMA_M64N128K16(f16_t, "f16.f16")

// The fold's swapped product (SM90_FOLD_ROWS): D[64 x 16] += A[64 x 16] B[16 x 16],
// A = 64 columns of the tile's b stage (K-major, or N-major with TRANS_A = 1,
// wgmma's imm-trans-a), B = the fold's 16 rows of a (K-major). D row i is
// the tile column, D column j the fold's row j (the layout above, j = 0 .. 1).
#define SM90_WGMMA_M64N16K16(TAG, TYPES)                                                                     \
    template <int TRANS_A>                                                                                   \
    __device__ __forceinline__ void wgmma_m64n16k16(TAG, float (&d)[8], unsigned long long desc_a,           \
                                                    unsigned long long desc_b) {                             \
        asm volatile(                                                                                        \
            "{\n"                                                                                            \
            ".reg .pred p;\n"                                                                                \
            "setp.ne.b32 p, %10, 0;\n"                                                                       \
            "wgmma.mma_async.sync.aligned.m64n16k16.f32." TYPES " "                                          \
            "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, 0;\n"                                  \
            "}\n"                                                                                            \
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
            : "l"(desc_a), "l"(desc_b), "r"(1), "n"(TRANS_A));                                               \
    }

SM90_WGMMA_M64N16K16(bf16_t, "bf16.bf16")
SM90_WGMMA_M64N16K16(f16_t, "f16.f16")

// The fold's blocks a math thread stores (SM90_FOLD_ROWS): with the gated
// epilogue one (gate and up of the same outputs make one), else two.
#ifdef SM90_EPILOGUE_ACT
#define SM90_FOLD_BLOCKS 1
#else
#define SM90_FOLD_BLOCKS 2
#endif

// A math warpgroup's MMA for one 16-deep K step, by its width.
template <int TRANS_B, class T>
__device__ __forceinline__ void wgmma_tile(T tag, float (&d)[SM90_WG_N / 2], unsigned long long desc_a,
                                           unsigned long long desc_b) {
#if SM90_WG_N == 256
    wgmma_m64n256k16<TRANS_B>(tag, d, desc_a, desc_b, 1);
#else
    wgmma_m64n128k16<TRANS_B>(tag, d, desc_a, desc_b, 1);
#endif
}

// One tile of the schedule: its group, rows, columns and what its loads need.
struct Sm90Tile {
    int g;             // group
    int row0;          // first row of the tile (in a and out)
    int row_end;       // rows from row_end on are not this group's: never stored
    int n0;            // first column
    int a_rows;        // rows of the group from row0 on, at most SM90_TILE_M (what a's loads need)
    int b_boxes;       // [E, K, N] weights: 64-column boxes that hold columns of N
    unsigned stage_bytes;  // bytes one stage of this tile receives
    int fold_rows;     // SM90_FOLD_ROWS: the group's rows after this tile's SM90_BLOCK_M that it computes too (else 0)
    bool skip;         // SM90_FOLD_ROWS: a tail tile the tile before computed as its fold
};

// Whether a's stage is one box of SM90_BLOCK_M rows (tmap_a), else the small
// boxes holding the group's a_rows rows (tmap_a_rows): see the header.
__device__ __forceinline__ bool a_in_one_box(int a_rows) { return !SM90_THIN && a_rows > SM90_SMALL_A_ROWS; }

// Tile `tile` of the linearized schedule: group by group, and within a group
// the M tiles fastest, so that CTAs running together share B's column tiles
// and A's row tiles (one group's A rows and a band of B's columns fit in L2
// together); `second`: its second pass of 64 rows (thin tiles). The caller
// checked tile < tile_offsets[num_groups] * n_tiles.
template <bool N_MAJOR_B>
__device__ __forceinline__ Sm90Tile find_tile(long long tile, bool second, int n_tiles,
                                              const int* __restrict__ row_offsets,
                                              const int* __restrict__ row_ends,
                                              const int* __restrict__ tile_offsets, int num_groups, int M,
                                              int N) {
    const int tile_row = static_cast<int>(tile / n_tiles);  // which group's tiles: tile_offsets scale
    Sm90Tile t;
    t.g = sm90_find_group(tile_row, tile_offsets, num_groups);
    const int g = t.g;
    const int m_tiles = tile_offsets[g + 1] - tile_offsets[g];
    const long long local = tile - static_cast<long long>(tile_offsets[g]) * n_tiles;
    const int m_tile = static_cast<int>(local % m_tiles);
    const int n_tile = static_cast<int>(local / m_tiles);
    t.row0 = row_offsets[g] + m_tile * SM90_BLOCK_M + (second ? SM90_TILE_M : 0);
    t.row_end = min(row_ends[g], M);
    t.n0 = n_tile * SM90_BLOCK_N;
    const int n0 = t.n0;
    // [E, K, N] weights: the 64-column boxes that hold columns of N (the last
    // tile may need fewer than 4); the stage's byte count follows. Boxes wholly
    // past N are not loaded: their columns of the tile are never stored, and
    // each output column reads only its own column of B.
    const int b_boxes = min(SM90_BLOCK_N / SM90_B_SPAN, (N - n0 + SM90_B_SPAN - 1) / SM90_B_SPAN);
    t.b_boxes = b_boxes;
    // a: one whole box, or the small boxes holding the group's rows (see the
    // header). row0 < row_end unless the sizes overrun M (then no row of the
    // tile is stored, and none is loaded).
    const int a_rows = min(SM90_TILE_M, t.row_end - t.row0);
    t.a_rows = a_rows;
    const int a_elems = a_in_one_box(a_rows) ? SM90_A_STAGE_ELEMS
                        : a_rows > 0              ? (a_rows + SM90_A_BOX_ROWS - 1) / SM90_A_BOX_ROWS * SM90_A_BOX_ELEMS
                                                  : 0;
    t.stage_bytes = (a_elems + (N_MAJOR_B ? b_boxes * SM90_B_BOX_ELEMS : SM90_B_STAGE_ELEMS)) * 2;
    t.fold_rows = 0;
    t.skip = false;
#if SM90_FOLD_ROWS
    // v15: the group ends 1 .. SM90_FOLD_ROWS rows past this tile's last row:
    // this tile computes them; the next tile of the group (those rows alone)
    // is skipped. Both decided from the rows, so the two agree.
    const int rows_left = t.row_end - t.row0;
    if (rows_left > SM90_BLOCK_M && rows_left <= SM90_BLOCK_M + SM90_FOLD_ROWS) {
        t.fold_rows = rows_left - SM90_BLOCK_M;
        t.stage_bytes += SM90_FOLD_STAGE_ELEMS * 2;
    }
    t.skip = m_tile > 0 && rows_left > 0 && rows_left <= SM90_FOLD_ROWS;
#endif
    return t;
}

#ifdef SM90_GATHER_A
// The load warpgroup of the gathered-a kernels (all 128 threads; see "Gathered
// a" in the header): the same tiles, stages and phases as the one TMA thread
// of the plain kernels, a's rows copied by cp.async. Thread 0 takes the tiles
// and posts them; the others read each from the mailboxes.
template <class T, bool N_MAJOR_B>
__device__ __forceinline__ void sm90_gather_loads(T* sa, T* sb, unsigned long long* full, unsigned long long* empty,
                                                  Sm90Mailboxes* mail, const TmaMap* tmap_b,
                                                  const int* __restrict__ row_offsets,
                                                  const int* __restrict__ row_ends,
                                                  const int* __restrict__ tile_offsets,
                                                  int* __restrict__ tile_counter, int num_groups, int M, int N,
                                                  int K, long long total_tiles, int n_tiles, int num_k,
                                                  const T* __restrict__ gather_x,
                                                  const int* __restrict__ gather_src, int gather_top_k,
                                                  int gather_x_rows) {
    const int tid = threadIdx.x;  // 0 .. 127
    const int chunk = tid & 7;    // this thread's 16-byte chunk of each of its rows
    const int row_in = tid >> 3;  // its rows: row_in + 16 * i, i = 0 .. 7
    constexpr int ROWS = SM90_BLOCK_M / 16;
    // Where the chunk lands in row_in's 128 bytes; rows 16 apart share the
    // atom row (row & 7), so the same swizzled offset + 2 KiB per i.
    const unsigned dst_in = swizzle_128b_offset(row_in, chunk);
    unsigned fills = 0;
    long long tile = blockIdx.x;
    for (unsigned j = 0;; ++j) {
        if (tid == 0) {
            if (tile >= total_tiles) tile = -1;
            sm90_mailbox_publish(mail, j, tile);
            if (tile < 0) allow_next_grid();  // this CTA's last loads are issued
        } else {
            tile = sm90_mailbox_take(mail, j);
        }
        if (tile < 0) break;
        const Sm90Tile t =
            find_tile<N_MAJOR_B>(tile, false, n_tiles, row_offsets, row_ends, tile_offsets, num_groups, M, N);
        // Each of this thread's rows: -2 not the group's (not written), -1 a
        // zero row, else the token whose row it copies.
        int token[ROWS];
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const int row = t.row0 + row_in + 16 * i;
            token[i] = -2;
            if (row < t.row_end) {
                const int p = gather_src[row];
                const int x_row = p >= 0 ? p / gather_top_k : -1;
                token[i] = x_row < gather_x_rows ? x_row : -1;
            }
        }
        // b's bytes only: a's arrive through the copiers' cp.async arrivals.
        const unsigned b_bytes = (N_MAJOR_B ? t.b_boxes * SM90_B_BOX_ELEMS : SM90_B_STAGE_ELEMS) * 2;
        for (int kt = 0; kt < num_k; ++kt) {
            const unsigned f = fills + kt;
            const int s = f % SM90_STAGES;
            mbarrier_wait(&empty[s], ((f / SM90_STAGES) & 1) ^ 1);
            if (tid == 0) {
                mbarrier_expect_bytes(&full[s], b_bytes);
                if (N_MAJOR_B) {
                    for (int jb = 0; jb < t.b_boxes; ++jb) {
                        tma_load_3d(sb + s * SM90_B_STAGE_ELEMS + jb * SM90_B_BOX_ELEMS, tmap_b, &full[s],
                                    t.n0 + jb * SM90_B_SPAN, kt * SM90_BLOCK_K, t.g);
                    }
                } else {
                    tma_load_2d(sb + s * SM90_B_STAGE_ELEMS, tmap_b, &full[s], kt * SM90_BLOCK_K, t.g * N + t.n0);
                }
            }
            const int col = kt * SM90_BLOCK_K + 8 * chunk;  // K % 8 == 0: a chunk is all in or all out
            const unsigned dst = shared_address(sa + s * SM90_A_STAGE_ELEMS) + dst_in;
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                if (token[i] == -2) continue;
                const bool real = token[i] >= 0 && col < K;
                const T* src = real ? gather_x + static_cast<long long>(token[i]) * K + col : gather_x;
                cp_async_16(dst + i * 16 * 128, src, real ? 16u : 0u);
            }
            cp_async_arrive_noinc(&full[s]);
        }
        fills += num_k;
        if (tid == 0) tile = static_cast<long long>(gridDim.x) + atomicAdd(tile_counter, 1);
    }
    cp_async_wait_all();  // no copy outlives its thread
}
#endif

// One tile's walk over its K stages on a math warpgroup (`half`: 0 or 1):
// each stage's MMAs into acc, and with FOLD (v15) the fold's swapped product
// into fold_acc beside them, each stage released once its MMAs are done but
// the last, whose MMAs are left in flight (the caller finds the next tile
// while they run, then waits). The kernel runs one of two whole loops per
// tile, never a branch around the fold's wgmmas inside one (ptxas would
// serialize every wgmma of a loop with one in a divergent path: note C7520),
// and waits inside each branch, so that no MMA is in flight where the two
// join (ptxas serialized every wgmma there: note C7515).
template <bool FOLD, bool N_MAJOR_B, class T>
__device__ __forceinline__ void sm90_k_walk(float (&acc)[SM90_WG_N / 2], float (&fold_acc)[2][8], const T* sa,
                                            const T* sb, const T* sf, unsigned long long* full,
                                            unsigned long long* empty, unsigned fills, int num_k, int row_in,
                                            int col_in, int half) {
#ifdef SM90_GATHER_A
    // The plain kernels' unrolling (ptxas chose 4 there; the fence below made it choose 2 here).
#pragma unroll 4
#endif
    for (int kt = 0; kt < num_k; ++kt) {
        const unsigned f = fills + kt;
        const int s = f % SM90_STAGES;
        mbarrier_wait(&full[s], (f / SM90_STAGES) & 1);
#ifdef SM90_GATHER_A
        fence_proxy_async_shared();  // a's rows came by cp.async (generic proxy); wgmma reads them as async
#endif
        // This warpgroup's 64 rows of a (row_in rows of 128 bytes further
        // down: 8 KiB, 1024-aligned) and its columns of b (thin tiles: 128
        // further, 16 KiB in both layouts: 128 K-major rows of 128 bytes,
        // or two N-major boxes of 8 KiB).
        const unsigned long long da = smem_descriptor(sa + s * SM90_A_STAGE_ELEMS + row_in * SM90_BLOCK_K);
        const T* b_stage = sb + s * SM90_B_STAGE_ELEMS + col_in * SM90_BLOCK_K;
        const unsigned long long db = N_MAJOR_B ? smem_descriptor_n_major(b_stage) : smem_descriptor(b_stage);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < SM90_BLOCK_K / 16; ++kk) {
            // A (and a K-major B): 16 K-elements are 32 bytes further along each
            // 128-byte row: +2 in the descriptor's address field (units of 16
            // bytes). An N-major B: 16 K-rows of 128 bytes further down: +128.
            if (N_MAJOR_B) {
                wgmma_tile<1>(T{}, acc, da + 2 * kk, db + 128 * kk);
            } else {
                wgmma_tile<0>(T{}, acc, da + 2 * kk, db + 2 * kk);
            }
        }
        if constexpr (FOLD) {
            // b's stage as wgmma's a: this warpgroup's two 64-column
            // blocks of the tile (half and half + 2: with the gated
            // epilogue the gate and up columns of the same outputs),
            // K-major rows of 128 bytes or N-major boxes of 64 columns.
            const T* b_all = sb + s * SM90_B_STAGE_ELEMS;
            const unsigned long long dfold = smem_descriptor(sf + s * SM90_FOLD_STAGE_ELEMS);
#pragma unroll
            for (int kk = 0; kk < SM90_BLOCK_K / 16; ++kk) {
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const int jb = half + 2 * q;
                    if (N_MAJOR_B) {
                        wgmma_m64n16k16<1>(T{}, fold_acc[q],
                                           smem_descriptor_n_major(b_all + jb * SM90_B_BOX_ELEMS) + 128 * kk,
                                           dfold + 2 * kk);
                    } else {
                        wgmma_m64n16k16<0>(T{}, fold_acc[q],
                                           smem_descriptor(b_all + jb * 64 * SM90_BLOCK_K) + 2 * kk,
                                           dfold + 2 * kk);
                    }
                }
            }
        }
        wgmma_commit();
        // The previous step's MMAs are done: its stage can be refilled while
        // this step's run.
        wgmma_wait<1>();
        if (kt > 0 && (threadIdx.x & 127) == 0) mbarrier_arrive(&empty[(f - 1) % SM90_STAGES]);
    }
}

// N_MAJOR_B: b is [E, K, N] (nn kernels), else [E, N, K] (nt kernels).
//
// Tiles are handed out at run time (v7): CTA x starts with tile x, and each
// further tile of a CTA is gridDim.x + the next value of *tile_counter (an
// atomic counter that grouped_tile_offsets zeroed just before), taken by the
// load thread when it is about to load that tile. So a CTA takes a new tile
// when it has room for it, wherever it is in the schedule: CTAs slowed by
// long groups or DRAM contention take fewer tiles, as the hardware's CTA
// scheduler balanced one-tile CTAs. A grid of one CTA per tile (the
// launcher's "per_tile" schedule, v5's) runs each CTA's loop once; a grid of
// one CTA per SM ("persistent") walks many tiles per CTA through one ring:
// the load thread runs on into the next tile's stages while the math
// warpgroups store the current tile.
//
// The load thread tells the math warpgroups which tile comes next through
// sm90.cuh's mailboxes (Sm90Mailboxes): slot j % SM90_SCHED_SLOTS holds the
// CTA's j-th tile (or -1: no more tiles), freed when all 256 math threads
// have read it.
//
// The stage ring across tiles: every thread role counts the stages it has
// filled (or consumed) since the CTA began, `fills`, carried from tile to
// tile; fill f uses stage f % SM90_STAGES in its (f / SM90_STAGES)-th round,
// whose mbarrier phase parity is that round's parity. Every fill is released
// exactly once (the last stage of a tile too, after its MMAs), so the load
// thread and the math warpgroups agree on every phase whatever the tile
// count and K.
template <class T, bool N_MAJOR_B>
__device__ __forceinline__ void grouped_gemm_impl(const TmaMap* tmap_a, const TmaMap* tmap_a_rows,
                                                     const TmaMap* tmap_b,
                                                     const int* __restrict__ row_offsets,
                                                     const int* __restrict__ row_ends,
                                                     const int* __restrict__ tile_offsets,
                                                     int* __restrict__ tile_counter, int num_groups, int M, int N,
                                                     int K, T* __restrict__ out,
                                                     const T* __restrict__ bias SM90_GATHER_PARAMS(T)
                                                         SM90_ROW_SCALE_PARAMS) {
    // Before anything an earlier kernel writes (the schedule, a): the step's
    // launches may overlap (common.cuh). The next kernel may start once each
    // CTA's load thread has run out of tiles (allow_next_grid below): its
    // blocks then take the SMs this GEMM's CTAs leave, during the last tiles.
    // With SM90_PREFETCH_B the schedule is older than the previous kernel:
    // the wait comes after the first tile's weights are asked for (below).
#if !SM90_PREFETCH_B
    wait_for_previous_grid();
#endif
    extern __shared__ unsigned char smem_raw[];
    // full[s]: stage s holds data (one arrival with the TMA byte count);
    // empty[s]: both math warpgroups are done reading it (one arrival each).
    __shared__ __align__(8) unsigned long long full[SM90_STAGES];
    __shared__ __align__(8) unsigned long long empty[SM90_STAGES];
    // The tile mailboxes (see above): read by every math thread.
    __shared__ __align__(8) Sm90Mailboxes mail;

    const int n_tiles = (N + SM90_BLOCK_N - 1) / SM90_BLOCK_N;
    const long long total_tiles = static_cast<long long>(tile_offsets[num_groups]) * n_tiles;
    if (static_cast<long long>(blockIdx.x) >= total_tiles) return;  // the whole block: before any barrier
    const int num_k = (K + SM90_BLOCK_K - 1) / SM90_BLOCK_K;

    // The ring starts on a 1024-byte boundary of the shared window: the
    // 128-byte swizzle repeats every 8 rows of 128 bytes.
    unsigned char* ring = smem_raw + ((1024 - (shared_address(smem_raw) & 1023)) & 1023);
    T* sa = reinterpret_cast<T*>(ring);
    T* sb = reinterpret_cast<T*>(ring + SM90_STAGES * SM90_A_STAGE_ELEMS * 2);
    // The fold's rows (SM90_FOLD_ROWS; 16 rows of 128 bytes, 2 KiB a stage: 1024-aligned).
    T* sf = reinterpret_cast<T*>(ring + SM90_STAGES * (SM90_A_STAGE_ELEMS + SM90_B_STAGE_ELEMS) * 2);

    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < SM90_STAGES; ++s) {
            mbarrier_init(&full[s], SM90_FULL_ARRIVALS);
            mbarrier_init(&empty[s], SM90_MATH_WARPGROUPS);
        }
        sm90_mailboxes_init(&mail, SM90_MAIL_READERS);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    // The schedule in shared memory (v14) where it fits, after the staging
    // areas: tile_offsets [E + 1], row_offsets [E], row_ends [E]. Each tile's
    // search (find_tile: a binary search over tile_offsets, then its group's
    // rows) then waits on shared memory, not on 8-10 dependent L2 loads
    // (about 3 us per tile at decode, measured as the gap between tiles).
    if (num_groups <= SM90_TABLE_MAX_GROUPS) {
        int* table = reinterpret_cast<int*>(ring + SM90_STAGES * SM90_STAGE_BYTES + 2 * SM90_C_STAGE_ELEMS * 2);
        for (int i = threadIdx.x; i <= num_groups; i += SM90_THREADS) table[i] = tile_offsets[i];
        for (int i = threadIdx.x; i < num_groups; i += SM90_THREADS) {
            table[num_groups + 1 + i] = row_offsets[i];
            table[2 * num_groups + 1 + i] = row_ends[i];
        }
        tile_offsets = table;
        row_offsets = table + num_groups + 1;
        row_ends = table + 2 * num_groups + 1;
    }
    __syncthreads();  // the last block-wide barrier: the roles split below
#if SM90_PREFETCH_B
    // The first tile's first SM90_STAGES stages of b into L2 while the
    // previous kernel (the activation) and the one before it (GEMM 1's last
    // tiles) still run: the weights are constant and the schedule was
    // complete before the previous kernel started, so nothing read here can
    // change; everything else waits.
    if (threadIdx.x == 0) {
        const Sm90Tile t =
            find_tile<N_MAJOR_B>(blockIdx.x, false, n_tiles, row_offsets, row_ends, tile_offsets, num_groups, M, N);
        for (int kt = 0; kt < min(num_k, SM90_STAGES); ++kt) {
            if (N_MAJOR_B) {
                for (int jb = 0; jb < t.b_boxes; ++jb) tma_prefetch_3d(tmap_b, t.n0 + jb * SM90_B_SPAN, kt * SM90_BLOCK_K, t.g);
            } else {
                tma_prefetch_2d(tmap_b, kt * SM90_BLOCK_K, t.g * N + t.n0);
            }
        }
    }
    wait_for_previous_grid();
#endif

    const int warpgroup = threadIdx.x / 128;
#ifdef SM90_GATHER_A
    if (warpgroup == 0) {
        sm90_gather_loads<T, N_MAJOR_B>(sa, sb, full, empty, &mail, tmap_b, row_offsets, row_ends, tile_offsets,
                                        tile_counter, num_groups, M, N, K, total_tiles, n_tiles, num_k,
                                        gather_x, gather_src, gather_top_k, gather_x_rows);
        return;
    }
#endif
    if (warpgroup == 0) {
#if SM90_FOLD_ROWS
        // The fold's 16 accumulators a math thread are paid for by the load
        // warpgroup: 128 x 40 + 256 x 232 = 64,512 of the SM's 65,536.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
#endif
        // Loads: one thread fills each stage once both math warpgroups freed
        // it. A fresh barrier counts as having completed the phase before
        // phase 0, so the first pass over the ring (and over the mailboxes)
        // does not wait.
        if (threadIdx.x == 0) {
            unsigned fills = 0;
            long long tile = blockIdx.x;
            // Thin tiles: a schedule tile with more than 64 of its group's
            // rows runs as two work items (j), `second` marking the second.
            bool second = false;
            for (unsigned j = 0;; ++j) {
                bool done = !second && tile >= total_tiles;
                Sm90Tile t;
                if (!done) {
                    t = find_tile<N_MAJOR_B>(tile, second, n_tiles, row_offsets, row_ends, tile_offsets, num_groups,
                                             M, N);
                }
#if SM90_FOLD_ROWS
                // A tail tile whose rows the tile before computed (its fold):
                // nothing to load or post; the next tile instead.
                while (!done && t.skip) {
                    tile = static_cast<long long>(gridDim.x) + atomicAdd(tile_counter, 1);
                    done = tile >= total_tiles;
                    if (!done) {
                        t = find_tile<N_MAJOR_B>(tile, false, n_tiles, row_offsets, row_ends, tile_offsets,
                                                 num_groups, M, N);
                    }
                }
#endif
                if (done) {
                    sm90_mailbox_publish(&mail, j, -1);
                    allow_next_grid();  // this CTA's last loads are issued
                    break;
                }
#if SM90_THIN
                const bool more = !second && t.row_end - t.row0 > SM90_TILE_M;
                sm90_mailbox_publish(&mail, j, second ? tile | SM90_SECOND_PASS : tile);
#else
                // Posted after the search, marked when the second math
                // warpgroup's rows are all past the group's end (a thin tile).
                const bool more = false;
                sm90_mailbox_publish(&mail, j,
                                     (t.a_rows > SM90_BLOCK_M / 2 ? tile : tile | SM90_THIN_TILE) |
                                         (t.fold_rows > 0 ? SM90_FOLD_TILE : 0));
#endif
                const int g = t.g, n0 = t.n0, row0 = t.row0, a_rows = t.a_rows, b_boxes = t.b_boxes;
                const bool fold = t.fold_rows > 0;
                const int b_row0 = g * N + n0;
                // The next tile is taken SM90_STAGES stages before this one's
                // last loads (v14): the atomic's result is first read after
                // them, so its latency hides behind their waits for free
                // stages. Not before a second pass (the same tile again).
                const int take_at = more ? -1 : num_k > SM90_STAGES ? num_k - SM90_STAGES : 0;
                long long next = tile;
                for (int kt = 0; kt < num_k; ++kt) {
                    if (kt == take_at) next = static_cast<long long>(gridDim.x) + atomicAdd(tile_counter, 1);
                    const unsigned f = fills + kt;
                    const int s = f % SM90_STAGES;
                    const int k0 = kt * SM90_BLOCK_K;  // the stage's K columns (a and b alike)
                    mbarrier_wait(&empty[s], ((f / SM90_STAGES) & 1) ^ 1);
                    mbarrier_expect_bytes(&full[s], t.stage_bytes);
                    if (a_in_one_box(a_rows)) {
                        tma_load_2d(sa + s * SM90_A_STAGE_ELEMS, tmap_a, &full[s], k0, row0);
                    } else {
                        for (int ra = 0; ra < a_rows; ra += SM90_A_BOX_ROWS) {
                            tma_load_2d(sa + s * SM90_A_STAGE_ELEMS + ra * SM90_BLOCK_K, tmap_a_rows, &full[s],
                                        k0, row0 + ra);
                        }
                    }
                    if (N_MAJOR_B) {
                        for (int jb = 0; jb < b_boxes; ++jb) {
                            tma_load_3d(sb + s * SM90_B_STAGE_ELEMS + jb * SM90_B_BOX_ELEMS, tmap_b, &full[s],
                                        n0 + jb * SM90_B_SPAN, k0, g);
                        }
                    } else {
                        tma_load_2d(sb + s * SM90_B_STAGE_ELEMS, tmap_b, &full[s], k0, b_row0);
                    }
                    // The fold's rows: one small box (its rows past the group's
                    // end are multiplied, never stored).
                    if (SM90_FOLD_ROWS && fold) {
                        tma_load_2d(sf + s * SM90_FOLD_STAGE_ELEMS, tmap_a_rows, &full[s], k0, row0 + SM90_BLOCK_M);
                    }
                }
                fills += num_k;
                tile = next;
                second = more;
            }
        }
        return;
    }

    // Math warpgroup w (1 or 2) multiplies rows 64 * (w - 1) .. + 63 of each
    // tile, or (thin tiles) columns 128 * (w - 1) .. + 127 of its 64 rows.
#if SM90_FOLD_ROWS
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
#endif
    const int half = warpgroup - 1;
#if SM90_THIN
    const int row_in = 0, col_in = half * SM90_WG_N;  // this warpgroup's rows and columns in the tile
#else
    const int row_in = half * 64, col_in = 0;
#endif
    const int warp = (threadIdx.x & 127) >> 5, lane = threadIdx.x & 31;
    float acc[SM90_WG_N / 2];
    float fold_acc[2][8];  // SM90_FOLD_ROWS: the fold's two 64 x 16 blocks (columns half, half + 2)
    unsigned fills = 0;
    for (unsigned j = 0;; ++j) {
        const long long word = sm90_mailbox_take(&mail, j);
        if (word < 0) break;
        const long long tile = word & ~(SM90_THIN_TILE | SM90_SECOND_PASS | SM90_FOLD_TILE);
        const bool second = (word & SM90_SECOND_PASS) != 0;
#if defined(SM90_SKIP_IDLE) && SM90_SKIP_IDLE
        if (half == 1 && (word & SM90_THIN_TILE) != 0) {
            // A thin tile (v12): this warpgroup's 64 rows hold none of the
            // group's, so it runs no MMAs and stores nothing, and the other
            // warpgroup has the tensor cores to itself. It still releases
            // each stage once the stage has filled (a stage freed before its
            // loads land could be refilled under them), the whole warpgroup
            // past each wait before the release, so that no thread falls a
            // phase behind the barrier it waits on.
            for (int kt = 0; kt < num_k; ++kt) {
                const unsigned f = fills + kt;
                mbarrier_wait(&full[f % SM90_STAGES], (f / SM90_STAGES) & 1);
                named_barrier_sync(1 + half);
                if ((threadIdx.x & 127) == 0) mbarrier_arrive(&empty[f % SM90_STAGES]);
            }
            fills += num_k;
            continue;
        }
#endif
#pragma unroll
        for (int i = 0; i < SM90_WG_N / 2; ++i) acc[i] = 0.0f;
#if SM90_FOLD_ROWS
        const bool fold = (word & SM90_FOLD_TILE) != 0;
#endif
        // The walk, then where this tile goes, found while the last stage's
        // MMAs run (the search's loads wait on nothing the tensor cores do),
        // then the wait for them (see sm90_k_walk).
#if SM90_FOLD_ROWS
        Sm90Tile t;
        if (fold) {
#pragma unroll
            for (int q = 0; q < 2; ++q) {
#pragma unroll
                for (int i = 0; i < 8; ++i) fold_acc[q][i] = 0.0f;
            }
            sm90_k_walk<true, N_MAJOR_B>(acc, fold_acc, sa, sb, sf, full, empty, fills, num_k, row_in, col_in, half);
            t = find_tile<N_MAJOR_B>(tile, second, n_tiles, row_offsets, row_ends, tile_offsets, num_groups, M, N);
            wgmma_wait<0>();
        } else {
            sm90_k_walk<false, N_MAJOR_B>(acc, fold_acc, sa, sb, sf, full, empty, fills, num_k, row_in, col_in, half);
            t = find_tile<N_MAJOR_B>(tile, second, n_tiles, row_offsets, row_ends, tile_offsets, num_groups, M, N);
            wgmma_wait<0>();
        }
#else
        sm90_k_walk<false, N_MAJOR_B>(acc, fold_acc, sa, sb, sf, full, empty, fills, num_k, row_in, col_in, half);
        const Sm90Tile t =
            find_tile<N_MAJOR_B>(tile, second, n_tiles, row_offsets, row_ends, tile_offsets, num_groups, M, N);
        wgmma_wait<0>();
#endif
        // The tile's last stage is read: free it now, so the load thread fills
        // it with the next tile's data while this tile is stored.
        if ((threadIdx.x & 127) == 0) mbarrier_arrive(&empty[(fills + num_k - 1) % SM90_STAGES]);
        fills += num_k;

        // The store, 64 columns at a time (v8): each thread writes its
        // accumulator pairs into this warpgroup's staging area (64 rows, a
        // padded pitch: the 8 rows one warp writes at once fall in 8 different
        // bank quads), the warpgroup syncs, and each thread copies 16-byte
        // chunks of whole rows out, so a warp writes 4 full 128-byte lines per
        // instruction (from registers directly, it wrote 8 half-filled sectors).
        // Rows past the group's end and columns past the output's width are not stored.
        //
        // With SM90_EPILOGUE_ACT (v9) the tile's columns [0, 128) are the gate
        // and [128, 256) the up projection of the same 128 output columns (the
        // first GEMM's weights packed in blocks of 128, see the header), so each
        // thread holds both halves of each of its columns, acc[i] and acc[i + 64],
        // and stores act(gate + b) * (up + b): the output is [M, N / 2].
#ifdef SM90_EPILOGUE_ACT
        const int out_n = N / 2;
        const int c_tile = t.n0 / 2;
        const int passes = 2;
        const T* bias_g = bias != nullptr ? bias + static_cast<long long>(t.g) * N : nullptr;  // [E, 2I]: gate | up
#else
        const int out_n = N;
        const int c_tile = t.n0 + col_in;
        const int passes = SM90_WG_N / 64;
#endif
#ifdef SM90_EPILOGUE_ROW_SCALE
        const T* bias_g = bias != nullptr ? bias + static_cast<long long>(t.g) * N : nullptr;  // [E, N]
        // The scales of this thread's two accumulator rows (warp * 16 + lane / 4,
        // and 8 below), read once per tile; rows past the group's end are never stored.
        float row_w[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = t.row0 + row_in + warp * 16 + (lane >> 2) + 8 * h;
            row_w[h] = r < t.row_end ? row_scale[r] : 0.0f;
        }
#endif
        T* stage = reinterpret_cast<T*>(ring + SM90_STAGES * SM90_STAGE_BYTES) + half * SM90_C_STAGE_ELEMS;
        const int tid = threadIdx.x & 127;
        const int row_end = t.row_end;
        const int r_first = t.row0 + row_in;  // this warpgroup's first row
        // All of this warpgroup's rows past the group's end (a thin tile): nothing
        // to store. Its MMAs still ran, on rows of the A stage no box refilled
        // (a branch around wgmma would make ptxas serialize every MMA: C7520).
        const bool idle = r_first >= row_end;
#pragma unroll
        for (int p = 0; p < passes; ++p) {
            const int c0 = c_tile + 64 * p;
            if (idle || c0 >= out_n) break;  // the same for the whole warpgroup
#pragma unroll
            for (int jc = 0; jc < 8; ++jc) {
#ifdef SM90_EPILOGUE_ROW_SCALE
                // b2 of this thread's two columns, read once for both of its rows
                // (the branch is the same for the whole warpgroup but at N's end).
                float bias0 = 0.0f, bias1 = 0.0f;
                const int bcol = c0 + 8 * jc + 2 * (lane & 3);  // even, and out_n is: both or neither in
                if (bias_g != nullptr && bcol < out_n) {
                    bias0 = to_float(bias_g[bcol]);
                    bias1 = to_float(bias_g[bcol + 1]);
                }
#endif
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = warp * 16 + (lane >> 2) + 8 * h;
                    const int i = 4 * (8 * p + jc) + 2 * h;
                    float v0 = acc[i], v1 = acc[i + 1];
#ifdef SM90_EPILOGUE_ACT
                    float u0 = acc[i + 64], u1 = acc[i + 65];
                    if (bias_g != nullptr) {
                        const int col = c0 + 8 * jc + 2 * (lane & 3);
                        v0 += to_float(bias_g[col]);
                        v1 += to_float(bias_g[col + 1]);
                        u0 += to_float(bias_g[out_n + col]);
                        u1 += to_float(bias_g[out_n + col + 1]);
                    }
                    v0 = SM90_ACT(v0, SM90_EPILOGUE_ACT) * u0;
                    v1 = SM90_ACT(v1, SM90_EPILOGUE_ACT) * u1;
#endif
#ifdef SM90_EPILOGUE_ROW_SCALE
                    v0 = (v0 + bias0) * row_w[h];
                    v1 = (v1 + bias1) * row_w[h];
#endif
                    *reinterpret_cast<unsigned*>(stage + r * SM90_C_PITCH + 8 * jc + 2 * (lane & 3)) =
                        pack_pair(T{}, v0, v1);
                }
            }
            named_barrier_sync(1 + half);  // this warpgroup's pairs are in the stage
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int chunk = tid + 128 * q;  // 64 rows x 8 chunks of 8 columns
                const int r = chunk >> 3, col = c0 + 8 * (chunk & 7);
                if (r_first + r < row_end && col < out_n) {  // out_n % 8 == 0: a chunk is all in or all out
                    *reinterpret_cast<uint4*>(out + static_cast<long long>(r_first + r) * out_n + col) =
                        *reinterpret_cast<const uint4*>(stage + r * SM90_C_PITCH + 8 * (chunk & 7));
                }
            }
            named_barrier_sync(1 + half);  // the stage is read before the next pass writes it
        }
#if SM90_FOLD_ROWS
        if (fold) {
            // The fold's rows (v15): fold_acc[q][4 jn + 2 h + e] is tile column
            // 64 (half + 2 q) + wr + 8 h of the fold's row 8 jn + 2 (lane % 4) + e.
            // Lanes l and l ^ 4 hold neighbouring columns of the same rows: each
            // hands the other one value, so that each stores a pair of columns
            // of one row (4 bytes): an even column's thread its row 2 (lane % 4)
            // + 8 jn, the odd one's the row after.
            const int fold_row0 = t.row0 + SM90_BLOCK_M;
            const int wr = warp * 16 + (lane >> 2);
            const bool even = ((lane >> 2) & 1) == 0;
#pragma unroll
            for (int jn = 0; jn < 2; ++jn) {
                const int ra = fold_row0 + 8 * jn + 2 * (lane & 3);  // this thread's two rows: ra, ra + 1
#ifdef SM90_EPILOGUE_ROW_SCALE
                const float wa = ra < row_end ? row_scale[ra] : 0.0f;
                const float wb = ra + 1 < row_end ? row_scale[ra + 1] : 0.0f;
#endif
#pragma unroll
                for (int q = 0; q < SM90_FOLD_BLOCKS; ++q) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int i = 4 * jn + 2 * h;
                        float va = fold_acc[q][i], vb = fold_acc[q][i + 1];
#ifdef SM90_EPILOGUE_ACT
                        const int col = t.n0 / 2 + 64 * half + wr + 8 * h;  // gate (q = 0) and up (fold_acc[1]) of it
                        float ua = fold_acc[1][i], ub = fold_acc[1][i + 1];
                        if (bias_g != nullptr && col < out_n) {
                            const float bg = to_float(bias_g[col]), bu = to_float(bias_g[out_n + col]);
                            va += bg;
                            vb += bg;
                            ua += bu;
                            ub += bu;
                        }
                        va = SM90_ACT(va, SM90_EPILOGUE_ACT) * ua;
                        vb = SM90_ACT(vb, SM90_EPILOGUE_ACT) * ub;
#else
                        const int col = t.n0 + 64 * (half + 2 * q) + wr + 8 * h;
#endif
#ifdef SM90_EPILOGUE_ROW_SCALE
                        const float b2 = bias_g != nullptr && col < out_n ? to_float(bias_g[col]) : 0.0f;
                        va = (va + b2) * wa;
                        vb = (vb + b2) * wb;
#endif
                        const float got = __shfl_xor_sync(0xffffffffu, even ? vb : va, 4);
                        const int row = even ? ra : ra + 1, c = even ? col : col - 1;
                        if (row < row_end && c < out_n) {  // out_n is even: both columns or neither
                            *reinterpret_cast<unsigned*>(out + static_cast<long long>(row) * out_n + c) =
                                even ? pack_pair(T{}, va, got) : pack_pair(T{}, got, vb);
                        }
                    }
                }
            }
        }
#endif
    }
}

#define SM90_GEMM_KERNEL(name, T, N_MAJOR_B)                                                                 \
    extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1)                                            \
        name(const __grid_constant__ TmaMap tmap_a, const __grid_constant__ TmaMap tmap_a_rows,              \
             const __grid_constant__ TmaMap tmap_b, const int* __restrict__ row_offsets,                     \
             const int* __restrict__ row_ends, const int* __restrict__ tile_offsets,                         \
             int* __restrict__ tile_counter, int num_groups, int M, int N, int K, T* __restrict__ out,       \
             const T* __restrict__ bias SM90_GATHER_PARAMS(T) SM90_ROW_SCALE_PARAMS) {                       \
        grouped_gemm_impl<T, N_MAJOR_B>(&tmap_a, &tmap_a_rows, &tmap_b, row_offsets, row_ends, tile_offsets, \
                                        tile_counter, num_groups, M, N, K, out,                              \
                                        bias SM90_GATHER_ARGS SM90_ROW_SCALE_ARGS);                          \
    }

SM90_GEMM_KERNEL(grouped_gemm_nt_bf16, bf16_t, false)
SM90_GEMM_KERNEL(grouped_gemm_nt_f16, f16_t, false)
SM90_GEMM_KERNEL(grouped_gemm_nn_bf16, bf16_t, true)
SM90_GEMM_KERNEL(grouped_gemm_nn_f16, f16_t, true)
