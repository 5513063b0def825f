// common.cuh: shared device helpers for the cublas_grouped NVRTC kernels.
//
// Every kernels/*.cu file pulls this in with `#include "common.cuh"`. NVRTC is
// run without include paths, so the Python loader pastes this file's text in
// place of that line before compiling. For the same reason nothing here
// includes a system or CUDA header: half types are handled as raw 16-bit
// storage with our own conversions, and the few builtins used (expf, erff,
// warp intrinsics, __float_as_uint, ...) are ones NVRTC provides without any
// header.
//
// Contents:
//   - bf16_t / f16_t: 2-byte storage wrappers so that overloads and templates
//     can tell the three element types apart (a bare unsigned short could not).
//   - Conversions float <-> bf16 (round to nearest even, NaN kept a NaN) and
//     float <-> fp16 (the hardware cvt instructions through inline PTX).
//   - load_as_float / store_from_float: element access in fp32 for any type.
//   - Vec16<T>: one 16-byte chunk of a row, for vectorized loads and stores.
//   - copy_row: copy (or zero) one row, vectorized when alignment allows.
//   - Block-wide exclusive scan (warp shuffles + shared memory) that a single
//     block can loop over arbitrarily long arrays.
//   - wait_for_previous_grid / allow_next_grid: programmatic dependent
//     launch (SM 9.0+), for kernels the launcher may start before the
//     previous kernel in the stream has finished.
//   - DEFINE_KERNEL_3TYPES: stamps out the _f32/_f16/_bf16 extern "C" entry
//     points of a templated kernel, so the loader can look kernels up by plain
//     (unmangled) names.

#ifndef CUBLAS_GROUPED_COMMON_CUH
#define CUBLAS_GROUPED_COMMON_CUH

// ---------------------------------------------------------------------------
// Programmatic dependent launch
// ---------------------------------------------------------------------------
//
// A kernel launched with the programmatic-serialization attribute
// (runtime/launch.py, FixedLaunch.launch_overlapped) may start while the
// previous kernel in the stream still runs. Such a kernel calls
// wait_for_previous_grid() before it reads or writes anything an earlier
// kernel reads or writes: it returns once the previous grid has completed
// and its memory is visible. Then allow_next_grid() lets the next kernel,
// if launched the same way, start its blocks (it fires once every block of
// this grid has called it or exited). Calling it only after the wait keeps
// the chain safe: when kernel i + 1 starts, kernel i - 1 has completed.
// Without the attribute both are no-ops (the wait returns at once), so a
// kernel may always call them. Before SM 9.0 they compile to nothing.

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Both, at a kernel's start: what every kernel of the MoE step does first.
__device__ __forceinline__ void follow_previous_grid() {
    wait_for_previous_grid();
    allow_next_grid();
}

// The other order, for the kernel before a step's GEMM 2 (the activation):
// GEMM 2's blocks may then start while this kernel and the one before it
// (GEMM 1's last tiles) still run, and prefetch their first weights
// (SM90_PREFETCH_B), reading only the schedule, complete before this kernel
// started. Whatever follows still waits before touching what this kernel
// writes; the chain's rule above then holds one kernel later.
__device__ __forceinline__ void lead_next_grid() {
    allow_next_grid();
    wait_for_previous_grid();
}

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

// Raw storage of a bfloat16 / IEEE half value. Distinct structs (rather than
// typedefs of unsigned short) so overload resolution picks the right
// conversion. Both are exactly 2 bytes with 2-byte alignment, so arrays of
// them have the same layout as the caller's arrays of 16-bit elements.
struct alignas(2) bf16_t {
    unsigned short bits;
};
struct alignas(2) f16_t {
    unsigned short bits;
};
static_assert(sizeof(bf16_t) == 2, "bf16_t must be 2 bytes");
static_assert(sizeof(f16_t) == 2, "f16_t must be 2 bytes");

// +infinity as a float (math.h's INFINITY is not available without headers).
#define CG_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_bits_to_float(unsigned short b) {
    // bf16 is the top half of an fp32, so widening is exact.
    return __uint_as_float(static_cast<unsigned int>(b) << 16);
}

__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        // NaN: plain truncation could clear every mantissa bit left and turn
        // the NaN into an infinity, so keep the sign and force a quiet NaN.
        return static_cast<unsigned short>((u >> 16) | 0x0040u);
    }
    // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit,
    // then truncate. Values that round past the largest finite bf16 carry
    // into the exponent and become infinity, as IEEE rounding requires.
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}

__device__ __forceinline__ float f16_bits_to_float(unsigned short b) {
    // The "h" constraint is a 16-bit (.b16/.u16) register: the hardware
    // converter handles subnormals, infinities and NaN for us.
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
}

__device__ __forceinline__ unsigned short float_to_f16_bits(float f) {
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16_t v) { return bf16_bits_to_float(v.bits); }
__device__ __forceinline__ float to_float(f16_t v) { return f16_bits_to_float(v.bits); }

template <class T>
__device__ __forceinline__ T from_float(float v);

template <>
__device__ __forceinline__ float from_float<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float v) {
    bf16_t r;
    r.bits = float_to_bf16_bits(v);
    return r;
}
template <>
__device__ __forceinline__ f16_t from_float<f16_t>(float v) {
    f16_t r;
    r.bits = float_to_f16_bits(v);
    return r;
}

template <class T>
__device__ __forceinline__ float load_as_float(const T* p) {
    return to_float(*p);
}

template <class T>
__device__ __forceinline__ void store_from_float(T* p, float v) {
    *p = from_float<T>(v);
}

// ---------------------------------------------------------------------------
// 16-byte vectors
// ---------------------------------------------------------------------------

// Raw 16 bytes with 16-byte alignment: loading/storing one of these compiles
// to a single 128-bit ld/st (ld.global.v4.u32), the widest access per thread.
struct alignas(16) Raw16 {
    unsigned int x, y, z, w;
};

// One 16-byte chunk seen as N elements of T (4 floats or 8 halves).
template <class T>
union Vec16 {
    static constexpr int N = 16 / static_cast<int>(sizeof(T));
    Raw16 raw;
    T e[16 / sizeof(T)];
};

template <class T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* p) {
    Vec16<T> v;
    v.raw = *reinterpret_cast<const Raw16*>(p);
    return v;
}

template <class T>
__device__ __forceinline__ void store_vec16(T* p, const Vec16<T>& v) {
    *reinterpret_cast<Raw16*>(p) = v.raw;
}

__device__ __forceinline__ bool is_aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0ull;
}

// True when rows of `width` elements of T, starting at the given (possibly
// null) base pointers, can all be accessed with 16-byte vectors: every row
// start is then 16-byte aligned. The test is uniform across a launch, so the
// branch it feeds never diverges.
template <class T>
__device__ __forceinline__ bool rows_vectorizable(long long width, const void* p0,
                                                  const void* p1 = nullptr,
                                                  const void* p2 = nullptr) {
    return ((width * static_cast<long long>(sizeof(T))) & 15ll) == 0ll &&
           is_aligned16(p0) && is_aligned16(p1) && is_aligned16(p2);
}

// Copy one row of `width` elements from src to dst with the threads of the
// block (threadIdx.x strides), or write zeros when src is null. Bit-exact for
// every element type: elements are moved as raw bytes, never converted.
template <class T>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ src,
                                         long long width, bool vec) {
    if (vec) {
        const long long nv = width / Vec16<T>::N;
        Raw16* d = reinterpret_cast<Raw16*>(dst);
        const Raw16* s = reinterpret_cast<const Raw16*>(src);
        if (src != nullptr) {
            for (long long i = threadIdx.x; i < nv; i += blockDim.x) d[i] = s[i];
        } else {
            const Raw16 z = {0u, 0u, 0u, 0u};
            for (long long i = threadIdx.x; i < nv; i += blockDim.x) d[i] = z;
        }
    } else {
        if (src != nullptr) {
            for (long long i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
        } else {
            // All-zero bits are +0 in every supported type.
            const T z = from_float<T>(0.0f);
            for (long long i = threadIdx.x; i < width; i += blockDim.x) dst[i] = z;
        }
    }
}

// ---------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------

// The activations of the expert layer, for sources compiled with the codes
// ACT_SILU, ACT_GELU and ACT_RELU (their launchers pass them): SiLU
// z * sigmoid(z); exact GELU 0.5 z (1 + erf(z / sqrt 2)); ReLU, written so
// that NaN stays NaN. ``act`` is one of the codes.
#if defined(ACT_SILU) && defined(ACT_GELU) && defined(ACT_RELU)
__device__ __forceinline__ float apply_act(float z, int act) {
    if (act == ACT_SILU) return z / (1.0f + expf(-z));
    if (act == ACT_GELU) return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    return z < 0.0f ? 0.0f : z;  // ACT_RELU
}

// apply_act with SiLU from the fast intrinsics (ex2.approx and rcp.approx:
// about 2 ulp of float32, far below the 16-bit rounding that follows), for
// the GEMM epilogues, where the activation sits between a tile's last MMAs
// and the next tile's first ones. The IEEE division of apply_act compiles to
// a reciprocal with a guarded call to a slow path per element (64 calls and
// 2x the instructions in the bf16 kernel's gated epilogue). For z below
// about -87, 1 + exp(-z) passes 2^126 and __fdividef gives 0, where SiLU is
// below 1e-36 in magnitude; NaN stays NaN.
__device__ __forceinline__ float apply_act_fast(float z, int act) {
    if (act == ACT_SILU) return __fdividef(z, 1.0f + __expf(-z));
    return apply_act(z, act);
}
#endif

// ---------------------------------------------------------------------------
// Block-wide exclusive scan
// ---------------------------------------------------------------------------

// Number of ints of shared memory block_exclusive_scan needs as scratch.
#define SCAN_SCRATCH_INTS 33

__device__ __forceinline__ int warp_inclusive_scan(int v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

// Exclusive prefix sum of one value per thread across the whole block (in
// threadIdx.x order). Every thread of the block must call it (it contains
// __syncthreads). blockDim.x must be a multiple of 32 and at most 1024.
// `scratch` is SCAN_SCRATCH_INTS ints of shared memory; it may be reused by
// the next call right away (the leading barrier protects it). The block total
// is returned through *total when total is non-null.
__device__ __forceinline__ int block_exclusive_scan(int v, int* total, int* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    const int inc = warp_inclusive_scan(v);
    __syncthreads();  // earlier readers of scratch are done
    if (lane == 31) scratch[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        const int s = lane < nwarps ? scratch[lane] : 0;
        const int si = warp_inclusive_scan(s);
        if (lane < nwarps) scratch[lane] = si - s;  // exclusive offset of each warp
        if (lane == 31) scratch[32] = si;           // block total
    }
    __syncthreads();
    if (total != nullptr) *total = scratch[32];
    return scratch[warp] + inc - v;
}

// In-place exclusive scan of n ints at data[0], data[stride], data[2*stride],
// ... (global or shared memory) by one whole block, tile by tile of blockDim.x
// elements with a running carry, so any n works. Returns the total of all n
// values. Same calling rules as block_exclusive_scan.
__device__ __forceinline__ int block_exclusive_scan_strided(int* data, long long n, long long stride,
                                                            int* scratch) {
    int carry = 0;
    for (long long base = 0; base < n; base += blockDim.x) {
        const long long i = base + threadIdx.x;
        const int v = i < n ? data[i * stride] : 0;
        int tile_total;
        const int ex = block_exclusive_scan(v, &tile_total, scratch);
        if (i < n) data[i * stride] = carry + ex;
        carry += tile_total;
    }
    return carry;
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

// DEFINE_KERNEL_3TYPES(name, PARAMS, ARGS) defines name_f32, name_f16 and
// name_bf16 as extern "C" kernels that call the template name##_impl<T>.
// PARAMS is the name of a function-like macro that, given the element type,
// expands to the parenthesized parameter list; ARGS is the parenthesized
// argument list forwarded to the template. Example:
//   #define FOO_PARAMS(X) (const X* a, int n)
//   DEFINE_KERNEL_3TYPES(foo, FOO_PARAMS, (a, n))
// extern "C" keeps the names unmangled, so the loader finds them as strings.
#define CG_DEFINE_ONE(name, suffix, type, PARAMS, ARGS) \
    extern "C" __global__ void name##_##suffix PARAMS(type) { name##_impl<type> ARGS; }
#define DEFINE_KERNEL_3TYPES(name, PARAMS, ARGS)  \
    CG_DEFINE_ONE(name, f32, float, PARAMS, ARGS) \
    CG_DEFINE_ONE(name, f16, f16_t, PARAMS, ARGS) \
    CG_DEFINE_ONE(name, bf16, bf16_t, PARAMS, ARGS)

#endif  // CUBLAS_GROUPED_COMMON_CUH
