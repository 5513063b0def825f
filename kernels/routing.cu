// routing.cu: router top-k selection for the MoE layer.
//
// Kernels (X = float / f16_t / bf16_t, names suffixed _f32 / _f16 / _bf16):
//
//   route_topk_{f32,f16,bf16}(const X* logits, int num_tokens, int num_experts,
//                             int top_k, int scoring, int renormalize,
//                             float* topk_weights, int* topk_ids)
//     logits       [num_tokens, num_experts] row-major, read once.
//     scoring      SCORE_SOFTMAX: softmax over all E logits (max-subtracted,
//                  fp32); SCORE_SIGMOID: sigmoid of each logit.
//     renormalize  nonzero: divide the k selected scores by their sum.
//     topk_weights [num_tokens, top_k] fp32, written: selected scores in
//                  descending order (renormalized if asked).
//     topk_ids     [num_tokens, top_k] int32, written: the experts chosen.
//     Ties are broken by the lower expert index, NaN scores rank below every
//     number (the same order as a stable argsort of -scores in NumPy).
//     Requires 1 <= top_k <= num_experts (num_experts <= 1024 is what the
//     caller guarantees; larger E works too if the shared memory fits).
//
//   Launch: one warp per token. blockDim = (ROUTE_THREADS, 1, 1), i.e.
//   ROUTE_WARPS = ROUTE_THREADS / 32 tokens per block; gridDim.x =
//   ceil(num_tokens / ROUTE_WARPS). Dynamic shared memory:
//   ROUTE_WARPS * num_experts * sizeof(float) bytes, one score row per warp
//   (4 warps and E = 1024 need 16 KiB).
//
//   ROUTE_THREADS (a multiple of 32, at most 1024) and the scoring codes
//   SCORE_SOFTMAX and SCORE_SIGMOID are shared with the launcher, which
//   passes them as NVRTC defines (required, no defaults).

#include "common.cuh"

#ifndef ROUTE_THREADS
#error "ROUTE_THREADS is not defined: the launcher passes it as an NVRTC define"
#endif
#if ROUTE_THREADS % 32 != 0 || ROUTE_THREADS > 1024
#error "ROUTE_THREADS must be a multiple of 32 up to 1024"
#endif
#if !defined(SCORE_SOFTMAX) || !defined(SCORE_SIGMOID) || SCORE_SOFTMAX == SCORE_SIGMOID
#error "SCORE_SOFTMAX and SCORE_SIGMOID must be defined (NVRTC defines from the launcher) and differ"
#endif

#define ROUTE_WARPS (ROUTE_THREADS / 32)

// Key used to rank scores: NaN sorts below every real score (scores are
// probabilities in [0, 1], so -1 is below all of them) and an expert already
// taken sorts below everything (-inf), so it can never win again.
__device__ __forceinline__ float rank_key(float s) { return s != s ? -1.0f : s; }

// a beats b when its key is larger, or equal with a lower expert index.
__device__ __forceinline__ bool beats(float ka, int ia, float kb, int ib) {
    return ka > kb || (ka == kb && ia < ib);
}

template <class T>
__device__ __forceinline__ void route_topk_impl(const T* __restrict__ logits, int num_tokens,
                                                int num_experts, int top_k, int scoring,
                                                int renormalize, float* __restrict__ topk_weights,
                                                int* __restrict__ topk_ids) {
    extern __shared__ float route_smem[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int token = blockIdx.x * ROUTE_WARPS + warp;
    // Warps never synchronize with each other, so a warp past the end can
    // leave without hurting the others.
    if (token >= num_tokens) return;

    const int E = num_experts;
    float* scores = route_smem + static_cast<long long>(warp) * E;
    const T* row = logits + static_cast<long long>(token) * E;

    // 1. Logits to fp32 scores in shared memory (coalesced: lanes read
    //    consecutive elements).
    if (scoring == SCORE_SOFTMAX) {
        float m = -CG_INF;
        for (int e = lane; e < E; e += 32) {
            const float v = load_as_float(row + e);
            scores[e] = v;
            m = fmaxf(m, v);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float sum = 0.0f;
        for (int e = lane; e < E; e += 32) {
            // expf rather than __expf: the weights feed the output directly
            // and the fast version loses several bits.
            const float p = expf(scores[e] - m);
            scores[e] = p;
            sum += p;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        const float inv = 1.0f / sum;
        for (int e = lane; e < E; e += 32) scores[e] *= inv;
    } else {  // SCORE_SIGMOID
        for (int e = lane; e < E; e += 32) {
            const float v = load_as_float(row + e);
            scores[e] = 1.0f / (1.0f + expf(-v));
        }
    }
    __syncwarp();

    // 2. Each lane keeps the best of the experts it owns (e % 32 == lane).
    //    Each round the warp picks the best of the 32 lane winners; only the
    //    lane that owned the winner rescans its experts, so a round costs
    //    E/32 reads plus a 5-step shuffle reduction.
    float best_k = -CG_INF;
    int best_i = 0x7fffffff;
    for (int e = lane; e < E; e += 32) {
        const float k = rank_key(scores[e]);
        if (beats(k, e, best_k, best_i)) {
            best_k = k;
            best_i = e;
        }
    }

    float* w_out = topk_weights + static_cast<long long>(token) * top_k;
    int* id_out = topk_ids + static_cast<long long>(token) * top_k;
    float selected_sum = 0.0f;
    for (int j = 0; j < top_k; ++j) {
        float wk = best_k;
        int wi = best_i;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ok = __shfl_xor_sync(0xffffffffu, wk, o);
            const int oi = __shfl_xor_sync(0xffffffffu, wi, o);
            if (beats(ok, oi, wk, wi)) {
                wk = ok;
                wi = oi;
            }
        }
        // Every lane now holds the same winner wi (< E because top_k <= E
        // leaves at least one untaken expert, whose key beats -inf).
        const float w = scores[wi];
        selected_sum += w;
        // Lane j % 32 stores selection j; the renormalization pass below
        // revisits the same entries from the same lanes, so it reads back
        // its own writes and needs no fence.
        if (lane == (j & 31)) {
            w_out[j] = w;
            id_out[j] = wi;
        }
        // Every lane must have read scores[wi] before its owner overwrites it
        // (lanes are not guaranteed to run in lockstep).
        __syncwarp();
        if ((wi & 31) == lane) {
            scores[wi] = -CG_INF;  // rank_key(-inf) = -inf: taken
            best_k = -CG_INF;
            best_i = 0x7fffffff;
            for (int e = lane; e < E; e += 32) {
                const float k = rank_key(scores[e]);
                if (beats(k, e, best_k, best_i)) {
                    best_k = k;
                    best_i = e;
                }
            }
        }
        __syncwarp();
    }

    if (renormalize) {
        const float inv = 1.0f / selected_sum;
        for (int j = lane; j < top_k; j += 32) w_out[j] *= inv;
    }
}

#define ROUTE_TOPK_PARAMS(X)                                                                \
    (const X* logits, int num_tokens, int num_experts, int top_k, int scoring, int renormalize, \
     float* topk_weights, int* topk_ids)
DEFINE_KERNEL_3TYPES(route_topk, ROUTE_TOPK_PARAMS,
                     (logits, num_tokens, num_experts, top_k, scoring, renormalize, topk_weights,
                      topk_ids))
