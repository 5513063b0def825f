// moe_backward.cu: the elementwise and reduction steps of the MoE layer's
// backward pass (the GEMMs are cuBLAS calls). Every result is owned by one
// thread or summed by one block in a fixed order: no atomics, so two runs give
// the same bits.
//
// Kernels (X = float / f16_t / bf16_t, names suffixed _f32 / _f16 / _bf16):
//
//   expert_activation_backward_{f32,f16,bf16}(
//       const X* g, const X* h, int inter, int gated, int act, const X* bias1,
//       const int* row_to_pair, const int* topk_ids, const float* topk_weights,
//       const X* dy, const X* bias2, int hidden, int top_k, int num_rows,
//       X* dz, X* aw, float* d_weights)
//     The forward computed, per expert-ordered row r of pair p = row_to_pair[r]
//     (token t = p / top_k, expert e = topk_ids[p], weight w = topk_weights[p],
//     1 when topk_weights is null):
//       z = h[r] + bias1[e]                      (h: GEMM 1 output [num_rows, W],
//                                                 W = gated ? 2 * inter : inter)
//       a = gated ? act(z[:I]) * z[I:] : act(z)  (rounded to X: what GEMM 2 read)
//       out[t] += w * (a @ W2[e] + bias2[e])
//     g [num_rows, inter] is the unweighted dY gathered to row r times W2[e]^T.
//     Writes:
//       dz [num_rows, W]:     dLoss/dz = w * g * act'(z) (gated: the gate part
//                             w * g * z_u * act'(z_g), the up part w * g * act(z_g));
//       aw [num_rows, inter]: w * a (the left factor of dW2 = aw^T @ dY rows);
//       d_weights[p]:         dot(g[r], a) + dot(dy[t], bias2[e]) in fp32, the
//                             gradient of w (when d_weights is non-null; bias2
//                             and dy may be null when there is no bias2).
//     Padding rows (row_to_pair[r] < 0) get zeros in dz and aw.
//     act: ACT_SILU, ACT_GELU (exact, erf), ACT_RELU (derivative 0 at 0; NaN
//     propagates). bias1 [E, W] or null.
//     Launch: one block per row, grid-stride over rows; blockDim.x a multiple
//     of 32, at most 1024 (the dot products are block reductions). 16-byte
//     accesses when inter * sizeof(X) % 16 == 0 and g, h, dz, aw and bias1 are
//     16-byte aligned; scalar otherwise. The reduction order depends only on
//     blockDim.x and the path, so it is the same on every run.
//
//   expert_column_sums_{f32,f16,bf16}(
//       const X* src, int width, const int* row_offsets, const int* counts,
//       const int* row_to_pair, const float* weights, int num_experts, X* out)
//     out[e, c] = sum over rows r in [row_offsets[e], row_offsets[e] + counts[e])
//                 of wt(r) * src[r, c], in fp32, rounded once;
//     wt(r) = weights[row_to_pair[r]] when weights is non-null, else 1.
//     Experts with no rows get exact zeros. (Bias gradients: db1 from dz,
//     db2 from the gathered dY with the routing weights.)
//     Launch: grid (any x, num_experts), block (COLSUM_COLS, COLSUM_SLICES):
//     thread (c, s) adds rows s, s + COLSUM_SLICES, ... of its column in order,
//     then slice 0 adds the COLSUM_SLICES partial sums in order. Column tiles
//     are grid-strided over blockIdx.x.
//
// Constants shared with the launcher (NVRTC defines, required, no defaults):
// ACT_SILU, ACT_GELU, ACT_RELU (activation.cu's codes), COLSUM_COLS and
// COLSUM_SLICES (the block shape of expert_column_sums).

#include "common.cuh"

#if !defined(ACT_SILU) || !defined(ACT_GELU) || !defined(ACT_RELU)
#error "ACT_SILU, ACT_GELU and ACT_RELU are not all defined: the launcher passes them as NVRTC defines"
#endif
#if ACT_SILU == ACT_GELU || ACT_SILU == ACT_RELU || ACT_GELU == ACT_RELU
#error "the activation codes must differ"
#endif
#if !defined(COLSUM_COLS) || !defined(COLSUM_SLICES)
#error "COLSUM_COLS and COLSUM_SLICES are not defined: the launcher passes them as NVRTC defines"
#endif
#if COLSUM_COLS < 1 || COLSUM_SLICES < 1 || COLSUM_COLS * COLSUM_SLICES > 1024
#error "COLSUM_COLS * COLSUM_SLICES must be a block of 1 to 1024 threads"
#endif

// act(z) and act'(z) together, as activation.cu computes act(z).
__device__ __forceinline__ void act_and_grad(float z, int act, float* value, float* grad) {
    if (act == ACT_SILU) {
        const float s = 1.0f / (1.0f + expf(-z));
        *value = z / (1.0f + expf(-z));
        *grad = s * (1.0f + z * (1.0f - s));
    } else if (act == ACT_GELU) {
        const float cdf = 0.5f * (1.0f + erff(z * 0.70710678118654752f));
        *value = 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
        *grad = cdf + z * 0.39894228040143268f * expf(-0.5f * z * z);  // Phi(z) + z phi(z)
    } else {
        *value = z < 0.0f ? 0.0f : z;                     // NaN stays NaN
        *grad = z > 0.0f ? 1.0f : (z <= 0.0f ? 0.0f : z);  // 0 at 0; NaN stays NaN
    }
}

// One element of a row: returns the product g * a (for the dot) and writes
// dz (gate part, and up part when gated) and w * a.
template <class T>
__device__ __forceinline__ float act_backward_elem(float gi, float zg, float zu, int gated, int act, float w,
                                                   float* dzg, float* dzu, float* awi) {
    float v, d;
    act_and_grad(zg, act, &v, &d);
    const float a = to_float(from_float<T>(gated ? v * zu : v));  // what GEMM 2 read
    const float da = w * gi;
    *dzg = gated ? da * zu * d : da * d;
    *dzu = da * v;
    *awi = w * a;
    return gi * a;
}

// Sum of one float per thread over the block, the same order every run.
// blockDim.x a multiple of 32, at most 1024; every thread must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // earlier readers of scratch are done
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < static_cast<int>(blockDim.x >> 5); ++i) total += scratch[i];
    return total;
}

template <class T>
__device__ __forceinline__ void expert_activation_backward_impl(
    const T* __restrict__ g, const T* __restrict__ h, int inter, int gated, int act,
    const T* __restrict__ bias1, const int* __restrict__ row_to_pair, const int* __restrict__ topk_ids,
    const float* __restrict__ topk_weights, const T* __restrict__ dy, const T* __restrict__ bias2,
    int hidden, int top_k, int num_rows, T* __restrict__ dz, T* __restrict__ aw,
    float* __restrict__ d_weights) {
    __shared__ float scratch[32];
    const long long I = inter;
    const long long W = gated ? 2 * I : I;
    // Row starts are multiples of I or 2I elements and the up half starts I
    // in, so 16-byte alignment of I * sizeof(T) and of the bases covers all.
    const bool vec = rows_vectorizable<T>(I, g, h, dz) && rows_vectorizable<T>(I, aw, bias1);

    for (int r = blockIdx.x; r < num_rows; r += gridDim.x) {
        const int p = row_to_pair[r];
        T* dzr = dz + static_cast<long long>(r) * W;
        T* awr = aw + static_cast<long long>(r) * I;
        if (p < 0) {
            copy_row<T>(dzr, nullptr, W, vec);
            copy_row<T>(awr, nullptr, I, vec);
            continue;
        }
        const int e = topk_ids[p];
        const float w = topk_weights != nullptr ? topk_weights[p] : 1.0f;
        const T* gr = g + static_cast<long long>(r) * I;
        const T* hr = h + static_cast<long long>(r) * W;
        const T* br = bias1 != nullptr ? bias1 + static_cast<long long>(e) * W : nullptr;
        float dot = 0.0f;
        if (vec) {
            constexpr int N = Vec16<T>::N;
            for (long long i = static_cast<long long>(threadIdx.x) * N; i < I;
                 i += static_cast<long long>(blockDim.x) * N) {
                const Vec16<T> gv = load_vec16(gr + i), zgv = load_vec16(hr + i);
                Vec16<T> zuv, bg, bu, dg, du, av;
                if (gated) zuv = load_vec16(hr + I + i);
                if (br != nullptr) {
                    bg = load_vec16(br + i);
                    if (gated) bu = load_vec16(br + I + i);
                }
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    float zg = to_float(zgv.e[k]), zu = 0.0f;
                    if (br != nullptr) zg += to_float(bg.e[k]);
                    if (gated) zu = to_float(zuv.e[k]) + (br != nullptr ? to_float(bu.e[k]) : 0.0f);
                    float a, b, c;
                    dot += act_backward_elem<T>(to_float(gv.e[k]), zg, zu, gated, act, w, &a, &b, &c);
                    dg.e[k] = from_float<T>(a);
                    du.e[k] = from_float<T>(b);
                    av.e[k] = from_float<T>(c);
                }
                store_vec16(dzr + i, dg);
                if (gated) store_vec16(dzr + I + i, du);
                store_vec16(awr + i, av);
            }
        } else {
            for (long long i = threadIdx.x; i < I; i += blockDim.x) {
                float zg = load_as_float(hr + i), zu = 0.0f;
                if (br != nullptr) zg += load_as_float(br + i);
                if (gated) zu = load_as_float(hr + I + i) + (br != nullptr ? load_as_float(br + I + i) : 0.0f);
                float a, b, c;
                dot += act_backward_elem<T>(load_as_float(gr + i), zg, zu, gated, act, w, &a, &b, &c);
                store_from_float(dzr + i, a);
                if (gated) store_from_float(dzr + I + i, b);
                store_from_float(awr + i, c);
            }
        }
        if (d_weights == nullptr) continue;  // uniform across the block: no barrier is skipped by some
        if (bias2 != nullptr) {
            const T* dyr = dy + static_cast<long long>(p / top_k) * hidden;
            const T* b2r = bias2 + static_cast<long long>(e) * hidden;
            for (long long i = threadIdx.x; i < hidden; i += blockDim.x)
                dot += load_as_float(dyr + i) * load_as_float(b2r + i);
        }
        const float total = block_sum(dot, scratch);
        if (threadIdx.x == 0) d_weights[p] = total;
    }
}

template <class T>
__device__ __forceinline__ void expert_column_sums_impl(const T* __restrict__ src, int width,
                                                        const int* __restrict__ row_offsets,
                                                        const int* __restrict__ counts,
                                                        const int* __restrict__ row_to_pair,
                                                        const float* __restrict__ weights, int num_experts,
                                                        T* __restrict__ out) {
    __shared__ float partial[COLSUM_SLICES][COLSUM_COLS];
    const int e = blockIdx.y;
    if (e >= num_experts) return;
    const long long first = row_offsets[e];
    const long long rows = counts[e];
    for (long long tile = static_cast<long long>(blockIdx.x) * COLSUM_COLS; tile < width;
         tile += static_cast<long long>(gridDim.x) * COLSUM_COLS) {
        const long long c = tile + threadIdx.x;
        float acc = 0.0f;
        if (c < width) {
            for (long long i = threadIdx.y; i < rows; i += COLSUM_SLICES) {
                const long long r = first + i;
                const float v = load_as_float(src + r * width + c);
                acc += weights != nullptr ? weights[row_to_pair[r]] * v : v;
            }
        }
        __syncthreads();  // the previous tile's readers of partial are done
        partial[threadIdx.y][threadIdx.x] = acc;
        __syncthreads();
        if (threadIdx.y == 0 && c < width) {
            float total = 0.0f;
#pragma unroll
            for (int s = 0; s < COLSUM_SLICES; ++s) total += partial[s][threadIdx.x];
            store_from_float(out + static_cast<long long>(e) * width + c, total);
        }
    }
}

#define ACTIVATION_BACKWARD_PARAMS(X)                                                                      \
    (const X* g, const X* h, int inter, int gated, int act, const X* bias1, const int* row_to_pair,     \
     const int* topk_ids, const float* topk_weights, const X* dy, const X* bias2, int hidden, int top_k, \
     int num_rows, X* dz, X* aw, float* d_weights)
DEFINE_KERNEL_3TYPES(expert_activation_backward, ACTIVATION_BACKWARD_PARAMS,
                     (g, h, inter, gated, act, bias1, row_to_pair, topk_ids, topk_weights, dy, bias2, hidden,
                      top_k, num_rows, dz, aw, d_weights))

#define COLUMN_SUMS_PARAMS(X)                                                                       \
    (const X* src, int width, const int* row_offsets, const int* counts, const int* row_to_pair, \
     const float* weights, int num_experts, X* out)
DEFINE_KERNEL_3TYPES(expert_column_sums, COLUMN_SUMS_PARAMS,
                     (src, width, row_offsets, counts, row_to_pair, weights, num_experts, out))
