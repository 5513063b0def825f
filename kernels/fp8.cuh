// fp8.cuh: the e4m3 format and the 1 x 128 row quantizer's rule, for every
// kernel that reads or writes e4m3: fp8.cu (quantize_fp8, quantize_rows_fp8,
// dequantize_fp8), activation.cu (expert_activation_fp8: the activation
// written as codes) and dispatch.cu (place_one_block_fp8: the gathered rows
// written as codes). One copy of the conversions and of the
// scale rule, so those kernels' codes and scales are quantize_rows_fp8's,
// bit for bit. cublas_grouped/testing_fp8.py is the NumPy twin.
//
// e4m3fn: 1 sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities;
// 0x7F / 0xFF are NaN; largest finite 448. float -> e4m3 rounds to nearest
// even and saturates (finite values and infinities beyond 448 become +-448);
// NaN stays NaN with its sign.
//
// A tile's rule (fp8.cu's header has it for every tile shape):
//   amax  = largest finite |x| of the tile (NaN and +-inf ignored),
//   scale = amax == 0 ? 1 : max(amax / 448, 2^-126)      (fp32 division),
//   q     = e4m3(x / scale)                              (fp32 division).
//
// Contents:
//   - e4m3_to_float / float_to_e4m3: the conversions as integer arithmetic
//     (tests/test_fp8_cpu.py compiles them as host C++), and e4m3_code, the
//     conversion the kernels use (the hardware's from SM 8.9 on);
//   - fp8_amax / fp8_scale: the rule above;
//   - Raw8 / load_raw8 / unpack8: eight consecutive elements in fp32;
//   - fp8_tile_by_half_warp / fp8_tile_by_warp: one 1 x 128 tile, by the two
//     layouts of quantize_rows_fp8 (its vector and scalar paths);
//   - fp8_row_by_block: one row by the threads of a block, from values a
//     caller computes (the gather and the activation).

#ifndef CUBLAS_GROUPED_FP8_CUH
#define CUBLAS_GROUPED_FP8_CUH

#include "common.cuh"

#define E4M3_MAX 448.0f
#define FP32_MAX __int_as_float(0x7f7fffff)
#define FP32_MIN_NORMAL __int_as_float(0x00800000)

// ---- conversions: plain C, no CUDA builtin but __uint_as_float / __float_as_uint
// (tests/test_fp8_cpu.py compiles this part as host C++ and checks it) ----
__device__ __forceinline__ float e4m3_to_float(unsigned int c) {
    const unsigned int sign = (c & 0x80u) << 24;
    const unsigned int exp = (c >> 3) & 0xFu;
    const unsigned int man = c & 7u;
    if (exp == 15u && man == 7u) return __uint_as_float(sign | 0x7fc00000u);
    if (exp == 0u) {
        // Subnormal: man * 2^-9, exact in fp32.
        const float v = static_cast<float>(man) * 0.001953125f;
        return sign ? -v : v;
    }
    // Normal: rebias the exponent (7 -> 127) and widen the mantissa (3 -> 23 bits).
    return __uint_as_float(sign | ((exp + 120u) << 23) | (man << 20));
}

__device__ __forceinline__ unsigned char float_to_e4m3(float f) {
    const unsigned int u = __float_as_uint(f);
    const unsigned int sign = (u >> 24) & 0x80u;
    const unsigned int a = u & 0x7fffffffu;
    unsigned int code;
    if (a > 0x7f800000u) {
        code = 0x7Fu;  // NaN
    } else if (a >= 0x43E00000u) {
        code = 0x7Eu;  // |f| >= 448, infinities included: saturate
    } else if (a >= 0x3C800000u) {
        // Normal (|f| >= 2^-6): keep 3 mantissa bits, round to nearest even by
        // adding just under half an ulp plus the lowest kept bit (a carry
        // moves into the exponent), then rebias 127 -> 7.
        code = ((a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
    } else {
        // Subnormal: the code is round(|f| * 2^9). With |f| = mm * 2^(ef - 150)
        // that is mm >> (141 - ef), rounded to even; below 2^-10 it is 0.
        const unsigned int ef = a >> 23;
        const unsigned int mm = (a & 0x7FFFFFu) | (ef ? 0x800000u : 0u);
        const unsigned int shift = 141u - ef;  // >= 21 here
        if (shift > 24u) {
            code = 0u;
        } else {
            code = mm >> shift;
            const unsigned int rem = mm & ((1u << shift) - 1u);
            const unsigned int half = 1u << (shift - 1u);
            if (rem > half || (rem == half && (code & 1u))) ++code;
        }
    }
    return static_cast<unsigned char>(sign | code);
}

// ---- end of conversions ----

// The code of f as the kernels write it: the hardware conversion where the GPU
// has one (SM 8.9 on: cvt.rn.satfinite.e4m3x2, round to nearest even,
// saturating at +-448, infinities included), else float_to_e4m3 above; the
// same bits, but for NaN's sign, which the hardware drops (float_to_e4m3
// keeps it, as ml_dtypes does), so NaN takes the software path. About a
// tenth of the software routine's instructions: the row quantizer was bound
// by them (1.5 TB/s).
__device__ __forceinline__ unsigned char e4m3_code(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    if (f != f) return float_to_e4m3(f);
    unsigned short d;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(0.0f), "f"(f));
    return static_cast<unsigned char>(d & 0xFFu);  // b, the second operand, lands in the low byte
#else
    return float_to_e4m3(f);
#endif
}


// The codes of two values neither of which is NaN, a's in the low byte and
// b's in the next: one conversion for both from SM 8.9 on.
__device__ __forceinline__ unsigned int e4m3x2_code(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short d;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(b), "f"(a));
    return d;
#else
    return float_to_e4m3(a) | (static_cast<unsigned int>(float_to_e4m3(b)) << 8);
#endif
}

// |v| folded into a tile's amax when finite: NaN and +-inf leave it as it is.
__device__ __forceinline__ float fp8_amax(float amax, float v) {
    const float a = fabsf(v);
    return a <= FP32_MAX ? fmaxf(amax, a) : amax;  // false for NaN and inf
}

// A tile's scale from its amax: 1 for a tile with no finite non-zero value
// (never 0 or NaN), else amax / 448 raised to the smallest normal float (so
// that x / scale of a tile of tiny values cannot overflow).
__device__ __forceinline__ float fp8_scale(float amax) {
    return amax == 0.0f ? 1.0f : fmaxf(amax / E4M3_MAX, FP32_MIN_NORMAL);
}

// Eight codes e4m3(v[j] / scale), packed little-endian into b, with
// div.rn.f32's quotients. Where all eight are finite and non-zero and the
// scale at least 2^-90 (every tile but those of tiny, zero, infinite or NaN
// values), each quotient takes three instructions from rcp =
// __frcp_rn(scale), one per tile, instead of a reciprocal, a check and a
// refinement of its own: q0 = x * rcp is within an ulp of x / scale, its
// remainder x - q0 * scale is exact in an fma (the scale's bound keeps it
// above fp32's subnormal step for every quotient of 2^-11 or more), and one
// more fma rounds the quotient correctly (Markstein's theorem); a quotient
// under 2^-11 codes to a signed 0 however it is rounded. Otherwise the
// division itself, for the same bits as ever.
__device__ __forceinline__ void fp8_codes8(const float* v, float scale, unsigned int* b) {
    bool plain = scale >= 0x1p-90f;
#pragma unroll
    for (int j = 0; j < 8; ++j) plain = plain && v[j] != 0.0f && fabsf(v[j]) <= FP32_MAX;
    b[0] = b[1] = 0u;
    if (plain) {
        const float rcp = __frcp_rn(scale);
        float q[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float q0 = v[j] * rcp;
            q[j] = fmaf(fmaf(-q0, scale, v[j]), rcp, q0);  // finite: no NaN to convert
        }
        b[0] = e4m3x2_code(q[0], q[1]) | (e4m3x2_code(q[2], q[3]) << 16);
        b[1] = e4m3x2_code(q[4], q[5]) | (e4m3x2_code(q[6], q[7]) << 16);
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j >> 2] |= static_cast<unsigned int>(e4m3_code(v[j] / scale)) << (8 * (j & 3));
    }
}

// Eight consecutive elements' raw bits (p 16-byte aligned: the caller checks):
// two 16-byte words for float, one for the 16-bit types. Loading apart from
// unpacking lets a caller issue several loads before it uses any
// (quantize_rows_fp8 loads all of a pass's tiles first).
template <class T>
struct Raw8 {
    uint4 w[sizeof(T) == 4 ? 2 : 1];
};
template <class T>
__device__ __forceinline__ Raw8<T> load_raw8(const T* p) {
    Raw8<T> r;
#pragma unroll
    for (int i = 0; i < (sizeof(T) == 4 ? 2 : 1); ++i) r.w[i] = reinterpret_cast<const uint4*>(p)[i];
    return r;
}
__device__ __forceinline__ void unpack8(const Raw8<float>& r, float* v) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        v[4 * i] = __uint_as_float(r.w[i].x), v[4 * i + 1] = __uint_as_float(r.w[i].y);
        v[4 * i + 2] = __uint_as_float(r.w[i].z), v[4 * i + 3] = __uint_as_float(r.w[i].w);
    }
}
template <class T>
__device__ __forceinline__ void unpack8(const Raw8<T>& r, float* v) {
    const unsigned int w[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        // Little-endian: the element at the lower address is the low half of each word.
        T e;
        e.bits = static_cast<unsigned short>((w[j >> 1] >> (16 * (j & 1))) & 0xFFFFu);
        v[j] = to_float(e);
    }
}


// One 1 x 128 tile held by a half-warp (quantize_rows_fp8's vector layout):
// lane l (0 to 15 of its half) holds the tile's columns 8 l .. 8 l + 7 in v,
// and `mine` says they are in the row (the row's width a multiple of 8: all
// eight or none; v of the others is ignored). The half reduces the amax by
// shuffles, so all 32 lanes of the warp call this together (the other half
// with another tile, or none). Returns the tile's scale, the same in every
// lane of the half; each lane with columns stores their 8 codes at q
// (8-byte aligned) with one 8-byte store. The caller stores the scale.
// fp8_codes_by_half_warp is the same without the store: the codes in b (of
// lanes with columns), for a caller that stores them in several places.
__device__ __forceinline__ float fp8_codes_by_half_warp(const float* v, bool mine, unsigned int* b) {
    float amax = 0.0f;
    if (mine) {
#pragma unroll
        for (int j = 0; j < 8; ++j) amax = fp8_amax(amax, v[j]);
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float scale = fp8_scale(amax);
    if (mine) fp8_codes8(v, scale, b);
    return scale;
}

__device__ __forceinline__ void store_codes8(unsigned char* q, const unsigned int* b) {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(q), "r"(b[0]), "r"(b[1]) : "memory");
}

__device__ __forceinline__ float fp8_tile_by_half_warp(const float* v, bool mine, unsigned char* q) {
    unsigned int b[2];
    const float scale = fp8_codes_by_half_warp(v, mine, b);
    if (mine) store_codes8(q, b);
    return scale;
}

// One 1 x 128 tile held by a whole warp (quantize_rows_fp8's scalar layout):
// lane l holds the tile's columns l + 32 j (j < 4) in v, 0 past the first n
// columns, which are the row's (0 cannot raise the amax). Every lane calls
// it; returns the tile's scale; the codes of the first n columns go to
// q[l + 32 j], one byte each. The caller stores the scale.
__device__ __forceinline__ float fp8_tile_by_warp(const float* v, int n, unsigned char* q) {
    const int lane = threadIdx.x & 31;
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) amax = fp8_amax(amax, v[j]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float scale = fp8_scale(amax);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if (lane + 32 * j < n) q[lane + 32 * j] = e4m3_code(v[j] / scale);
    }
    return scale;
}

// One row of `cols` values quantized by all the threads of a block
// (blockDim.x a multiple of 32), into its ceil(cols / 128) scales at s_row
// and its codes at q_row: the tiles, scales and codes quantize_rows_fp8
// gives for the same values. `vec` (cols % 8 == 0, q_row 8-byte aligned, and
// whatever load8 reads aligned for it; uniform across the launch): warp w
// takes tiles 2w and 2w + 1, a half-warp each, then 2w + 2 * warps, ..., and
// load8(c, v) puts columns c .. c + 7 in v. Otherwise warp w takes tiles w,
// w + warps, ..., and load1(c) returns column c. The values are computed by
// the caller (a gathered row, an activation): no copy of them is stored.
template <class Load8, class Load1>
__device__ __forceinline__ void fp8_row_by_block(int cols, bool vec, float* __restrict__ s_row,
                                                 unsigned char* __restrict__ q_row, Load8 load8, Load1 load1) {
    const int tcols = (cols + 127) / 128;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    if (vec) {
        const int lane = threadIdx.x & 15;
        const int half = (threadIdx.x >> 4) & 1;
        // The bound is the same for both halves of a warp: all 32 lanes reach the shuffles.
        for (int t0 = 2 * warp; t0 < tcols; t0 += 2 * warps) {
            const int t = t0 + half;
            const int c = t * 128 + 8 * lane;
            const bool mine = t < tcols && c < cols;  // cols % 8 == 0: all 8 columns are in the row
            float v[8] = {};
            if (mine) load8(c, v);
            const float scale = fp8_tile_by_half_warp(v, mine, q_row + c);
            if (t < tcols && lane == 0) s_row[t] = scale;
        }
    } else {
        const int lane = threadIdx.x & 31;
        for (int t = warp; t < tcols; t += warps) {
            const int c0 = t * 128;
            float v[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = c0 + lane + 32 * j;
                v[j] = c < cols ? load1(c) : 0.0f;
            }
            const float scale = fp8_tile_by_warp(v, cols - c0, q_row + c0);
            if (lane == 0) s_row[t] = scale;
        }
    }
}

#endif  // CUBLAS_GROUPED_FP8_CUH
