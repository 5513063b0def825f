// fp8.cu: FP8 (e4m3fn) quantization with one fp32 scale per tile, and back.
//
// The format, its conversions and the scale rule are in fp8.cuh, shared with
// the kernels that write FP8 activations themselves (activation.cu's
// expert_activation_fp8, dispatch.cu's place_one_block_fp8), so that their
// codes and scales are quantize_rows_fp8's bit for bit. The conversions give
// the same bits on every architecture (fp8.cuh: e4m3_code).
// cublas_grouped/testing_fp8.py is the NumPy twin of every function here,
// step for step; GPU tests compare the two byte for byte.
//
// e4m3fn: 1 sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities;
// 0x7F / 0xFF are NaN; largest finite 448. float -> e4m3 rounds to nearest
// even and saturates (finite values and infinities beyond 448 become +-448);
// NaN stays NaN with its sign.
//
// A batch of B matrices [R, C] (row-major, contiguous, B * R * C elements) is
// cut into tiles of tile_rows x tile_cols (edge tiles partial). Tile t (in
// row-major order over [B, ceil(R / tile_rows), ceil(C / tile_cols)]) gets
//   amax  = largest finite |x| of the tile (NaN and +-inf ignored),
//   scale = amax == 0 ? 1 : max(amax / 448, 2^-126)      (fp32 division),
//   q     = e4m3(x / scale)                              (fp32 division),
// and a value reads back as float(e4m3) * scale.
//
// Kernels (X = float / f16_t / bf16_t, names suffixed _f32 / _f16 / _bf16):
//
//   quantize_fp8_{f32,f16,bf16}(const X* x, long long batch, int rows, int cols,
//                               int tile_rows, int tile_cols,
//                               float* scales, unsigned char* q)
//     scales [B, ceil(R/tile_rows), ceil(C/tile_cols)]; q [B, R, C].
//     Launch: FP8_THREADS threads per block, one block per tile, grid-stride
//     over tiles (any grid size). Two passes over the tile: amax, then convert.
//
//   dequantize_fp8_{f32,f16,bf16}(const unsigned char* q, const float* scales,
//                                 long long batch, int rows, int cols,
//                                 int tile_rows, int tile_cols, X* out)
//     out [B, R, C] = X(float(q) * scale of the element's tile), rounded to
//     nearest even. Launch: any block size, one block per row, grid-stride
//     over the B * R rows (any grid size). Four elements per thread step
//     when C % 4 == 0 and q, out are aligned for it; one otherwise.
//
//   FP8_THREADS is shared with the launcher (cublas_grouped/gemm/fp8_kernels.py),
//   which passes it as an NVRTC define (required, no default).

#include "common.cuh"
#include "fp8.cuh"

#if !defined(FP8_THREADS)
#error "FP8_THREADS is not defined: the launcher passes it as an NVRTC define"
#endif
#if FP8_THREADS % 32 != 0 || FP8_THREADS < 32 || FP8_THREADS > 1024
#error "FP8_THREADS must be a multiple of 32 up to 1024"
#endif
#if !defined(QROWS_PAIRS) || QROWS_PAIRS < 1 || QROWS_PAIRS > 8
#error "QROWS_PAIRS (tile pairs per warp pass of quantize_rows_fp8's vector path, 1 to 8) comes from the launcher"
#endif

// Largest value over the block; every thread gets it. `red` is 32 floats of
// shared memory, free to reuse once this returns (the leading barrier
// protects the previous call's readers).
__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) m = fmaxf(m, red[w]);
    return m;
}

template <class T>
__device__ __forceinline__ void quantize_fp8_impl(const T* __restrict__ x, long long batch, int rows,
                                                  int cols, int tile_rows, int tile_cols,
                                                  float* __restrict__ scales,
                                                  unsigned char* __restrict__ q) {
    __shared__ float red[32];
    const long long trows = (rows + tile_rows - 1) / tile_rows;
    const long long tcols = (cols + tile_cols - 1) / tile_cols;
    const long long tiles = batch * trows * tcols;
    for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
        const long long b = t / (trows * tcols);
        const long long within = t - b * trows * tcols;
        const int r0 = static_cast<int>(within / tcols) * tile_rows;
        const int c0 = static_cast<int>(within % tcols) * tile_cols;
        const int nr = min(tile_rows, rows - r0);
        const int nc = min(tile_cols, cols - c0);
        const long long base = (b * rows + r0) * static_cast<long long>(cols) + c0;
        // A tile is at most 128 x 128 ("block128", rows) or one row or column
        // of fewer than 2^31 elements ("channel"): its size fits an int.
        const int n = nr * nc;

        float amax = 0.0f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const long long at = base + static_cast<long long>(i / nc) * cols + (i % nc);
            amax = fp8_amax(amax, load_as_float(x + at));
        }
        amax = block_max(amax, red);
        const float scale = fp8_scale(amax);
        if (threadIdx.x == 0) scales[t] = scale;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const long long at = base + static_cast<long long>(i / nc) * cols + (i % nc);
            q[at] = e4m3_code(load_as_float(x + at) / scale);
        }
    }
}

// Four consecutive output elements written with one vector store: 16 bytes
// for float, 8 for the 16-bit types (p aligned to that; the caller checks).
// Inline PTX because the compiler splits a struct store into scalar ones here.
__device__ __forceinline__ void store4(float* p, const float* v) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(__float_as_uint(v[0])),
                 "r"(__float_as_uint(v[1])), "r"(__float_as_uint(v[2])), "r"(__float_as_uint(v[3]))
                 : "memory");
}
template <class T>
__device__ __forceinline__ void store4(T* p, const float* v) {
    unsigned int b[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = from_float<T>(v[j]).bits;
    // Little-endian: the element at the lower address is the low half of each word.
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(b[0] | (b[1] << 16)), "r"(b[2] | (b[3] << 16))
                 : "memory");
}

template <class T>
__device__ __forceinline__ void dequantize_fp8_impl(const unsigned char* __restrict__ q,
                                                    const float* __restrict__ scales,
                                                    long long batch, int rows, int cols,
                                                    int tile_rows, int tile_cols,
                                                    T* __restrict__ out) {
    const long long tcols = (cols + tile_cols - 1) / tile_cols;
    const long long trows = (rows + tile_rows - 1) / tile_rows;
    const long long total_rows = batch * rows;
    // Four codes per 32-bit load when every row starts aligned for it (the
    // test is uniform across the launch, so the branch never diverges).
    const bool vec = (cols & 3) == 0 && (reinterpret_cast<unsigned long long>(q) & 3ull) == 0ull &&
                     (reinterpret_cast<unsigned long long>(out) & (4ull * sizeof(T) - 1ull)) == 0ull;
    // Then columns c .. c+3 (c a multiple of 4) share one scale when tiles are 4k wide.
    const bool one_scale = (tile_cols & 3) == 0;
    for (long long row = blockIdx.x; row < total_rows; row += gridDim.x) {
        const long long b = row / rows;
        const int r = static_cast<int>(row - b * rows);
        const float* s = scales + (b * trows + r / tile_rows) * tcols;
        const unsigned char* qr = q + row * cols;
        T* o = out + row * cols;
        if (vec) {
            for (int c = 4 * threadIdx.x; c < cols; c += 4 * blockDim.x) {
                const unsigned int codes = *reinterpret_cast<const unsigned int*>(qr + c);
                const float first = s[c / tile_cols];
                float v[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float scale = one_scale ? first : s[(c + j) / tile_cols];
                    // Little-endian: byte j of the word is the code of column c + j.
                    v[j] = e4m3_to_float((codes >> (8 * j)) & 0xFFu) * scale;
                }
                store4(o + c, v);
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                store_from_float(o + c, e4m3_to_float(qr[c]) * s[c / tile_cols]);
            }
        }
    }
}

#define QUANTIZE_FP8_PARAMS(X)                                                             \
    (const X* x, long long batch, int rows, int cols, int tile_rows, int tile_cols, \
     float* scales, unsigned char* q)
DEFINE_KERNEL_3TYPES(quantize_fp8, QUANTIZE_FP8_PARAMS,
                     (x, batch, rows, cols, tile_rows, tile_cols, scales, q))

// Activations, one scale per row per 128 columns (the FP8 GEMM's A operand):
// the same scale rule and conversion as quantize_fp8 with 1 x 128 tiles, bit
// for bit, but warps instead of blocks (a 128-element tile left a 256-thread
// block mostly idle: measured 10-20x below bandwidth).
//
// Vector path (cols % 8 == 0, x 16-byte and q 8-byte aligned: every row then
// starts aligned; the test is uniform across the launch): a half-warp per
// tile, a warp 2 * QROWS_PAIRS tiles per pass (the launcher's define, its
// loads all issued first); lane l of a half reads columns
// c0 + 8 l .. c0 + 8 l + 7 with one 16-byte load (two for float), the half
// reduces the amax, and each lane writes its 8 codes with one 8-byte store.
// Scalar path (any other shape or alignment): a warp per tile, lane l reads
// columns c0 + l + 32 j (coalesced 2- or 4-byte loads), one byte stored each.
// Both take the amax over the same finite values and divide the same way,
// so their codes and scales are the same bits.

template <class T>
__device__ __forceinline__ void quantize_rows_fp8_vec(const T* __restrict__ x, long long rows, int cols,
                                                      float* __restrict__ scales,
                                                      unsigned char* __restrict__ q) {
    const long long tcols = (cols + 127) / 128;
    const long long tiles = rows * tcols;
    const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
    const int lane = threadIdx.x & 15;
    const int half = (threadIdx.x >> 4) & 1;
    // A warp takes QROWS_PAIRS pairs of tiles per pass and issues all their
    // loads before it reduces any: one 16-byte load in flight per thread left
    // the kernel at about 1.5 TB/s (the latency of each load, not the bytes,
    // bounded it). The loop bound is the same for the whole warp: every lane
    // reaches the shuffles.
    for (long long t0 = 2 * QROWS_PAIRS * (static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5));
         t0 < tiles; t0 += 2 * QROWS_PAIRS * warps) {
        Raw8<T> raw[QROWS_PAIRS];
        long long at[QROWS_PAIRS];  // this lane's first element (and code) of its tile
        bool live[QROWS_PAIRS], mine[QROWS_PAIRS];
        // Tile t0 + half's row and column tile by one division; the pass's
        // later tiles (2 further each) by stepping, not dividing again.
        long long r_step = (t0 + half) / tcols;
        long long ct_step = t0 + half - r_step * tcols;
#pragma unroll
        for (int u = 0; u < QROWS_PAIRS; ++u) {
            const long long t = t0 + 2 * u + half;
            live[u] = t < tiles;
            const long long r = live[u] ? r_step : 0;
            const int c = (live[u] ? static_cast<int>(ct_step) * 128 : 0) + 8 * lane;
            ct_step += 2;
            while (ct_step >= tcols) ct_step -= tcols, ++r_step;
            mine[u] = live[u] && c < cols;  // cols % 8 == 0: then all 8 columns are in the row
            at[u] = r * cols + c;
            // Lanes with no columns load row 0's first 8 (always there) and
            // ignore them: no branch around the loads, so all are issued first.
            raw[u] = load_raw8(x + (mine[u] ? at[u] : 0));
        }
#pragma unroll
        for (int u = 0; u < QROWS_PAIRS; ++u) {
            float v[8];
            unpack8(raw[u], v);
            const float scale = fp8_tile_by_half_warp(v, mine[u], q + at[u]);
            if (live[u] && lane == 0) scales[t0 + 2 * u + half] = scale;
        }
    }
}

template <class T>
__device__ __forceinline__ void quantize_rows_fp8_impl(const T* __restrict__ x, long long rows, int cols,
                                                       float* __restrict__ scales,
                                                       unsigned char* __restrict__ q) {
    // The FP8 step may launch it overlapped with the kernel before (its rows'
    // gather) and the GEMM after (common.cuh); a plain launch's wait returns at once.
    follow_previous_grid();
    if ((cols & 7) == 0 && (reinterpret_cast<unsigned long long>(x) & 15ull) == 0ull &&
        (reinterpret_cast<unsigned long long>(q) & 7ull) == 0ull) {
        quantize_rows_fp8_vec(x, rows, cols, scales, q);
        return;
    }
    const long long tcols = (cols + 127) / 128;
    const long long tiles = rows * tcols;
    const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
    const int lane = threadIdx.x & 31;
    for (long long t = static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); t < tiles;
         t += warps) {
        const long long r = t / tcols;
        const int c0 = static_cast<int>(t - r * tcols) * 128;
        const T* xr = x + r * cols;
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = c0 + lane + 32 * j;
            v[j] = c < cols ? load_as_float(xr + c) : 0.0f;
        }
        const float scale = fp8_tile_by_warp(v, cols - c0, q + r * cols + c0);
        if (lane == 0) scales[t] = scale;
    }
}

#define QUANTIZE_ROWS_FP8_PARAMS(X) (const X* x, long long rows, int cols, float* scales, unsigned char* q)
DEFINE_KERNEL_3TYPES(quantize_rows_fp8, QUANTIZE_ROWS_FP8_PARAMS, (x, rows, cols, scales, q))

#define DEQUANTIZE_FP8_PARAMS(X)                                                         \
    (const unsigned char* q, const float* scales, long long batch, int rows, int cols, \
     int tile_rows, int tile_cols, X* out)
DEFINE_KERNEL_3TYPES(dequantize_fp8, DEQUANTIZE_FP8_PARAMS,
                     (q, scales, batch, rows, cols, tile_rows, tile_cols, out))
