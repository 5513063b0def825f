// sm90.cuh: thin PTX wrappers for Hopper (sm_90a) kernels: the TMA
// descriptor type, mbarriers, TMA bulk-tensor loads, wgmma's shared-memory
// descriptor of a K-major 128-byte-swizzled tile, named barriers, and
// wgmma's fence/commit/wait. Shared by every sm_90a kernel source; it
// defines no kernel.

// The opaque 128-byte CUtensorMap (NVRTC cannot include cuda.h to get it).
struct __align__(64) TmaMap {
    unsigned long long opaque[16];
};

__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(count));
}

__device__ __forceinline__ void mbarrier_expect_bytes(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory");
}

__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, unsigned phase) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(shared_address(bar)),
        "r"(phase)
        : "memory");
}

// One 2-D box of a tensor map into shared memory; completes on ``bar``.
// x is the inner (contiguous) coordinate, y the row.
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaMap* map, unsigned long long* bar, int x,
                                            int y) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];" ::"r"(shared_address(dst)),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(x), "r"(y), "r"(shared_address(bar))
        : "memory");
}

// One 3-D box (x inner, then y, then z) into shared memory; completes on ``bar``.
__device__ __forceinline__ void tma_load_3d(void* dst, const TmaMap* map, unsigned long long* bar, int x,
                                            int y, int z) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];" ::"r"(shared_address(dst)),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(x), "r"(y), "r"(z), "r"(shared_address(bar))
        : "memory");
}

// wgmma's shared-memory matrix descriptor of a K-major tile written by TMA
// with the 128-byte swizzle: rows of 128 bytes, 8-row (1024-byte) atoms.
// Bits 0-13 address >> 4, 16-29 leading byte offset >> 4 (unused for this
// layout: 1), 32-45 stride byte offset >> 4 (1024 bytes between 8-row
// groups: 64), 62-63 swizzle (1: 128 bytes).
__device__ __forceinline__ unsigned long long smem_descriptor(const void* tile) {
    const unsigned long long address = shared_address(tile);
    return ((address & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// Barrier `id` (1 or 2: 0 is __syncthreads') over one warpgroup's 128 threads.
__device__ __forceinline__ void named_barrier_sync(int id) {
    asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
