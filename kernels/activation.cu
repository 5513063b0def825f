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
//   expert_activation_fp8_{f32,f16,bf16}(const X* h, int inter, int gated,
//                                        int gate_up_block, int act,
//                                        const X* bias, const int* row_to_pair,
//                                        const int* topk_ids, int num_rows,
//                                        unsigned char* out_q, float* out_s)
//     The same activation, written as the FP8 GEMM's A operand instead of
//     as X: out_q [num_rows, inter] e4m3 codes and out_s [num_rows,
//     ceil(inter / 128)] fp32 scales, bit for bit what quantize_rows_fp8
//     (fp8.cu) writes for the `out` that expert_activation writes (each
//     value computed as there, rounded to X as there, and that X value
//     quantized by fp8.cuh's rule). Padding rows: codes 0, scales 1 (zeros
//     quantized).
//     Saves the quantize launch between the activation and the FP8 GEMM 2.
//     Launch: one block per row, grid-stride over rows; any grid size, any
//     block size that is a multiple of 32 (warps reduce each 128-column
//     block's amax). Eight columns per lane, a half-warp per 128 columns
//     (16-byte loads of h and bias, two for float; 8-byte code stores) when
//     inter % 8 == 0, h and bias are 16-byte aligned and out_q 8-byte
//     aligned; a warp per 128 columns, one element per access, otherwise.
//
//   The activation codes ACT_SILU, ACT_GELU and ACT_RELU are shared with the
//   launcher, which passes them as NVRTC defines (required, no defaults).

#include "common.cuh"
#include "fp8.cuh"

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
    lead_next_grid();  // the MoE step's launches overlap; GEMM 2 may start early (common.cuh)
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

// expert_activation_fp8: see the header. Each value is computed with
// expert_activation's arithmetic, statement for statement (fp32 bias adds,
// apply_act, the product with up, in that order), rounded to T as it stores
// it and widened back (exact), then quantized per 128 columns by
// fp8_row_by_block (fp8.cuh); the T row itself is never stored. (The
// arithmetic is written out again, not shared through a function: the
// shared forms tried changed the plain kernel's generated code.)
template <class T>
__device__ __forceinline__ float as_stored(float y) {
    return to_float(from_float<T>(y));
}

template <class T>
__device__ __forceinline__ void expert_activation_fp8_impl(const T* __restrict__ h, int inter, int gated,
                                                           int gate_up_block, int act, const T* __restrict__ bias,
                                                           const int* __restrict__ row_to_pair,
                                                           const int* __restrict__ topk_ids, int num_rows,
                                                           unsigned char* __restrict__ out_q,
                                                           float* __restrict__ out_s) {
    follow_previous_grid();  // the MoE step's launches may overlap (common.cuh)
    const long long I = inter;
    const long long W = gated ? 2 * I : I;
    const long long scales_per_row = (I + 127) / 128;
    // Eight columns per lane: with I % 8 == 0 every row of h, its up half and
    // each gate/up block (B % 8 == 0) start on that grid, 16-byte aligned
    // when h and bias are; each row of codes starts 8-byte aligned when
    // out_q is. The test is uniform across the launch.
    const bool vec = (inter & 7) == 0 && is_aligned16(h) && is_aligned16(bias) &&
                     (reinterpret_cast<unsigned long long>(out_q) & 7ull) == 0ull;

    for (int r = blockIdx.x; r < num_rows; r += gridDim.x) {
        const int p = row_to_pair[r];
        const T* hr = h + static_cast<long long>(r) * W;
        const T* br = p >= 0 && bias != nullptr ? bias + static_cast<long long>(topk_ids[p]) * W : nullptr;
        // A padding row (p < 0) is zeros, as expert_activation writes it: codes 0, scales 1.
        auto eight = [&](int c, float* v) {
            if (p < 0) {
#pragma unroll
                for (int k = 0; k < 8; ++k) v[k] = 0.0f;
                return;
            }
            // All of a lane's loads first (up to four 16-byte loads, twice
            // that for float), then the arithmetic.
            const long long hi = gate_col(c, I, gate_up_block);  // 8 columns stay in one block
            float g[8], u[8] = {}, bg[8] = {}, bu[8] = {};
            unpack8(load_raw8(hr + hi), g);
            if (gated) unpack8(load_raw8(hr + hi + up_offset(I, gate_up_block)), u);
            if (br != nullptr) {
                unpack8(load_raw8(br + c), bg);
                if (gated) unpack8(load_raw8(br + I + c), bu);
            }
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                float zg = g[k];
                if (br != nullptr) zg += bg[k];
                float y = apply_act(zg, act);
                if (gated) {
                    float zu = u[k];
                    if (br != nullptr) zu += bu[k];
                    y *= zu;
                }
                v[k] = as_stored<T>(y);
            }
        };
        auto one = [&](int c) -> float {
            if (p < 0) return 0.0f;
            const long long hi = gate_col(c, I, gate_up_block);
            float zg = load_as_float(hr + hi);
            if (br != nullptr) zg += load_as_float(br + c);
            float y = apply_act(zg, act);
            if (gated) {
                float zu = load_as_float(hr + hi + up_offset(I, gate_up_block));
                if (br != nullptr) zu += load_as_float(br + I + c);
                y *= zu;
            }
            return as_stored<T>(y);
        };
        fp8_row_by_block(inter, vec, out_s + r * scales_per_row, out_q + r * I, eight, one);
    }
}

#define EXPERT_ACTIVATION_FP8_PARAMS(X)                                                                  \
    (const X* h, int inter, int gated, int gate_up_block, int act, const X* bias, const int* row_to_pair, \
     const int* topk_ids, int num_rows, unsigned char* out_q, float* out_s)
DEFINE_KERNEL_3TYPES(expert_activation_fp8, EXPERT_ACTIVATION_FP8_PARAMS,
                     (h, inter, gated, gate_up_block, act, bias, row_to_pair, topk_ids, num_rows, out_q, out_s))
