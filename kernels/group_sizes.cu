// group_sizes.cu: device-resident group sizes (gmm's group_sizes on the GPU)
// made safe for the Hopper kernel's schedule, on the device, without a copy to
// the host.
//
// Kernels:
//
//   clamp_group_sizes_{i32,i64}(const T* sizes, int num_groups, int total_rows,
//                               int* out)
//     ONE block of SIZES_THREADS threads (a multiple of 32, at most 1024; the
//     block scans across itself, tile by tile, so any num_groups works).
//     With m_g = min(max(sizes[g], 0), total_rows) (sizes read as signed) and
//     P_g = m_0 + ... + m_g (64-bit: no overflow for any int32 or int64
//     input), out[g] = min(P_g, M) - min(P_g - m_g, M), M = total_rows: the
//     rows of group g that lie inside [0, M) when the groups are laid out
//     back to back. So out[g] >= 0, the outs sum to min(sum of m_g, M) <= M,
//     and every group's rows (and so every tile the GEMM computes from them)
//     start and end inside the array: a size sum past M, a negative size or a
//     huge one can neither make the GEMM read or write past row M nor
//     overflow the int32 offsets the schedule kernel computes from out.
//     Sizes that are valid (non-negative, summing to M) come out unchanged.

#include "common.cuh"

#if !defined(SIZES_THREADS)
#error "group_sizes.cu needs SIZES_THREADS from its launcher"
#endif
#if SIZES_THREADS % 32 != 0 || SIZES_THREADS > 1024
#error "SIZES_THREADS must be a multiple of 32, at most 1024"
#endif

__device__ __forceinline__ long long warp_inclusive_scan_ll(long long v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const long long n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

template <class T>
__device__ __forceinline__ void clamp_group_sizes(const T* __restrict__ sizes, int num_groups, int total_rows,
                                                  int* __restrict__ out) {
    __shared__ long long warp_sums[32];
    __shared__ long long tile_total;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long M = total_rows > 0 ? total_rows : 0;
    long long carry = 0;  // the clamped rows of every group before this tile
    for (int base = 0; base < num_groups; base += SIZES_THREADS) {
        const int g = base + threadIdx.x;
        long long m = 0;
        if (g < num_groups) {
            const long long s = static_cast<long long>(sizes[g]);
            m = s < 0 ? 0 : (s > M ? M : s);
        }
        const long long inc = warp_inclusive_scan_ll(m);
        __syncthreads();  // the previous tile's readers of warp_sums are done
        if (lane == 31) warp_sums[warp] = inc;
        __syncthreads();
        if (warp == 0) {
            const long long w = lane < SIZES_THREADS / 32 ? warp_sums[lane] : 0;
            const long long wi = warp_inclusive_scan_ll(w);
            if (lane < SIZES_THREADS / 32) warp_sums[lane] = wi - w;  // each warp's exclusive offset
            if (lane == 31) tile_total = wi;
        }
        __syncthreads();
        const long long end = carry + warp_sums[warp] + inc;  // rows through group g
        if (g < num_groups) {
            const long long hi = end < M ? end : M;
            const long long lo = end - m < M ? end - m : M;
            out[g] = static_cast<int>(hi - lo);
        }
        carry += tile_total;
    }
}

extern "C" __global__ void __launch_bounds__(SIZES_THREADS)
    clamp_group_sizes_i32(const int* __restrict__ sizes, int num_groups, int total_rows, int* __restrict__ out) {
    clamp_group_sizes<int>(sizes, num_groups, total_rows, out);
}

extern "C" __global__ void __launch_bounds__(SIZES_THREADS)
    clamp_group_sizes_i64(const long long* __restrict__ sizes, int num_groups, int total_rows,
                          int* __restrict__ out) {
    clamp_group_sizes<long long>(sizes, num_groups, total_rows, out);
}
