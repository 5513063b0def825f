// activation.cu: the elementwise step between the two expert GEMMs: optional
// per-expert bias, then SiLU / GELU / ReLU, gated (act(gate) * up) or not.
//
// Kernel (X = float / f16_t / bf16_t, names suffixed _f32 / _f16 / _bf16):
//
//   expert_activation_{f32,f16,bf16}(const X* h, int inter, int gated,
//                                    int gate_up_block, int act,
//                                    const X* bias, const int* row_to_pair,
//                                    const int* topk_ids, int num_rows, X* out)
//     h      [num_rows, W] with W = gated ? 2 * inter : inter (GEMM 1 output;
//            when gated and gate_up_block == 0, columns [0, inter) are the
//            gate, [inter, 2*inter) the up projection; with gate_up_block B
//            > 0 (a multiple of 8 dividing inter), block j of 2B columns is
//            gate columns jB .. jB + B - 1, then up columns jB .. jB + B - 1).
//     bias   [E, W] or null, gate then up (not blocked). Expert of row r: e = topk_ids[row_to_pair[r]]
//            (topk_ids is only read when bias is non-null).
//     act    ACT_SILU: SiLU z * sigmoid(z); ACT_GELU: exact GELU
//            0.5 z (1 + erf(z / sqrt 2)); ACT_RELU: ReLU (NaN propagates).
//     out    [num_rows, inter]: with z = h[r] (+ bias[e]) in fp32,
//            gated: act(z[:inter]) * z[inter:]; otherwise act(z).
//            Rows with row_to_pair[r] < 0 (padding) are written as zeros.
//     h and out may not overlap.
//
//   Launch: one block per row, grid-stride over rows; any grid size and any
//   block size work.
//   Uses 16-byte loads/stores when inter * sizeof(X) % 16 == 0 and h, out and
//   bias (if given) are 16-byte aligned; scalar accesses otherwise.
//
//   The activation codes ACT_SILU, ACT_GELU and ACT_RELU are shared with the
//   launcher, which passes them as NVRTC defines (required, no defaults).

#include "common.cuh"

#if !defined(ACT_SILU) || !defined(ACT_GELU) || !defined(ACT_RELU)
#error "ACT_SILU, ACT_GELU and ACT_RELU are not all defined: the launcher passes them as NVRTC defines"
#endif
#if ACT_SILU == ACT_GELU || ACT_SILU == ACT_RELU || ACT_GELU == ACT_RELU
#error "the activation codes must differ"
#endif

// Where output column i's gate sits in a row of h, and how far past it its
// up column is: the halves layout (block 0) or blocks of 2B columns.
__device__ __forceinline__ long long gate_col(long long i, long long inter, int block) {
    return block > 0 ? (i / block) * 2 * block + i % block : i;
}
__device__ __forceinline__ long long up_offset(long long inter, int block) { return block > 0 ? block : inter; }

template <class T>
__device__ __forceinline__ void expert_activation_impl(const T* __restrict__ h, int inter, int gated,
                                                       int gate_up_block, int act, const T* __restrict__ bias,
                                                       const int* __restrict__ row_to_pair,
                                                       const int* __restrict__ topk_ids,
                                                       int num_rows, T* __restrict__ out) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    const long long I = inter;
    const long long W = gated ? 2 * I : I;
    // Row starts of h are multiples of W = I or 2I elements, and the up half
    // starts I elements in, so 16-byte alignment of I * sizeof(T) covers all.
    const bool vec = rows_vectorizable<T>(I, h, out, bias);

    for (int r = blockIdx.x; r < num_rows; r += gridDim.x) {
        const int p = row_to_pair[r];
        T* o = out + static_cast<long long>(r) * I;
        if (p < 0) {
            copy_row<T>(o, nullptr, I, vec);
            continue;
        }
        const T* hr = h + static_cast<long long>(r) * W;
        const T* br = bias != nullptr ? bias + static_cast<long long>(topk_ids[p]) * W : nullptr;

        if (vec) {
            constexpr int N = Vec16<T>::N;
            for (long long i = static_cast<long long>(threadIdx.x) * N; i < I;
                 i += static_cast<long long>(blockDim.x) * N) {
                const long long hi = gate_col(i, I, gate_up_block);  // N columns stay in one block
                const Vec16<T> g = load_vec16(hr + hi);
                Vec16<T> u, bg, bu, res;
                if (gated) u = load_vec16(hr + hi + up_offset(I, gate_up_block));
                if (br != nullptr) {
                    bg = load_vec16(br + i);
                    if (gated) bu = load_vec16(br + I + i);
                }
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    float zg = to_float(g.e[k]);
                    if (br != nullptr) zg += to_float(bg.e[k]);
                    float y = apply_act(zg, act);
                    if (gated) {
                        float zu = to_float(u.e[k]);
                        if (br != nullptr) zu += to_float(bu.e[k]);
                        y *= zu;
                    }
                    res.e[k] = from_float<T>(y);
                }
                store_vec16(o + i, res);
            }
        } else {
            for (long long i = threadIdx.x; i < I; i += blockDim.x) {
                const long long hi = gate_col(i, I, gate_up_block);
                float zg = load_as_float(hr + hi);
                if (br != nullptr) zg += load_as_float(br + i);
                float y = apply_act(zg, act);
                if (gated) {
                    float zu = load_as_float(hr + hi + up_offset(I, gate_up_block));
                    if (br != nullptr) zu += load_as_float(br + I + i);
                    y *= zu;
                }
                store_from_float(o + i, y);
            }
        }
    }
}

#define EXPERT_ACTIVATION_PARAMS(X)                                                       \
    (const X* h, int inter, int gated, int gate_up_block, int act, const X* bias,                     \
     const int* row_to_pair, const int* topk_ids, int num_rows, X* out)
DEFINE_KERNEL_3TYPES(expert_activation, EXPERT_ACTIVATION_PARAMS,
                     (h, inter, gated, gate_up_block, act, bias, row_to_pair, topk_ids, num_rows, out))
