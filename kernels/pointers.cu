// pointers.cu: per-expert row offsets and the device pointer arrays that the
// batched / grouped cuBLAS calls read, built on the GPU from the per-expert
// row counts so that no count has to travel to the host.
//
// Kernel:
//
//   build_pointers(const int* counts, int num_experts, int align,
//                  int chunk_rows, int num_fixed, int capacity,
//                  unsigned long long a_base, long long a_row_bytes, long long a_expert_bytes,
//                  unsigned long long b_base, long long b_row_bytes, long long b_expert_bytes,
//                  unsigned long long c_base, long long c_row_bytes, long long c_expert_bytes,
//                  unsigned long long scratch_c,
//                  unsigned long long* a_ptrs, unsigned long long* b_ptrs,
//                  unsigned long long* c_ptrs, int* row_offsets)
//
//   Launch: exactly ONE block of POINTER_THREADS threads (the kernel scans
//   across the block; any other block count gives wrong results), no dynamic
//   shared memory. Experts are processed in tiles of POINTER_THREADS, so any
//   E works. POINTER_THREADS is shared with the launcher, which passes it as
//   an NVRTC define (required, no default; a multiple of 32, at most 1024).
//
//   Row offset of expert e (first row of its rows in the row buffer):
//     off_e = sum_{j<e} roundup(counts[j], max(align, 1)).
//   row_offsets [E + 1] (skipped when null): off_0 .. off_{E-1}, then the
//   total.
//
//   Problems (one GEMM each), in expert-id order:
//     chunk_rows == 0: one per non-empty expert, starting at row off_e.
//     chunk_rows > 0:  ceil(counts[e] / chunk_rows) per expert, chunk c
//                      starting at row off_e + c * chunk_rows.
//   For problem q at row r of expert e:
//     a_ptrs[q] = a_base + r * a_row_bytes + e * a_expert_bytes
//     b_ptrs[q] = b_base + r * b_row_bytes + e * b_expert_bytes
//     c_ptrs[q] = c_base + r * c_row_bytes + e * c_expert_bytes
//   (the caller zeroes the row or the expert stride of each operand).
//   With P problems in all, entries P .. min(num_fixed, capacity) - 1 (when
//   num_fixed > P) become idle GEMMs: a = a_base, b = b pointer of the last
//   real problem (b_base if none, so idle GEMMs re-read weights already in
//   L2), c = scratch_c.
//
//   capacity: the entries each pointer array holds. No entry at or past it
//   is written, whatever the counts say: problems q >= capacity are left
//   out (with chunk_rows = align, problem q covers rows [q * chunk_rows,
//   (q + 1) * chunk_rows), so a caller whose row buffer holds
//   capacity * chunk_rows rows drops exactly those rows too; see
//   assign_rows in dispatch.cu).

#include "common.cuh"

#ifndef POINTER_THREADS
#error "POINTER_THREADS is not defined: the launcher passes it as an NVRTC define"
#endif
#if POINTER_THREADS % 32 != 0 || POINTER_THREADS > 1024
#error "POINTER_THREADS must be a multiple of 32 up to 1024"
#endif

extern "C" __global__ void __launch_bounds__(POINTER_THREADS)
    build_pointers(const int* __restrict__ counts, int num_experts, int align, int chunk_rows,
                   int num_fixed, int capacity, unsigned long long a_base,
                   long long a_row_bytes, long long a_expert_bytes, unsigned long long b_base,
                   long long b_row_bytes, long long b_expert_bytes, unsigned long long c_base,
                   long long c_row_bytes, long long c_expert_bytes, unsigned long long scratch_c,
                   unsigned long long* __restrict__ a_ptrs, unsigned long long* __restrict__ b_ptrs,
                   unsigned long long* __restrict__ c_ptrs, int* __restrict__ row_offsets) {
    __shared__ int scratch[SCAN_SCRATCH_INTS];
    // Per tile: the first problem and the first row of each expert of the
    // tile, plus a sentinel, so that the tile's problems can be spread
    // evenly over the threads (one expert may own thousands of chunks).
    __shared__ int tile_prob[POINTER_THREADS + 1];
    __shared__ int tile_off[POINTER_THREADS];

    if (align < 1) align = 1;
    const int tid = threadIdx.x;
    int row_carry = 0;   // rows before the current tile
    int prob_carry = 0;  // problems before the current tile

    for (int tile = 0; tile < num_experts; tile += POINTER_THREADS) {
        const int e = tile + tid;
        const int c = e < num_experts ? counts[e] : 0;
        const int rows = (c + align - 1) / align * align;
        int nprob;
        if (chunk_rows > 0) {
            nprob = (c + chunk_rows - 1) / chunk_rows;
        } else {
            nprob = c > 0 ? 1 : 0;
        }
        int rows_total, prob_total;
        const int rows_ex = block_exclusive_scan(rows, &rows_total, scratch);
        const int prob_ex = block_exclusive_scan(nprob, &prob_total, scratch);

        const int off = row_carry + rows_ex;
        if (e < num_experts && row_offsets != nullptr) row_offsets[e] = off;
        tile_off[tid] = off;
        tile_prob[tid] = prob_carry + prob_ex;
        if (tid == 0) tile_prob[POINTER_THREADS] = prob_carry + prob_total;
        __syncthreads();

        // Emit the tile's problems, one per thread in turn. Problem q
        // belongs to the last expert s of the tile with
        // tile_prob[s] <= q (binary search; empty experts have
        // tile_prob[s] == tile_prob[s + 1] and are skipped by taking the
        // last such s).
        const int q_end = min(prob_carry + prob_total, capacity);
        for (int q = prob_carry + tid; q < q_end; q += POINTER_THREADS) {
            int lo = 0, hi = POINTER_THREADS - 1;
            while (lo < hi) {
                const int mid = (lo + hi + 1) >> 1;
                if (tile_prob[mid] <= q) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            const long long ex = tile + lo;
            const long long chunk = q - tile_prob[lo];
            const long long r =
                static_cast<long long>(tile_off[lo]) + chunk * static_cast<long long>(chunk_rows);
            a_ptrs[q] = a_base + static_cast<unsigned long long>(r * a_row_bytes + ex * a_expert_bytes);
            b_ptrs[q] = b_base + static_cast<unsigned long long>(r * b_row_bytes + ex * b_expert_bytes);
            c_ptrs[q] = c_base + static_cast<unsigned long long>(r * c_row_bytes + ex * c_expert_bytes);
        }

        row_carry += rows_total;
        prob_carry += prob_total;
        __syncthreads();  // tile_* are rewritten by the next tile
    }

    if (tid == 0 && row_offsets != nullptr) {
        row_offsets[num_experts] = row_carry;
    }

    const int idle_end = min(num_fixed, capacity);
    if (idle_end > prob_carry) {
        // __syncthreads makes this block's global writes above visible to
        // all of its threads (the last loop iteration ended with one).
        const unsigned long long idle_b = prob_carry > 0 ? b_ptrs[prob_carry - 1] : b_base;
        for (int q = prob_carry + tid; q < idle_end; q += POINTER_THREADS) {
            a_ptrs[q] = a_base;
            b_ptrs[q] = idle_b;
            c_ptrs[q] = scratch_c;
        }
    }
}
