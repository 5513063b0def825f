// combine.cu: back from expert order to token order after GEMM 2.
//
// Kernels (X = float / f16_t / bf16_t, names suffixed _f32 / _f16 / _bf16):
//
//   combine_rows_{f32,f16,bf16}(const X* y, int hidden, const int* pair_to_row,
//                               const float* topk_weights, const int* topk_ids,
//                               const X* bias, int num_tokens, int top_k, X* out)
//     y            [num_rows, hidden], expert-ordered GEMM 2 output.
//     pair_to_row  [num_tokens * top_k]; -1 (a dropped pair) contributes
//                  nothing; -2 - j' (a repeat, see dispatch.cu) reads the row
//                  of the same token's choice j' < j, with this pair's weight.
//     topk_weights [num_tokens, top_k] fp32, or null for weight 1.
//     topk_ids     [num_tokens, top_k], read only when bias is non-null.
//     bias         [E, hidden] or null.
//     out          [num_tokens, hidden]:
//                  out[t] = sum_{j = 0..k-1, in order} w[t, j] *
//                           (y[pair_to_row[t*k + j]] + bias[ids[t*k + j]])
//                  accumulated in fp32 and rounded once. Each output element
//                  is owned by one thread: no atomics, bitwise deterministic.
//     out may not overlap y.
//
//   sum_rows_{f32,f16,bf16}(const X* y, int hidden, const int* pair_to_row,
//                           int num_tokens, int top_k, X* out)
//     The combine after a GEMM 2 whose epilogue applied the routing weights
//     and b2 (each row already holds w * (row @ W2 + b2), its token's repeats
//     of the expert added into its weight): out[t] = sum_{j = 0..k-1, in
//     order} y[pair_to_row[t*k + j]], where pair_to_row[t*k + j] >= 0;
//     dropped pairs and repeats (negative entries) add nothing. fp32
//     accumulation, one rounding, no atomics: bitwise deterministic.
//
//   scatter_rows_{f32,f16,bf16}(const X* y, int hidden, const int* pair_to_row,
//                               int num_pairs, X* out)
//     out [num_pairs, hidden]: out[p] = y[pair_to_row[p]] bit for bit, zeros
//     where pair_to_row[p] < 0.
//
//   Launch (all three): one block per output row, grid-stride over rows; any grid
//   size and any block size work. 16-byte loads/stores when
//   hidden * sizeof(X) % 16 == 0 and y, out and bias (if given) are 16-byte
//   aligned; scalar otherwise.

#include "common.cuh"

// Choices whose rows the vector path loads together (registers: two 16-byte
// vectors each, for the row and its bias).
#define COMBINE_BATCH 8

// Row of the choice j of the token whose first pair is pair0, following a
// repeat's alias to the row of its first choice; negative when the pair
// adds nothing.
__device__ __forceinline__ int choice_row(const int* __restrict__ pair_to_row, long long pair0, int j) {
    const int row = pair_to_row[pair0 + j];
    if (row >= -1) return row;
    const int first = -2 - row;
    return first < j ? pair_to_row[pair0 + first] : -1;
}

// WEIGHTED: combine_rows (weights, bias, repeats read through their alias);
// else sum_rows (rows taken as they are, negative entries add nothing).
template <class T, bool WEIGHTED>
__device__ __forceinline__ void combine_impl(const T* __restrict__ y, int hidden,
                                             const int* __restrict__ pair_to_row,
                                             const float* __restrict__ topk_weights,
                                             const int* __restrict__ topk_ids,
                                             const T* __restrict__ bias, int num_tokens,
                                             int top_k, T* __restrict__ out) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    const long long H = hidden;
    const bool vec = rows_vectorizable<T>(H, y, out, bias);

    for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        const long long pair0 = static_cast<long long>(t) * top_k;
        T* o = out + t * H;
        // The k rows' indices, weights and ids are the same for every thread
        // of the block: these loads are broadcasts served by L1.
        if (vec) {
            constexpr int N = Vec16<T>::N;
            for (long long i = static_cast<long long>(threadIdx.x) * N; i < H;
                 i += static_cast<long long>(blockDim.x) * N) {
                float acc[N];
#pragma unroll
                for (int k = 0; k < N; ++k) acc[k] = 0.0f;
                // COMBINE_BATCH choices at a time: their indices first, then all
                // their rows' loads, then the adds in choice order (the same
                // arithmetic as one choice at a time). Loading a row only after
                // the previous one was added cost a memory latency per choice
                // (sum_rows at 16 tokens x 8 choices: 10.5 us under ncu, H200).
                for (int j0 = 0; j0 < top_k; j0 += COMBINE_BATCH) {
                    int rows[COMBINE_BATCH];
                    float ws[COMBINE_BATCH];
#pragma unroll
                    for (int jj = 0; jj < COMBINE_BATCH; ++jj) {
                        const int j = j0 + jj;
                        rows[jj] = -1;
                        ws[jj] = 1.0f;
                        if (j < top_k) {
                            const int row = WEIGHTED ? choice_row(pair_to_row, pair0, j) : pair_to_row[pair0 + j];
                            rows[jj] = row;
                            if (WEIGHTED && topk_weights != nullptr) ws[jj] = topk_weights[pair0 + j];
                        }
                    }
                    Vec16<T> v[COMBINE_BATCH], b[COMBINE_BATCH];
#pragma unroll
                    for (int jj = 0; jj < COMBINE_BATCH; ++jj) {
                        if (rows[jj] < 0) continue;
                        v[jj] = load_vec16(y + rows[jj] * H + i);
                        if (WEIGHTED && bias != nullptr) b[jj] = load_vec16(bias + topk_ids[pair0 + j0 + jj] * H + i);
                    }
#pragma unroll
                    for (int jj = 0; jj < COMBINE_BATCH; ++jj) {
                        if (rows[jj] < 0) continue;
                        const float w = ws[jj];
                        if (WEIGHTED && bias != nullptr) {
#pragma unroll
                            for (int k = 0; k < N; ++k) acc[k] += w * (to_float(v[jj].e[k]) + to_float(b[jj].e[k]));
                        } else {
#pragma unroll
                            for (int k = 0; k < N; ++k) acc[k] += w * to_float(v[jj].e[k]);
                        }
                    }
                }
                Vec16<T> res;
#pragma unroll
                for (int k = 0; k < N; ++k) res.e[k] = from_float<T>(acc[k]);
                store_vec16(o + i, res);
            }
        } else {
            for (long long i = threadIdx.x; i < H; i += blockDim.x) {
                float acc = 0.0f;
                for (int j = 0; j < top_k; ++j) {
                    const int row = WEIGHTED ? choice_row(pair_to_row, pair0, j) : pair_to_row[pair0 + j];
                    if (row < 0) continue;
                    const float w = WEIGHTED && topk_weights != nullptr ? topk_weights[pair0 + j] : 1.0f;
                    float v = load_as_float(y + row * H + i);
                    if (WEIGHTED && bias != nullptr) v += load_as_float(bias + topk_ids[pair0 + j] * H + i);
                    acc += w * v;
                }
                store_from_float(o + i, acc);
            }
        }
    }
}

template <class T>
__device__ __forceinline__ void scatter_rows_impl(const T* __restrict__ y, int hidden,
                                                  const int* __restrict__ pair_to_row,
                                                  int num_pairs, T* __restrict__ out) {
    const bool vec = rows_vectorizable<T>(hidden, y, out);
    for (int p = blockIdx.x; p < num_pairs; p += gridDim.x) {
        const int row = pair_to_row[p];
        const T* src = row >= 0 ? y + static_cast<long long>(row) * hidden : nullptr;
        copy_row(out + static_cast<long long>(p) * hidden, src, hidden, vec);
    }
}

#define COMBINE_ROWS_PARAMS(X)                                                         \
    (const X* y, int hidden, const int* pair_to_row, const float* topk_weights,        \
     const int* topk_ids, const X* bias, int num_tokens, int top_k, X* out)
template <class T>
__device__ __forceinline__ void combine_rows_impl(const T* __restrict__ y, int hidden,
                                                  const int* __restrict__ pair_to_row,
                                                  const float* __restrict__ topk_weights,
                                                  const int* __restrict__ topk_ids,
                                                  const T* __restrict__ bias, int num_tokens, int top_k,
                                                  T* __restrict__ out) {
    combine_impl<T, true>(y, hidden, pair_to_row, topk_weights, topk_ids, bias, num_tokens, top_k, out);
}

template <class T>
__device__ __forceinline__ void sum_rows_impl(const T* __restrict__ y, int hidden,
                                              const int* __restrict__ pair_to_row, int num_tokens, int top_k,
                                              T* __restrict__ out) {
    combine_impl<T, false>(y, hidden, pair_to_row, nullptr, nullptr, nullptr, num_tokens, top_k, out);
}

DEFINE_KERNEL_3TYPES(combine_rows, COMBINE_ROWS_PARAMS,
                     (y, hidden, pair_to_row, topk_weights, topk_ids, bias, num_tokens, top_k, out))

#define SUM_ROWS_PARAMS(X) (const X* y, int hidden, const int* pair_to_row, int num_tokens, int top_k, X* out)
DEFINE_KERNEL_3TYPES(sum_rows, SUM_ROWS_PARAMS, (y, hidden, pair_to_row, num_tokens, top_k, out))

#define SCATTER_ROWS_PARAMS(X) (const X* y, int hidden, const int* pair_to_row, int num_pairs, X* out)
DEFINE_KERNEL_3TYPES(scatter_rows, SCATTER_ROWS_PARAMS, (y, hidden, pair_to_row, num_pairs, out))
