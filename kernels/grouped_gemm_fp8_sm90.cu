// grouped_gemm_fp8_sm90.cu: the FP8 (e4m3 x e4m3) grouped GEMM for Hopper
// (sm_90a) with block scales: TMA loads into a shared-memory ring guarded by
// mbarriers, wgmma .e4m3 into fp32, and the scales applied in fp32 registers
// once per 128-deep K block ("promotion"). Group sizes are read on the device.
//
//   out[o_g + r, n] = sum_k  A(o_g + r, k) * B_g(n, k)    for every group g, row r < m_g
//   A(i, k)   = e4m3(a_q[i, k]) * sa[i, k / 128]                      (one scale per token per 128 of K)
//   B_g(n, k) = e4m3(b_q[g, n, k]) * sb[g, n / 128, k / 128]          (one scale per 128 x 128 block)
//
//   a_q  [M, K]      uint8 e4m3fn codes, K-major, rows grouped contiguously
//                    (group g at rows o_g .. o_g + m_g - 1): quantize_rows_fp8's values
//   sa   [M, KB]     fp32, KB = ceil(K / 128): quantize_rows_fp8's scales as they come
//   b_q  [E, N, K]   uint8 e4m3fn codes, K-major (the checkpoint layout, trans_b),
//                    seen by its tensor map as [E * N, K]
//   sb   [E, NB, KB] fp32, NB = ceil(N / 128): FP8ExpertWeights' "block128" scales
//   out  [M, N]      bf16, row-major
//
// Requirements (the launcher, gemm/backends/hopper_fp8.py, checks them):
// K % 16 == 0 (TMA needs 16-byte row strides of uint8) and N % 8 == 0 (the
// store writes 16-byte chunks of bf16 rows); K > 0, N > 0, M > 0.
//
// Why the scales are applied outside the tensor cores: Hopper's FP8 wgmma
// accumulates with fewer mantissa bits than fp32 keeps, and the scales change
// every 128 of K. So each math warpgroup runs the stage's four m64n128k32 MMAs
// into a temporary fp32 fragment (the first with scale-d = 0), waits for them,
// and adds tmp * sa[row][kb] * sb[g][nb][kb] into the real accumulator with
// FFMAs: every 128-deep partial sum is exact-ish in the tensor core and then
// summed in full fp32. With FP8_OVERLAP (the default) there are two temporary
// fragments: the next stage's MMAs run into one while this stage's sums in the
// other are promoted (both math warpgroups reach their promotions together, so
// with one fragment the tensor cores idled through every promotion).
//
// Why the A scales stay [M, KB] (not transposed): each thread needs the scales
// of its own two rows (row and row + 8 of the D fragment) and of one B block
// per stage: 3 floats, loaded from global memory with ld.global.nc one stage
// ahead (issued right after the stage's MMAs, used after the next stage's), so
// their latency hides under a stage of MMAs. A row's KB scales are contiguous,
// so after the first stage most of these loads hit L1. A transposed [KB, M]
// layout would let TMA bring a stage's 128 scales into shared memory, but
// needs a transpose pass per call (or M padded to 4) for no fewer bytes.
//
// Defines (the launcher is their one source):
//   FP8_BLOCK_M   rows of a tile: 128 (two math warpgroups of wgmma m64); equal
//                 to grouped_gemm_sm90.cu's SM90_BLOCK_M, whose
//                 grouped_tile_offsets kernel makes this kernel's row and tile
//                 offsets and zeroes its tile counter
//   FP8_BLOCK_N   columns of a tile: 128 (the launcher's default) or 192.
//                 128: one B scale per tile per stage (N blocks of 128 are
//                 the scale blocks), and 64 fp32 registers per thread for acc
//                 and for each tmp: 128 serial, within the 168 that 384
//                 threads may each have; 192 overlapped, within the 232 the
//                 math warpgroups take (setmaxnreg). (256 would need 256
//                 registers of acc + tmp, and two B scales per stage.)
//                 192 ("wide tiles", no FP8_THIN, FP8_CLUSTER 1): 1.2x the
//                 MMA per byte of a and b; each math warpgroup's 64 x 192 as
//                 two m64n96 halves (tmp 48 + 48, acc 96: 192 registers, so
//                 the roles trade registers whatever FP8_OVERLAP says), one
//                 half promoted while the other's MMAs run (FP8_OVERLAP; 0:
//                 serial), and two B scale blocks per tile (a tile starts on
//                 one or 64 columns past one). The same bits as 128.
//                 Measured: docs/kernel-notes.md, "FP8 wide tiles".
//   FP8_BLOCK_K   K of one stage: 128 (128 bytes of e4m3: one row of the
//                 128-byte swizzle, and exactly one scale block)
//   FP8_STAGES    shared-memory stages of the ring (32 KiB each)
//   FP8_A_BOX_ROWS rows of a's small TMA box: 16 (a multiple of 8, at most
//                 FP8_BLOCK_M; FP8_BLOCK_M gives the one-box load of every
//                 tile, the form before 2026-11-27 noon, for A/B runs)
//   FP8_SMALL_A_ROWS  0 .. FP8_BLOCK_M / 2: on 128 x 128 tiles of one CTA, a
//                 tile with at most this many rows of its group loads them in
//                 small boxes, one with more loads a's whole box (see tmap_a
//                 below). Why not always small boxes up to 64 rows: four of
//                 them a stage made a 64-row tile cost more than a full one
//                 (docs/kernel-notes.md, "What an FP8 tail tile costs").
//   FP8_THIN      0: tiles of 128 rows x 128 columns, math warpgroup w
//                 multiplying rows 64 (w - 1) .. + 63 (prefill). 1: thin
//                 tiles for decode, 64 rows x 256 columns, math warpgroup w
//                 multiplying columns 128 (w - 1) .. + 127 of the same 64
//                 rows: a stage is 8 KiB of a and 32 KiB of b, so the ring
//                 keeps more weight bytes in flight (5 stages: 160 KiB of b,
//                 where 6 stages of the 128-row tiles keep 96 KiB), and at 1-64
//                 rows per group no MMA is spent on rows past the group. A
//                 schedule tile (128 rows) with more than 64 of the group's
//                 rows runs as two passes of 64, each streaming the tile's
//                 band of b again: right for decode, wrong for prefill.
//   FP8_OVERLAP   1: two temporary fragments, stage kt + 1's MMAs running while
//                 stage kt's partial sums are promoted, the load warpgroup
//                 giving registers to the math ones (setmaxnreg 40 / 232);
//                 0: one fragment, each stage's MMAs waited for, then promoted
//                 (the form before 2026-11-27). Both give the same bits.
//   FP8_LOADERS   1: the load warpgroup's thread 0 issues every TMA.
//                 2: thread 0 takes the tiles (with FP8_CLUSTER 2, rank 1's
//                 from rank 0), posts them and loads a; thread 32 (the next
//                 warp) reads each tile from its CTA's mailboxes and loads
//                 that CTA's b into the same stages (thread 0's
//                 arrive.expect_tx counts both; with pairs it waits on the
//                 same empty barriers, which count both CTAs' releases). Why:
//                 ncu's source view put 44% of the stalled samples on the
//                 math warpgroups' full-stage waits while the one load thread
//                 was seldom waiting for a free stage (docs/kernel-notes.md).
//   FP8_CLUSTER   1: one CTA per tile. 2 (not with FP8_THIN): clusters of two
//                 CTAs computing the same 128 rows over two neighbouring
//                 128-column bands (rank r: columns 256 q + 128 r onwards),
//                 so that both need the same a stage: each CTA loads half of
//                 it (64 rows; tmap_a's box is then 64 rows) or, for a tile
//                 of at most 64 rows, every other 16-row box, and multicasts
//                 it into both CTAs; its own b box it loads alone. L2 reads
//                 per CTA and stage: 8 KiB of a and 16 of b instead of 16 and
//                 16. Measured (docs/kernel-notes.md, "FP8 CTA pairs"): L2
//                 reads 22% fewer, time 1.00-1.09x of one CTA per tile, so
//                 the launcher's default is 1; kept for probes and wider
//                 tiles. Why the pair shares a and not b: N / 128 is even on
//                 the models we serve, so no rank idles, where pairing
//                 m-tiles leaves the second rank idle in every group with an
//                 odd tile count.
//                 Each math warpgroup releases a stage in both CTAs (a stage
//                 is refilled only when neither still reads it: empty counts
//                 4 arrivals); rank 0's load thread takes each schedule slot
//                 from the tile counter and posts it to rank 1's
//                 (sm90_cluster.cuh's PairMailbox), FP8_STAGES stages before
//                 the slot's loads begin; every thread of both CTAs passes a
//                 cluster barrier before exit. The same bits as 1: each
//                 output element sums the same K stages in the same order.
//   FP8_FOLD_ROWS 0 (off) or 16 (= FP8_A_BOX_ROWS; 128 x 128 tiles, one CTA
//                 per tile, FP8_OVERLAP): the bf16 kernel's v15 fold. A
//                 group whose rows end 1 .. 16 past one of its whole tiles
//                 has those rows computed by that tile: each stage also
//                 brings them (one tmap_a_rows box, 2 KiB, in the stage's
//                 fold area after all of a's and b's stages), and each math
//                 warpgroup multiplies them as a swapped product, its 64
//                 columns of the b stage as wgmma's a and the 16 rows as its b
//                 (m64n16k32: D row = tile column, D column = the fold's
//                 row), promoted per stage with each row's own scale as the
//                 tile's rows are. The group's tail tile is skipped by the
//                 load thread, which takes the next tile instead. Why: such a
//                 tail tile streams a whole band of b for a few rows and costs
//                 most of a tile (docs/kernel-notes.md, "v15"). A folding
//                 tile walks K in the serial form (fp8_k_walk says why).
//
// Kernel:
//
//   grouped_gemm_fp8_nt_bf16(tmap_a, tmap_a_rows, tmap_b, sa, sb, row_offsets,
//                            row_ends, tile_offsets, tile_counter, num_groups,
//                            M, N, K, out)
//     tmap_a: tiled TMA map of a_q [M, K] (uint8), box [FP8_BLOCK_M, FP8_BLOCK_K],
//             128-byte swizzle, zero fill. tmap_a_rows: the same with box
//             [FP8_A_BOX_ROWS, FP8_BLOCK_K]. As in grouped_gemm_sm90.cu (v10):
//             a tile whose group has r rows from its first row loads one
//             tmap_a box per stage when r > FP8_SMALL_A_ROWS (thin tiles and
//             CTA pairs: FP8_BLOCK_M / 2), else ceil(r / FP8_A_BOX_ROWS)
//             tmap_a_rows boxes (a decode tile of 2 rows: 2 KiB of a per
//             stage beside 16 KiB of weights, not 16).
//             The A stage's rows past them keep older bytes (any codes, NaN
//             included): each output row reads only its own row of a, and
//             those rows are never stored.
//     tmap_b: of b_q as [E * N, K], box [FP8_BLOCK_N, FP8_BLOCK_K], the same.
//             Zero fill makes a K tail add nothing (its scale block is partial
//             and has its own scale); rows of a tile past N read the next
//             group's weights (those columns are never stored).
//     row_offsets [E + 1], row_ends [E], tile_offsets [E + 1], tile_counter:
//             from grouped_tile_offsets (grouped_gemm_sm90.cu; capacity 0:
//             grouped-contiguous rows), launched just before on the same stream.
//     Grid: any x >= 1 CTAs (persistent: CTA x takes tile x first, then
//     gridDim.x + atomicAdd(tile_counter, 1) when its ring has room for one);
//     with FP8_CLUSTER 2 an even x, and cluster c (of x / 2) takes schedule
//     slot c first, then x / 2 + atomicAdd(tile_counter, 1).
//     Block FP8_THREADS = 384: warpgroup 0 loads (one thread issues every
//     TMA), warpgroups 1 and 2 multiply 64 rows each (thin tiles: 128 of the
//     columns each).
//     Dynamic shared memory: FP8_STAGES * (FP8_TILE_M + FP8_TILE_N +
//     FP8_FOLD_ROWS) * FP8_BLOCK_K (the ring) + 2 * 64 * SM90_C_PITCH * 2 (the store's staging
//     areas) + 1024 (to align the ring for the swizzle) + the schedule table
//     4 * (3E + 1) when E <= FP8_TABLE_MAX_GROUPS.
//     Schedule: that of grouped_gemm_sm90.cu with FP8_SLOT_N-column slots
//     (FP8_CLUSTER * FP8_TILE_N: 128, thin tiles 256, pairs 2 x 128): with
//     n_tiles = ceil(N / FP8_SLOT_N), schedule
//     tile x belongs to group g with
//     tile_offsets[g] <= x / n_tiles < tile_offsets[g + 1]; within a group the
//     M tiles run fastest (a thin tile's 128 rows in one or two passes of 64).
//     Rows at or past row_ends[g] (the next group's) and
//     columns past N are computed but never stored; no row at or past M is.
//     Every output element is computed by one CTA in a fixed K order, with no
//     atomics on data: bitwise deterministic.

#include "common.cuh"
#include "sm90.cuh"
#if FP8_CLUSTER == 2
#include "sm90_cluster.cuh"
#define FP8_CLUSTER_DIMS __cluster_dims__(2, 1, 1)
#else
#define FP8_CLUSTER_DIMS
#endif

#if !defined(FP8_BLOCK_M) || !defined(FP8_BLOCK_N) || !defined(FP8_BLOCK_K) || !defined(FP8_STAGES) || \
    !defined(FP8_OVERLAP) || !defined(FP8_TABLE_MAX_GROUPS) || !defined(FP8_A_BOX_ROWS) || !defined(FP8_THIN) || \
    !defined(FP8_CLUSTER) || !defined(FP8_LOADERS) || !defined(FP8_FOLD_ROWS) || !defined(FP8_SMALL_A_ROWS)
#error "grouped_gemm_fp8_sm90.cu needs FP8_BLOCK_M, FP8_BLOCK_N, FP8_BLOCK_K, FP8_STAGES, FP8_OVERLAP, FP8_TABLE_MAX_GROUPS, FP8_A_BOX_ROWS, FP8_THIN, FP8_CLUSTER, FP8_LOADERS, FP8_FOLD_ROWS and FP8_SMALL_A_ROWS from its launcher"
#endif
#if FP8_SMALL_A_ROWS < 0 || FP8_SMALL_A_ROWS > FP8_BLOCK_M / 2
#error "FP8_SMALL_A_ROWS must be 0 .. FP8_BLOCK_M / 2"
#endif
#if FP8_FOLD_ROWS && (FP8_FOLD_ROWS != 16 || FP8_A_BOX_ROWS != 16 || FP8_THIN || FP8_CLUSTER != 1 || \
                      FP8_BLOCK_N != 128 || !FP8_OVERLAP)
#error "FP8_FOLD_ROWS must be 16 (= FP8_A_BOX_ROWS: one box, wgmma n16), with 128 x 128 tiles, FP8_CLUSTER 1 and FP8_OVERLAP"
#endif
#if FP8_THIN && FP8_A_BOX_ROWS > 64
#error "thin tiles (FP8_THIN) load a's 64 rows in boxes of FP8_A_BOX_ROWS: at most 64"
#endif
#if FP8_A_BOX_ROWS % 8 != 0 || FP8_A_BOX_ROWS > FP8_BLOCK_M
#error "FP8_A_BOX_ROWS must be a multiple of 8 (one 1024-byte swizzle atom), at most FP8_BLOCK_M"
#endif
#if FP8_BLOCK_M != 128 || (FP8_BLOCK_N != 128 && FP8_BLOCK_N != 192) || FP8_BLOCK_K != 128
#error "this kernel's two math warpgroups issue wgmma m64n128k32 (or two m64n96k32) over 128-deep K stages: FP8_BLOCK_M=128, FP8_BLOCK_N=128 or 192, FP8_BLOCK_K=128"
#endif
#if FP8_BLOCK_N == 192 && (FP8_THIN || FP8_CLUSTER != 1)
#error "FP8_BLOCK_N 192 (wide tiles) runs one CTA per tile and no thin tiles"
#endif
#if FP8_LOADERS != 1 && FP8_LOADERS != 2
#error "FP8_LOADERS must be 1 or 2"
#endif
#if FP8_CLUSTER != 1 && FP8_CLUSTER != 2
#error "FP8_CLUSTER must be 1 (one CTA per tile) or 2 (CTA pairs sharing each a stage)"
#endif
#if FP8_CLUSTER == 2 && (FP8_THIN || FP8_A_BOX_ROWS > 32)
#error "FP8_CLUSTER 2 takes no FP8_THIN, and splits a's stage between the pair: FP8_A_BOX_ROWS at most 32"
#endif

#define FP8_MATH_WARPGROUPS 2
#define FP8_THREADS (128 * (1 + FP8_MATH_WARPGROUPS))
// A tile (one pass of the math warpgroups) and its stage: FP8_THIN above.
#if FP8_THIN
#define FP8_TILE_M 64
#define FP8_TILE_N (2 * FP8_BLOCK_N)
#else
#define FP8_TILE_M FP8_BLOCK_M
#define FP8_TILE_N FP8_BLOCK_N
#endif
// Columns of one schedule slot: the cluster's tiles side by side.
#define FP8_SLOT_N (FP8_CLUSTER * FP8_TILE_N)
#if FP8_STAGES < 2 || FP8_STAGES * (FP8_TILE_M + FP8_TILE_N + FP8_FOLD_ROWS) * FP8_BLOCK_K > 204 * 1024
#error "FP8_STAGES must be at least 2, and the ring at most 204 KiB (the H100 gives a block at most 227 KiB, the store's staging areas take 18)"
#endif
#define FP8_A_STAGE_BYTES (FP8_TILE_M * FP8_BLOCK_K)
#define FP8_B_STAGE_BYTES (FP8_TILE_N * FP8_BLOCK_K)
#define FP8_B_BOX_BYTES (FP8_BLOCK_N * FP8_BLOCK_K)
// A stage's fold rows (FP8_FOLD_ROWS): after all stages of a and of b.
#define FP8_FOLD_STAGE_BYTES (FP8_FOLD_ROWS * FP8_BLOCK_K)
#define FP8_STAGE_BYTES (FP8_A_STAGE_BYTES + FP8_B_STAGE_BYTES + FP8_FOLD_STAGE_BYTES)
#define FP8_A_BOX_BYTES (FP8_A_BOX_ROWS * FP8_BLOCK_K)
#define FP8_SCALE_BLOCK 128  // the scale blocks of K (and of B's N): FP8ExpertWeights' "block128"
// Whether a tile with `rows` rows of its group loads a's whole box (else its
// small boxes): FP8_SMALL_A_ROWS on 128 x 128 tiles of one CTA; thin tiles
// (at most 64 rows a pass) never, CTA pairs (half a box each) past 64.
#if FP8_THIN || FP8_CLUSTER == 2
#define FP8_WHOLE_A(rows) ((rows) > FP8_BLOCK_M / 2)
#else
#define FP8_WHOLE_A(rows) ((rows) > FP8_SMALL_A_ROWS)
#endif

// D[64 x 128] (+)= A[64 x 32] B[32 x 128], e4m3 both, A and B K-major in
// shared memory (FP8 wgmma reads K-major operands only: no transpose flags).
// scale_d = 0 writes A B into D (the stage's first step), 1 adds.
// D fragment (PTX, wgmma .m64nNk32 with an f32 D, the same as .m64nNk16):
// thread t of the warpgroup holds rows 16 * (t / 32) + (t % 32) / 4 and that
// + 8, columns 8 * j + 2 * (t % 4) and that + 1: d[4j] (row, col), d[4j + 1]
// (row, col + 1), d[4j + 2] (row + 8, col), d[4j + 3] (row + 8, col + 1), j = 0 .. 15.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], unsigned long long desc_a,
                                                      unsigned long long desc_b, int scale_d) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
          "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
          "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),
          "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),
          "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// The same over 96 columns (wide tiles: each math warpgroup's 64 x 192 is
// two of these, one per temporary half; the D fragment's layout as above,
// j = 0 .. 11).
__device__ __forceinline__ void wgmma_m64n96k32_e4m3(float (&d)[48], unsigned long long desc_a,
                                                     unsigned long long desc_b, int scale_d) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %50, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n96k32.f32.e4m3.e4m3 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, "
        "%48, %49, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// The fold's swapped product (FP8_FOLD_ROWS): D[64 x 16] (+)= A[64 x 32] B[32 x 16],
// A = 64 rows of the tile's b stage, B = the fold's 16 rows of a, both
// K-major. D row i is the tile column, D column j the fold's row j (the
// fragment layout above, j = 0 .. 1).
__device__ __forceinline__ void wgmma_m64n16k32_e4m3(float (&d)[8], unsigned long long desc_a,
                                                     unsigned long long desc_b, int scale_d) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// A read-only fp32 load through the non-coherent (texture) path: the scales
// do not change during the kernel.
__device__ __forceinline__ float load_scale(const float* p) {
    float v;
    asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// One stage's MMAs into the temporary fragment d: wait for fill f, then the
// four m64n128k32 steps over its 128 bytes of K (the first with scale-d = 0),
// committed as one group. wgmma.fence first: d was read by a promotion.
__device__ __forceinline__ void fp8_issue_stage(float (&d)[64], unsigned long long* full, unsigned f,
                                                const unsigned char* ring_a, const unsigned char* ring_b,
                                                int half) {
    const int s = f % FP8_STAGES;
    mbarrier_wait(&full[s], (f / FP8_STAGES) & 1);
#if FP8_THIN
    // Both warpgroups read the stage's 64 rows of a; each its own 128 rows
    // of b (16 KiB further for the second, 1024-aligned).
    const unsigned long long da = smem_descriptor(ring_a + s * FP8_A_STAGE_BYTES);
    const unsigned long long db = smem_descriptor(ring_b + s * FP8_B_STAGE_BYTES + half * FP8_B_BOX_BYTES);
#else
    // 64 rows of 128 bytes further down the A stage: 8 KiB, 1024-aligned.
    const unsigned long long da = smem_descriptor(ring_a + s * FP8_A_STAGE_BYTES + half * 64 * FP8_BLOCK_K);
    const unsigned long long db = smem_descriptor(ring_b + s * FP8_B_STAGE_BYTES);
#endif
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < FP8_BLOCK_K / 32; ++kk) {
        // 32 e4m3 of K are 32 bytes further along each 128-byte row: +2 in
        // the descriptor's address field (units of 16 bytes).
        wgmma_m64n128k32_e4m3(d, da + 2 * kk, db + 2 * kk, kk > 0);
    }
    wgmma_commit();
}

// Pins d's registers at this point of the program: the compiler may not move
// a read or write of them across it (an empty volatile asm that "changes"
// each one; volatile asms keep their order). Placed after a wgmma wait, it
// keeps the promotion's reads of d after the wait: a read of a fragment whose
// MMAs may still run makes ptxas serialize every wgmma (note C7514).
template <int NREG>
__device__ __forceinline__ void fp8_pin(float (&d)[NREG]) {
#pragma unroll
    for (int i = 0; i < NREG; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// acc += d * scale, with s0 for the fragment's row frag_row and s1 for row + 8.
__device__ __forceinline__ void fp8_promote(float (&acc)[64], const float (&d)[64], float s0, float s1) {
#pragma unroll
    for (int i = 0; i < 64; i += 4) {
        acc[i] = fmaf(d[i], s0, acc[i]);
        acc[i + 1] = fmaf(d[i + 1], s0, acc[i + 1]);
        acc[i + 2] = fmaf(d[i + 2], s1, acc[i + 2]);
        acc[i + 3] = fmaf(d[i + 3], s1, acc[i + 3]);
    }
}

// Wide tiles (FP8_BLOCK_N 192): half H of stage f's MMAs (H = 0: the tile's
// columns 0 .. 95, 1: 96 .. 191) into the temporary half d, the four
// m64n96k32 steps committed as one group. Half 0 waits for the fill; half 1
// follows it on the same stage. b's rows of a half are 96 x 128 bytes =
// 12 KiB further (1024-aligned, so the swizzle's phase is the stage's).
template <int H>
__device__ __forceinline__ void fp8_issue_half(float (&d)[48], unsigned long long* full, unsigned f,
                                               const unsigned char* ring_a, const unsigned char* ring_b,
                                               int half) {
    const int s = f % FP8_STAGES;
    if (H == 0) mbarrier_wait(&full[s], (f / FP8_STAGES) & 1);
    const unsigned long long da = smem_descriptor(ring_a + s * FP8_A_STAGE_BYTES + half * 64 * FP8_BLOCK_K);
    const unsigned long long db = smem_descriptor(ring_b + s * FP8_B_STAGE_BYTES + H * 96 * FP8_BLOCK_K);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < FP8_BLOCK_K / 32; ++kk) {
        wgmma_m64n96k32_e4m3(d, da + 2 * kk, db + 2 * kk, kk > 0);
    }
    wgmma_commit();
}

// Wide tiles: acc[BASE + i] += d[i] * scale over one half's 12 column groups
// j (columns 8 j .. 8 j + 7 of the half). A 192-column tile starts at 0 or 64
// past a 128-column scale block, so it spans two B scale blocks: groups
// j < SPLIT take the first (lo0 for the thread's row, lo1 for row + 8), the
// rest the next (hi0, hi1). SPLIT is a constant, so each FFMA's scale is a
// register chosen at compile time.
template <int BASE, int SPLIT>
__device__ __forceinline__ void fp8_promote_half(float (&acc)[96], const float (&d)[48], float lo0, float lo1,
                                                 float hi0, float hi1) {
#pragma unroll
    for (int j = 0; j < 12; ++j) {
        const float s0 = j < SPLIT ? lo0 : hi0, s1 = j < SPLIT ? lo1 : hi1;
        acc[BASE + 4 * j] = fmaf(d[4 * j], s0, acc[BASE + 4 * j]);
        acc[BASE + 4 * j + 1] = fmaf(d[4 * j + 1], s0, acc[BASE + 4 * j + 1]);
        acc[BASE + 4 * j + 2] = fmaf(d[4 * j + 2], s1, acc[BASE + 4 * j + 2]);
        acc[BASE + 4 * j + 3] = fmaf(d[4 * j + 3], s1, acc[BASE + 4 * j + 3]);
    }
}

// The fold's MMAs of fill f (FP8_FOLD_ROWS) into d, committed as a group of
// their own: this warpgroup's 64 columns of the b stage (64 rows of 128
// bytes further: 8 KiB, 1024-aligned) times the stage's 16 fold rows. The
// stage's own MMAs waited for its fill.
__device__ __forceinline__ void fp8_issue_fold(float (&d)[8], unsigned f, const unsigned char* ring_b,
                                               const unsigned char* ring_f, int half) {
    const int s = f % FP8_STAGES;
    const unsigned long long da = smem_descriptor(ring_b + s * FP8_B_STAGE_BYTES + half * 64 * FP8_BLOCK_K);
    const unsigned long long db = smem_descriptor(ring_f + s * FP8_FOLD_STAGE_BYTES);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < FP8_BLOCK_K / 32; ++kk) {
        wgmma_m64n16k32_e4m3(d, da + 2 * kk, db + 2 * kk, kk > 0);
    }
    wgmma_commit();
}

// facc += d * scale for the fold's fragment: d[4 j + 2 h + e] is tile column
// frag_row + 8 h of the fold's row 8 j + 2 (tid % 4) + e, so s0, s1 are the
// scales of rows 2 (tid % 4) and + 1, s8, s9 of rows 8 + 2 (tid % 4) and + 1.
__device__ __forceinline__ void fp8_promote_fold(float (&facc)[8], const float (&d)[8], float s0, float s1, float s8,
                                                 float s9) {
    facc[0] = fmaf(d[0], s0, facc[0]);
    facc[1] = fmaf(d[1], s1, facc[1]);
    facc[2] = fmaf(d[2], s0, facc[2]);
    facc[3] = fmaf(d[3], s1, facc[3]);
    facc[4] = fmaf(d[4], s8, facc[4]);
    facc[5] = fmaf(d[5], s9, facc[5]);
    facc[6] = fmaf(d[6], s8, facc[6]);
    facc[7] = fmaf(d[7], s9, facc[7]);
}

// The scales of stage kt of the thread's four fold rows, fq, fq + 1, fq + 8
// and fq + 9 (sf: row fq's scales in sa; left: the group's rows from fq on),
// each loaded only for a row of the group (0 for the others, whose outputs
// are never stored). One pointer and one count for the four: registers are
// what the fold is short of.
struct Fp8FoldScales {
    float s0, s1, s8, s9;
};
__device__ __forceinline__ Fp8FoldScales fp8_fold_scales(const float* sf, int left, int num_k, int kt) {
    Fp8FoldScales r;
    r.s0 = left > 0 ? load_scale(sf + kt) : 0.0f;
    r.s1 = left > 1 ? load_scale(sf + num_k + kt) : 0.0f;
    r.s8 = left > 8 ? load_scale(sf + 8 * num_k + kt) : 0.0f;
    r.s9 = left > 9 ? load_scale(sf + 9 * num_k + kt) : 0.0f;
    return r;
}

// One tile of the schedule (see the header): group, rows, first column.
struct Fp8Tile {
    int g;        // group
    int row0;     // first row of the tile (in a_q, sa and out)
    int row_end;  // rows from row_end on are not this group's: never stored
    int n0;       // first column
    int a_rows;   // the group's rows from row0 on, at most FP8_BLOCK_M (0 when the sizes overrun M)
    int b_boxes;  // boxes of b per stage: FP8_TILE_N / FP8_BLOCK_N, less where the tile ends past N
#if FP8_FOLD_ROWS
    int fold_rows;  // the group's rows after this tile's FP8_BLOCK_M that it computes too (else 0)
    bool skip;      // a tail tile the tile before computes as its fold
#endif
};

// Slot `tile` of the schedule as CTA `rank` of its cluster computes it (rank
// 0 without clusters): the slot's rows, and the rank's FP8_TILE_N columns of
// its FP8_SLOT_N.
__device__ __forceinline__ Fp8Tile fp8_find_tile(long long tile, int n_tiles, const int* __restrict__ row_offsets,
                                                 const int* __restrict__ row_ends,
                                                 const int* __restrict__ tile_offsets, int num_groups, int M,
                                                 int N, int rank) {
    Fp8Tile t;
    t.g = sm90_find_group(static_cast<int>(tile / n_tiles), tile_offsets, num_groups);  // n_tiles of FP8_SLOT_N
    const int m_tiles = tile_offsets[t.g + 1] - tile_offsets[t.g];
    const long long local = tile - static_cast<long long>(tile_offsets[t.g]) * n_tiles;
    t.row0 = row_offsets[t.g] + static_cast<int>(local % m_tiles) * FP8_BLOCK_M;
    t.row_end = min(row_ends[t.g], M);
    t.n0 = static_cast<int>(local / m_tiles) * FP8_SLOT_N + rank * FP8_TILE_N;
    t.a_rows = max(0, min(FP8_BLOCK_M, t.row_end - t.row0));
    // Boxes wholly past N are not loaded: their columns are never stored (a
    // pair's second tile may lie wholly past N: none loaded, nothing stored).
    t.b_boxes = max(0, min(FP8_TILE_N / FP8_BLOCK_N, (N - t.n0 + FP8_BLOCK_N - 1) / FP8_BLOCK_N));
#if FP8_FOLD_ROWS
    // The fold, as grouped_gemm_sm90.cu's find_tile decides it: both from
    // the rows, so the folding tile and the skipped one agree.
    const int rows_left = t.row_end - t.row0;
    t.fold_rows = rows_left > FP8_BLOCK_M && rows_left <= FP8_BLOCK_M + FP8_FOLD_ROWS ? rows_left - FP8_BLOCK_M : 0;
    t.skip = t.row0 > row_offsets[t.g] && rows_left > 0 && rows_left <= FP8_FOLD_ROWS;
#endif
    return t;
}

// A stage is read by this math warpgroup (its MMAs finished): one arrival on
// empty[s], in both CTAs of a pair (either CTA's loads may refill it).
__device__ __forceinline__ void fp8_release(unsigned long long* empty) {
#if FP8_CLUSTER == 2
    mbarrier_arrive_pair(empty);
#else
    mbarrier_arrive(empty);
#endif
}

// The bytes one stage of tile t brings: b's box and a's (see the header).
__device__ __forceinline__ int fp8_stage_bytes(const Fp8Tile& t) {
    const int a_bytes = FP8_WHOLE_A(t.a_rows) ? FP8_A_STAGE_BYTES
                                              : (t.a_rows + FP8_A_BOX_ROWS - 1) / FP8_A_BOX_ROWS * FP8_A_BOX_BYTES;
#if FP8_FOLD_ROWS
    return a_bytes + t.b_boxes * FP8_B_BOX_BYTES + (t.fold_rows > 0 ? FP8_FOLD_STAGE_BYTES : 0);
#else
    return a_bytes + t.b_boxes * FP8_B_BOX_BYTES;
#endif
}

// Stage kt of tile w's b: its boxes of FP8_BLOCK_N rows of [E * N, K] that
// hold columns of N.
__device__ __forceinline__ void fp8_load_b(unsigned char* stage, const TmaMap* tmap_b, unsigned long long* full,
                                           const Fp8Tile& w, int kt, int N) {
    for (int jb = 0; jb < w.b_boxes; ++jb) {
        tma_load_2d(stage + jb * FP8_B_BOX_BYTES, tmap_b, full, kt * FP8_BLOCK_K, w.g * N + w.n0 + jb * FP8_BLOCK_N);
    }
}

// A wide tile's K walk for one math warpgroup (FP8_BLOCK_N 192): its 64 x 192
// as two 64 x 96 halves (two groups of MMAs per stage), each half in its own
// temporary fragment. With FP8_OVERLAP one half's partial sums are promoted
// while the other half's MMAs run: stage kt's half 0 while its half 1 runs,
// its half 1 while stage kt + 1's half 0 runs (the 128-column tiles' overlap
// needs a second whole fragment, 96 more registers than the 232). Without
// it, each stage's two groups are waited for, then promoted (the serial
// form). EVEN: the tile starts on a scale block (columns 0 .. 127 take the
// first B block, 128 .. 191 the next); else 64 past one (columns 0 .. 63 the
// first, 64 .. 191 the next). Each output sums its stages' tmp * (sa * sb)
// in K order with one fmaf each, as the 128-column tiles do: the same bits.
// The column groups j (of each half's 12) that take the tile's first B scale
// block: j < A in half 0, j < B in half 1 (fp8_promote_half's SPLIT).
template <bool EVEN>
struct Fp8WideSplit {
    static constexpr int A = EVEN ? 12 : 8, B = EVEN ? 4 : 0;
};
template <bool EVEN>
__device__ __forceinline__ void fp8_wide_k_loop(float (&acc)[96], float (&ta)[48], float (&tb)[48],
                                                unsigned long long* full, unsigned long long* empty,
                                                unsigned fills, int num_k, const unsigned char* ring_a,
                                                const unsigned char* ring_b, int half, int tid,
                                                const float* sa0, const float* sa1, const float* sb_lo,
                                                const float* sb_hi) {
    constexpr int SPLIT_A = Fp8WideSplit<EVEN>::A, SPLIT_B = Fp8WideSplit<EVEN>::B;
    float a0 = load_scale(sa0), a1 = load_scale(sa1), lo = load_scale(sb_lo), hi = load_scale(sb_hi);
#if !FP8_OVERLAP
    for (int kt = 0; kt < num_k; ++kt) {
        fp8_issue_half<0>(ta, full, fills + kt, ring_a, ring_b, half);
        fp8_issue_half<1>(tb, full, fills + kt, ring_a, ring_b, half);
        // The next stage's scales while the MMAs run (the last stage reloads its own).
        const int kn = min(kt + 1, num_k - 1);
        const float na0 = load_scale(sa0 + kn), na1 = load_scale(sa1 + kn);
        const float nlo = load_scale(sb_lo + kn), nhi = load_scale(sb_hi + kn);
        wgmma_wait<0>();
        fp8_pin(ta);
        fp8_pin(tb);
        if (tid == 0) fp8_release(&empty[(fills + kt) % FP8_STAGES]);  // stage kt is read
        fp8_promote_half<0, SPLIT_A>(acc, ta, a0 * lo, a1 * lo, a0 * hi, a1 * hi);
        fp8_promote_half<48, SPLIT_B>(acc, tb, a0 * lo, a1 * lo, a0 * hi, a1 * hi);
        a0 = na0, a1 = na1, lo = nlo, hi = nhi;
    }
#else
    // At the loop's head stage kt's half 0 is the one group in flight.
    fp8_issue_half<0>(ta, full, fills, ring_a, ring_b, half);
    int kt = 0;
    for (; kt + 1 < num_k; ++kt) {
        fp8_issue_half<1>(tb, full, fills + kt, ring_a, ring_b, half);
        wgmma_wait<1>();  // stage kt's half 0 is done; its half 1 runs on
        fp8_pin(ta);
        fp8_promote_half<0, SPLIT_A>(acc, ta, a0 * lo, a1 * lo, a0 * hi, a1 * hi);
        fp8_issue_half<0>(ta, full, fills + kt + 1, ring_a, ring_b, half);
        const float na0 = load_scale(sa0 + kt + 1), na1 = load_scale(sa1 + kt + 1);
        const float nlo = load_scale(sb_lo + kt + 1), nhi = load_scale(sb_hi + kt + 1);
        wgmma_wait<1>();  // stage kt's half 1 is done; stage kt + 1's half 0 runs on
        fp8_pin(tb);
        if (tid == 0) fp8_release(&empty[(fills + kt) % FP8_STAGES]);  // stage kt is read
        fp8_promote_half<48, SPLIT_B>(acc, tb, a0 * lo, a1 * lo, a0 * hi, a1 * hi);
        a0 = na0, a1 = na1, lo = nlo, hi = nhi;
    }
    // The last stage. The second path below is never taken (num_k >= 1; the
    // test goes through an asm copy, so the compiler cannot drop it): with
    // one path out of the loop, whatever the loop's shape, ptxas serialized
    // every wgmma (C7514); with two, as the 128-column tiles' tail has, it
    // pipelines them (found by bisection offline; the reason is not known).
    int k_left;
    asm("mov.b32 %0, %1;" : "=r"(k_left) : "r"(num_k));
    if (k_left > 0) {
        fp8_issue_half<1>(tb, full, fills + kt, ring_a, ring_b, half);
        wgmma_wait<1>();
        fp8_pin(ta);
        fp8_promote_half<0, SPLIT_A>(acc, ta, a0 * lo, a1 * lo, a0 * hi, a1 * hi);
        wgmma_wait<0>();
        fp8_pin(tb);
        if (tid == 0) fp8_release(&empty[(fills + kt) % FP8_STAGES]);
        fp8_promote_half<48, SPLIT_B>(acc, tb, a0 * lo, a1 * lo, a0 * hi, a1 * hi);
    } else {
        wgmma_wait<0>();
    }
#endif
}

// A 128 x 128 tile's K walk on one math warpgroup with FP8_OVERLAP: stages
// alternate between tmp0 (even kt) and tmp1 (odd kt), stage kt + 1's MMAs
// issued before stage kt's partial sums are promoted. Each stage's scales
// are loaded when its MMAs are issued and used one stage later. Every path
// keeps one group of the tile's MMAs in flight through the loop and none
// after the tail: where ptxas cannot tell which fragment is in flight, it
// serializes every wgmma (C7514).
//
// FOLD (FP8_FOLD_ROWS): a tile that computes its group's last rows too walks
// K in the serial form: each stage's MMAs and its fold's (fp8_issue_fold,
// in tmp0 and ftmp) are waited for, then both promoted, the next stage's
// scales loaded while they run. Why not overlapped: the overlapped walk
// holds 192 fp32 registers of fragments, and the fold's 16 more made ptxas
// spill 28-92 bytes in the loop in every arrangement tried (2026-11-28);
// the serial walk holds 144. The kernel runs one of the two whole walks per
// tile, each ending with no MMA in flight (a branch around the fold's
// wgmmas inside one loop serializes them: C7520 in the bf16 kernel).
template <bool FOLD>
__device__ __forceinline__ void fp8_k_walk(float (&acc)[64], float (&tmp0)[64], float (&tmp1)[64], float (&facc)[8],
                                           float (&ftmp)[8], unsigned long long* full, unsigned long long* empty,
                                           unsigned fills, int num_k, const unsigned char* ring_a,
                                           const unsigned char* ring_b, const unsigned char* ring_f, int half,
                                           int tid, const float* sa0, const float* sa1, const float* sbt,
                                           const float* sf, int left) {
    float a0 = load_scale(sa0), a1 = load_scale(sa1), b = load_scale(sbt);
    if constexpr (!FOLD) {
        fp8_issue_stage(tmp0, full, fills, ring_a, ring_b, half);
        int kt = 0;
        float na0, na1, nb;
        for (; kt + 2 < num_k; kt += 2) {  // stages kt + 1 and kt + 2 exist
            fp8_issue_stage(tmp1, full, fills + kt + 1, ring_a, ring_b, half);
            na0 = load_scale(sa0 + kt + 1), na1 = load_scale(sa1 + kt + 1), nb = load_scale(sbt + kt + 1);
            wgmma_wait<1>();  // stage kt's group is done; kt + 1's runs on
            fp8_pin(tmp0);
            if (tid == 0) fp8_release(&empty[(fills + kt) % FP8_STAGES]);  // stage kt is read
            fp8_promote(acc, tmp0, a0 * b, a1 * b);
            a0 = na0, a1 = na1, b = nb;
            fp8_issue_stage(tmp0, full, fills + kt + 2, ring_a, ring_b, half);
            na0 = load_scale(sa0 + kt + 2), na1 = load_scale(sa1 + kt + 2), nb = load_scale(sbt + kt + 2);
            wgmma_wait<1>();
            fp8_pin(tmp1);
            if (tid == 0) fp8_release(&empty[(fills + kt + 1) % FP8_STAGES]);
            fp8_promote(acc, tmp1, a0 * b, a1 * b);
            a0 = na0, a1 = na1, b = nb;
        }
        // The tail: stage kt is in tmp0, in flight; one more stage or none.
        if (kt + 1 < num_k) {
            fp8_issue_stage(tmp1, full, fills + kt + 1, ring_a, ring_b, half);
            na0 = load_scale(sa0 + kt + 1), na1 = load_scale(sa1 + kt + 1), nb = load_scale(sbt + kt + 1);
            wgmma_wait<1>();
            fp8_pin(tmp0);
            if (tid == 0) fp8_release(&empty[(fills + kt) % FP8_STAGES]);
            fp8_promote(acc, tmp0, a0 * b, a1 * b);
            wgmma_wait<0>();
            fp8_pin(tmp1);
            if (tid == 0) fp8_release(&empty[(fills + kt + 1) % FP8_STAGES]);
            fp8_promote(acc, tmp1, na0 * nb, na1 * nb);
        } else {
            wgmma_wait<0>();
            fp8_pin(tmp0);
            if (tid == 0) fp8_release(&empty[(fills + kt) % FP8_STAGES]);
            fp8_promote(acc, tmp0, a0 * b, a1 * b);
        }
    } else {
        Fp8FoldScales fs = fp8_fold_scales(sf, left, num_k, 0);
        for (int kt = 0; kt < num_k; ++kt) {
            const unsigned f = fills + kt;
            fp8_issue_stage(tmp0, full, f, ring_a, ring_b, half);
            fp8_issue_fold(ftmp, f, ring_b, ring_f, half);
            // The next stage's scales while the MMAs run (the last stage reloads its own).
            const int kn = min(kt + 1, num_k - 1);
            const float na0 = load_scale(sa0 + kn), na1 = load_scale(sa1 + kn), nb = load_scale(sbt + kn);
            const Fp8FoldScales nfs = fp8_fold_scales(sf, left, num_k, kn);
            wgmma_wait<0>();
            fp8_pin(tmp0);
            fp8_pin(ftmp);
            if (tid == 0) fp8_release(&empty[f % FP8_STAGES]);  // stage kt is read
            fp8_promote(acc, tmp0, a0 * b, a1 * b);
            fp8_promote_fold(facc, ftmp, fs.s0 * b, fs.s1 * b, fs.s8 * b, fs.s9 * b);
            a0 = na0, a1 = na1, b = nb;
            fs = nfs;
        }
    }
}

// The pipeline (as grouped_gemm_sm90.cu's): every role counts the stages it
// has filled (or consumed) since the CTA began, `fills`, carried from tile to
// tile; fill f uses stage f % FP8_STAGES with mbarrier parity
// (f / FP8_STAGES) & 1. Each fill is released once, right after its MMAs, so
// the load thread runs on into the next tile while a tile is stored.
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 1) FP8_CLUSTER_DIMS
    grouped_gemm_fp8_nt_bf16(const __grid_constant__ TmaMap tmap_a, const __grid_constant__ TmaMap tmap_a_rows,
                             const __grid_constant__ TmaMap tmap_b,
                             const float* __restrict__ sa, const float* __restrict__ sb,
                             const int* __restrict__ row_offsets, const int* __restrict__ row_ends,
                             const int* __restrict__ tile_offsets,
                             int* __restrict__ tile_counter, int num_groups, int M, int N, int K,
                             bf16_t* __restrict__ out) {
    // Before anything an earlier kernel writes (the schedule, a's codes and
    // scales): the MoE step's launches may overlap (common.cuh). The next
    // kernel may start once each CTA's load thread has run out of tiles.
    wait_for_previous_grid();
    extern __shared__ unsigned char smem_raw[];
    // full[s]: stage s holds data (one arrival with the TMA byte count);
    // empty[s]: both math warpgroups are done reading it (one arrival each).
    __shared__ __align__(8) unsigned long long full[FP8_STAGES];
    __shared__ __align__(8) unsigned long long empty[FP8_STAGES];
    __shared__ __align__(8) Sm90Mailboxes mail;
    // The tile of each mailbox slot as the load thread found it (group, rows,
    // columns), so that the math warpgroups start a tile without searching.
    __shared__ Fp8Tile mail_tile[SM90_SCHED_SLOTS];
#if FP8_CLUSTER == 2
    // Rank 0's load thread posts each slot after the first to rank 1's.
    __shared__ __align__(8) PairMailbox pairs;
    // Slots are drawn per cluster. (Read from the special registers where
    // used: values computed here and live past the load warpgroup's
    // setmaxnreg go to local memory.)
#define FP8_FIRST_TILE static_cast<long long>(cluster_index())
#define FP8_TILE_STRIDE cluster_count()
#define FP8_RANK static_cast<int>(cluster_rank())
#else
#define FP8_FIRST_TILE static_cast<long long>(blockIdx.x)
#define FP8_TILE_STRIDE gridDim.x
#define FP8_RANK 0
#endif

    const int n_tiles = (N + FP8_SLOT_N - 1) / FP8_SLOT_N;
    const long long total_tiles = static_cast<long long>(tile_offsets[num_groups]) * n_tiles;
    // The whole block (with clusters: both blocks of the pair) before any barrier.
    if (FP8_FIRST_TILE >= total_tiles) return;
    const int num_k = (K + FP8_BLOCK_K - 1) / FP8_BLOCK_K;  // also the scale blocks of K (KB)

    // The ring starts on a 1024-byte boundary: the 128-byte swizzle repeats
    // every 8 rows of 128 bytes.
    unsigned char* ring = smem_raw + ((1024 - (shared_address(smem_raw) & 1023)) & 1023);
    unsigned char* ring_a = ring;
    unsigned char* ring_b = ring + FP8_STAGES * FP8_A_STAGE_BYTES;
    unsigned char* ring_f = ring_b + FP8_STAGES * FP8_B_STAGE_BYTES;  // FP8_FOLD_ROWS: 2 KiB a stage

    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < FP8_STAGES; ++s) {
            mbarrier_init(&full[s], 1);
            mbarrier_init(&empty[s], FP8_MATH_WARPGROUPS * FP8_CLUSTER);
        }
        sm90_mailboxes_init(&mail, 128 * FP8_MATH_WARPGROUPS + FP8_LOADERS - 1);  // the b loader reads them too
#if FP8_CLUSTER == 2
        pair_mailbox_init(&pairs);
#endif
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    // The schedule in shared memory where it fits (as grouped_gemm_sm90.cu's
    // v14), after the staging areas: the load thread's search per tile then
    // waits on no global load.
    if (num_groups <= FP8_TABLE_MAX_GROUPS) {
        int* table = reinterpret_cast<int*>(ring + FP8_STAGES * FP8_STAGE_BYTES + 2 * SM90_C_STAGE_ELEMS * 2);
        for (int i = threadIdx.x; i <= num_groups; i += FP8_THREADS) table[i] = tile_offsets[i];
        for (int i = threadIdx.x; i < num_groups; i += FP8_THREADS) {
            table[num_groups + 1 + i] = row_offsets[i];
            table[2 * num_groups + 1 + i] = row_ends[i];
        }
        tile_offsets = table;
        row_offsets = table + num_groups + 1;
        row_ends = table + 2 * num_groups + 1;
    }
    __syncthreads();  // the last block-wide barrier: the roles split below
#if FP8_CLUSTER == 2
    cluster_sync();  // the partner's barriers are initialized before any multicast or remote arrival
#endif

    const int warpgroup = threadIdx.x / 128;
    if (warpgroup == 0) {
#if FP8_OVERLAP || FP8_BLOCK_N == 192
        // The load warpgroup gives registers to the math warpgroups' second
        // fragment: 128 x 40 + 256 x 232 = 64,512 of the SM's 65,536.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
#endif
        if (threadIdx.x == 0) {
            const int rank = FP8_RANK;
            unsigned fills = 0;
            long long tile = FP8_FIRST_TILE;
            // A thin tile's 128 rows run as one pass of 64 rows, or two when
            // the group has more: each pass is one work item (j), and
            // `second` marks the item of a tile's second pass.
            bool second = false;
            for (unsigned j = 0;; ++j) {
#if FP8_CLUSTER == 2
                if (rank == 1 && j > 0) tile = pair_mailbox_take(&pairs, j - 1);  // rank 0's draw
#endif
                const int slot = j % SM90_SCHED_SLOTS;
                bool done = !second && tile >= total_tiles;
                sm90_mailbox_claim(&mail, j);
                if (!done) {
                    Fp8Tile w;
                    if (second) {
                        // The first pass's item, still in its slot (only the
                        // claim of item j - 1 + SM90_SCHED_SLOTS reuses it),
                        // moved down 64 rows: no second search, and the load
                        // thread stays within its 40 registers.
                        w = mail_tile[(j - 1) % SM90_SCHED_SLOTS];
                        w.row0 += FP8_TILE_M;
                    } else {
                        w = fp8_find_tile(tile, n_tiles, row_offsets, row_ends, tile_offsets, num_groups, M, N,
                                          rank);
#if FP8_FOLD_ROWS
                        // A tail tile whose rows the tile before computes (its
                        // fold): nothing to load or post; the next tile instead.
                        while (w.skip && !done) {
                            tile = static_cast<long long>(FP8_TILE_STRIDE) + atomicAdd(tile_counter, 1);
                            done = tile >= total_tiles;
                            if (!done) {
                                w = fp8_find_tile(tile, n_tiles, row_offsets, row_ends, tile_offsets, num_groups, M,
                                                  N, rank);
                            }
                        }
#endif
                    }
                    w.a_rows = max(0, min(FP8_TILE_M, w.row_end - w.row0));
                    mail_tile[slot] = w;  // seen by the readers through the post's release
                }
                sm90_mailbox_post(&mail, j, done ? -1 : tile);
                if (done) {
                    allow_next_grid();  // this CTA's last loads are issued
                    break;
                }
                {
                    const Fp8Tile w = mail_tile[slot];  // read back after the post's memory clobber
                    const bool more = FP8_THIN && !second && w.row_end - w.row0 > FP8_TILE_M;
                    const int stage_bytes = fp8_stage_bytes(w);
                    // The next tile taken FP8_STAGES stages before the last
                    // pass's last loads: the atomic's latency hides behind
                    // their waits (and, with clusters, the post's behind
                    // rank 1's last loads).
                    const int take_at = more ? -1 : num_k > FP8_STAGES ? num_k - FP8_STAGES : 0;
                    long long next = tile;
                    for (int kt = 0; kt < num_k; ++kt) {
                        if (kt == take_at && rank == 0) {
                            next = static_cast<long long>(FP8_TILE_STRIDE) + atomicAdd(tile_counter, 1);
#if FP8_CLUSTER == 2
                            pair_mailbox_post(&pairs, j, next);
#endif
                        }
                        const unsigned f = fills + kt;
                        const int s = f % FP8_STAGES;
                        mbarrier_wait(&empty[s], ((f / FP8_STAGES) & 1) ^ 1);
                        // Whole boxes count, zero-filled parts included.
                        mbarrier_expect_bytes(&full[s], stage_bytes);
#if FP8_CLUSTER == 2
                        // a into both CTAs: this rank's 64 rows (tmap_a's box), or every other small box.
                        if (w.a_rows > FP8_BLOCK_M / 2) {
                            // (The rank read again here: hoisted, its products spilled the 40 registers.)
                            const int half_rows = FP8_RANK * (FP8_BLOCK_M / 2);
                            tma_load_2d_pair(ring_a + s * FP8_A_STAGE_BYTES + half_rows * FP8_BLOCK_K, &tmap_a,
                                             &full[s], kt * FP8_BLOCK_K, w.row0 + half_rows);
                        } else {
                            for (int ra = FP8_RANK * FP8_A_BOX_ROWS; ra < w.a_rows; ra += 2 * FP8_A_BOX_ROWS) {
                                tma_load_2d_pair(ring_a + s * FP8_A_STAGE_BYTES + ra * FP8_BLOCK_K, &tmap_a_rows,
                                                 &full[s], kt * FP8_BLOCK_K, w.row0 + ra);
                            }
                        }
#else
                        if (FP8_WHOLE_A(w.a_rows)) {  // never in a thin pass (at most 64 rows)
                            tma_load_2d(ring_a + s * FP8_A_STAGE_BYTES, &tmap_a, &full[s], kt * FP8_BLOCK_K, w.row0);
                        } else {
                            for (int ra = 0; ra < w.a_rows; ra += FP8_A_BOX_ROWS) {
                                tma_load_2d(ring_a + s * FP8_A_STAGE_BYTES + ra * FP8_BLOCK_K, &tmap_a_rows,
                                            &full[s], kt * FP8_BLOCK_K, w.row0 + ra);
                            }
                        }
#if FP8_FOLD_ROWS
                        // The fold's rows: one small box (its rows past the
                        // group's end are multiplied, never stored).
                        if (w.fold_rows > 0) {
                            tma_load_2d(ring_f + s * FP8_FOLD_STAGE_BYTES, &tmap_a_rows, &full[s], kt * FP8_BLOCK_K,
                                        w.row0 + FP8_BLOCK_M);
                        }
#endif
#endif
#if FP8_LOADERS == 1
                        fp8_load_b(ring_b + s * FP8_B_STAGE_BYTES, &tmap_b, &full[s], w, kt, N);
#endif
                    }
                    fills += num_k;
                    tile = next;
                    second = more;
                }
            }
        }
#if FP8_LOADERS == 2
        else if (threadIdx.x == 32) {
            // The b loader: each work item's b boxes into the stages thread 0
            // fills with a (same fills, same empty waits; thread 0's
            // arrive.expect_tx counts these bytes too, and a phase cannot
            // complete before that arrival).
            unsigned fills = 0;
            for (unsigned j = 0;; ++j) {
                const long long tile = sm90_mailbox_read(&mail, j);
                Fp8Tile w;
                if (tile >= 0) w = mail_tile[j % SM90_SCHED_SLOTS];
                sm90_mailbox_release(&mail, j);
                if (tile < 0) break;
                for (int kt = 0; kt < num_k; ++kt) {
                    const unsigned f = fills + kt;
                    const int s = f % FP8_STAGES;
                    mbarrier_wait(&empty[s], ((f / FP8_STAGES) & 1) ^ 1);
                    fp8_load_b(ring_b + s * FP8_B_STAGE_BYTES, &tmap_b, &full[s], w, kt, N);
                }
                fills += num_k;
            }
        }
#endif
#if FP8_CLUSTER == 2
        cluster_sync();  // see the end of the kernel
#endif
        return;
    }

    // Math warpgroup w (1 or 2) multiplies rows 64 * (w - 1) .. + 63 of each
    // tile, or (thin tiles) columns 128 * (w - 1) .. + 127 of its 64 rows.
#if FP8_OVERLAP || FP8_BLOCK_N == 192
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
#endif
    const int half = warpgroup - 1;
    // NB, computed after setmaxnreg: computed before the role split, ptxas kept
    // it across the register change in local memory (thin tiles).
    const int n_blocks = (N + FP8_SCALE_BLOCK - 1) / FP8_SCALE_BLOCK;
#if FP8_THIN
    const int row_in = 0, col_in = half * FP8_BLOCK_N;  // this warpgroup's rows and columns in the tile
#else
    const int row_in = half * 64, col_in = 0;
#endif
    const int tid = threadIdx.x & 127;
    const int frag_row = (tid >> 5) * 16 + ((tid & 31) >> 2);  // this thread's first D row in the 64
#if FP8_BLOCK_N == 192
    // Wide tiles: two temporary halves (fp8_wide_k_loop): 192 registers with
    // acc, within the 232 the math warpgroups take (setmaxnreg).
    float acc[96], tmpa[48], tmpb[48];
#pragma unroll
    for (int i = 0; i < 48; ++i) tmpa[i] = tmpb[i] = 0.0f;  // defined before the first MMAs (which ignore them)
#elif FP8_OVERLAP
    // Two temporary fragments: stage kt + 1's MMAs run into one while stage
    // kt's partial sums in the other are promoted, so the tensor cores are
    // not idle during the FFMAs (the serial form waits for its MMAs, then
    // promotes: ncu put the tensor pipe at 49-51% active on Qwen3 16384 and
    // Mixtral 4096, its warps waiting at the wgmma wait).
    float acc[64], tmp0[64], tmp1[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) tmp0[i] = tmp1[i] = 0.0f;  // defined before the first MMAs (which ignore them)
    // The fold's sums and its stage fragment (FP8_FOLD_ROWS; unused without it).
    float facc[8], ftmp[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) facc[i] = ftmp[i] = 0.0f;
#else
    float acc[64], tmp[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) tmp[i] = 0.0f;  // defined before the first MMA (which ignores it)
#endif
    unsigned fills = 0;
    for (unsigned j = 0;; ++j) {
        const long long tile = sm90_mailbox_read(&mail, j);
        Fp8Tile t;
        if (tile >= 0) t = mail_tile[j % SM90_SCHED_SLOTS];  // the load thread's search
        sm90_mailbox_release(&mail, j);
        if (tile < 0) break;
        // This thread's two rows' scales (rows past M read row M - 1's: those
        // rows of a_q are TMA zeros and are never stored) and the tile's B
        // scale row, one float per K block.
        const int r0 = t.row0 + row_in + frag_row;
        const float* sa0 = sa + static_cast<long long>(min(r0, M - 1)) * num_k;
        const float* sa1 = sa + static_cast<long long>(min(r0 + 8, M - 1)) * num_k;
#if FP8_BLOCK_N == 192
        // The tile's two B scale rows (the second clamped: a tile past the
        // last block stores no column there).
        const int nb_lo = min(t.n0 / FP8_SCALE_BLOCK, n_blocks - 1);
        const float* sb_lo = sb + (static_cast<long long>(t.g) * n_blocks + nb_lo) * num_k;
        const float* sb_hi = sb + (static_cast<long long>(t.g) * n_blocks + min(nb_lo + 1, n_blocks - 1)) * num_k;
#pragma unroll
        for (int i = 0; i < 96; ++i) acc[i] = 0.0f;
        if (t.n0 % FP8_SCALE_BLOCK == 0) {
            fp8_wide_k_loop<true>(acc, tmpa, tmpb, full, empty, fills, num_k, ring_a, ring_b, half, tid, sa0, sa1,
                                  sb_lo, sb_hi);
        } else {
            fp8_wide_k_loop<false>(acc, tmpa, tmpb, full, empty, fills, num_k, ring_a, ring_b, half, tid, sa0, sa1,
                                   sb_lo, sb_hi);
        }
#else
        // (A thin tile's second half may lie wholly past N: its columns are
        // never stored, and its scale row is the last one, not past it.)
        const int nb_row = min((t.n0 + col_in) / FP8_SCALE_BLOCK, n_blocks - 1);
        const float* sbt = sb + (static_cast<long long>(t.g) * n_blocks + nb_row) * num_k;
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

#if FP8_OVERLAP
#if FP8_FOLD_ROWS
        if (t.fold_rows > 0) {
            // The thread's first fold row (fq; fp8_fold_scales has the others).
            const int fq = t.row0 + FP8_BLOCK_M + 2 * (tid & 3);
#pragma unroll
            for (int i = 0; i < 8; ++i) facc[i] = 0.0f;
            fp8_k_walk<true>(acc, tmp0, tmp1, facc, ftmp, full, empty, fills, num_k, ring_a, ring_b, ring_f, half,
                             tid, sa0, sa1, sbt, sa + static_cast<long long>(fq) * num_k, t.row_end - fq);
        } else {
            fp8_k_walk<false>(acc, tmp0, tmp1, facc, ftmp, full, empty, fills, num_k, ring_a, ring_b, ring_f, half,
                              tid, sa0, sa1, sbt, sa, 0);
        }
#else
        fp8_k_walk<false>(acc, tmp0, tmp1, facc, ftmp, full, empty, fills, num_k, ring_a, ring_b, ring_f, half, tid,
                          sa0, sa1, sbt, sa, 0);
#endif
#else
        float a0 = load_scale(sa0), a1 = load_scale(sa1), b = load_scale(sbt);
        for (int kt = 0; kt < num_k; ++kt) {
            const unsigned f = fills + kt;
            fp8_issue_stage(tmp, full, f, ring_a, ring_b, half);
            // The next stage's scales, loaded while this stage's MMAs run (the
            // last stage reloads its own: harmless, and branch-free).
            const int kn = min(kt + 1, num_k - 1);
            const float na0 = load_scale(sa0 + kn), na1 = load_scale(sa1 + kn), nb = load_scale(sbt + kn);
            wgmma_wait<0>();
            // The stage is read: the load thread may refill it while we promote.
            if (tid == 0) fp8_release(&empty[f % FP8_STAGES]);
            fp8_promote(acc, tmp, a0 * b, a1 * b);  // rows frag_row and frag_row + 8
            a0 = na0;
            a1 = na1;
            b = nb;
        }
#endif
#endif  // FP8_BLOCK_N == 192
        fills += num_k;

        // The store: 2 passes (wide tiles 3) of 64 columns through this warpgroup's staging area.
        bf16_t* stage = reinterpret_cast<bf16_t*>(ring + FP8_STAGES * FP8_STAGE_BYTES) + half * SM90_C_STAGE_ELEMS;
        const int r_first = t.row0 + row_in;
#pragma unroll
        for (int p = 0; p < FP8_BLOCK_N / 64; ++p) {
            const int c0 = t.n0 + col_in + 64 * p;
#if !FP8_THIN
            if (c0 >= N) break;  // the same for the whole warpgroup
#endif
            // (Thin tiles store every pass: the store skips columns past N
            // itself, and the early exit made ptxas spill the math loop.)
            sm90_store_pass(acc, p, stage, out, r_first, t.row_end, c0, N, 1 + half);
        }
#if FP8_FOLD_ROWS
        if (t.fold_rows > 0) {
            // The fold's rows, from the registers: facc[4 jn + 2 h + e] is tile
            // column 64 half + frag_row + 8 h of the fold's row 8 jn + 2 (lane
            // % 4) + e. Lanes l and l ^ 4 hold neighbouring columns of the
            // same rows: each hands the other one value, so that each stores
            // a pair of columns of one row (4 bytes), as the bf16 kernel's fold.
            const int lane = tid & 31, fold_row0 = t.row0 + FP8_BLOCK_M;
            const bool even = ((lane >> 2) & 1) == 0;
#pragma unroll
            for (int jn = 0; jn < 2; ++jn) {
                const int ra = fold_row0 + 8 * jn + 2 * (lane & 3);  // this thread's two rows: ra, ra + 1
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int i = 4 * jn + 2 * h, col = t.n0 + 64 * half + frag_row + 8 * h;
                    const float va = facc[i], vb = facc[i + 1];
                    const float got = __shfl_xor_sync(0xffffffffu, even ? vb : va, 4);
                    const int row = even ? ra : ra + 1, c = even ? col : col - 1;
                    if (row < t.row_end && c < N) {  // N is even: both columns or neither
                        *reinterpret_cast<unsigned*>(out + static_cast<long long>(row) * N + c) =
                            even ? pack_pair(bf16_t{}, va, got) : pack_pair(bf16_t{}, got, vb);
                    }
                }
            }
        }
#endif
    }
#if FP8_CLUSTER == 2
    // No CTA of a pair exits while the other may still multicast into its
    // shared memory or arrive on its barriers (every thread of both CTAs).
    cluster_sync();
#endif
}
