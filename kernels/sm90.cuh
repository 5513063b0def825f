// sm90.cuh: thin PTX wrappers for Hopper (sm_90a) kernels: the TMA
// descriptor type, mbarriers, TMA bulk-tensor loads, cp.async with mbarrier
// arrivals and the 128-byte swizzle's address, wgmma's shared-memory
// descriptor of a K-major 128-byte-swizzled tile, named barriers, and
// wgmma's fence/commit/wait; and what the grouped GEMM sources share: the
// bf16x2/f16x2 packing, the group search of the tile schedule, the tile
// mailboxes of persistent CTAs, and the store of a math warpgroup's rows
// through shared memory. Shared by every sm_90a kernel source (after
// common.cuh); it defines no kernel.

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

// The same boxes prefetched into L2 only (no shared memory, no barrier):
// a hint, so coordinates past the tensor read nothing and fault nothing.
__device__ __forceinline__ void tma_prefetch_2d(const TmaMap* map, int x, int y) {
    asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];" ::"l"(
                     reinterpret_cast<unsigned long long>(map)),
                 "r"(x), "r"(y)
                 : "memory");
}

__device__ __forceinline__ void tma_prefetch_3d(const TmaMap* map, int x, int y, int z) {
    asm volatile("cp.async.bulk.prefetch.tensor.3d.L2.global.tile [%0, {%1, %2, %3}];" ::"l"(
                     reinterpret_cast<unsigned long long>(map)),
                 "r"(x), "r"(y), "r"(z)
                 : "memory");
}

// 16 bytes from global to shared memory by cp.async, through L2 only (.cg);
// src_bytes 0 reads nothing and writes 16 zero bytes (a missing row, a K
// tail). dst: a shared-window address.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, unsigned src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}

// An arrival of this thread on ``bar`` once every cp.async it issued before
// has landed. .noinc: the arrival is one of those the barrier's init
// counted (without it the pending count is raised by one first, a net zero).
__device__ __forceinline__ void cp_async_arrive_noinc(unsigned long long* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(shared_address(bar)) : "memory");
}

// Wait until every cp.async this thread issued has landed.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Byte offset of 16-byte chunk ``chunk`` (0..7) of row ``row`` in a tile of
// 128-byte rows written with TMA's 128-byte swizzle (from a 1024-byte aligned
// base): within each 1024-byte atom of 8 rows, the chunk index is XORed with
// the row's index in the atom (address bits 4-6 XOR bits 7-9). wgmma's
// 128-byte-swizzle descriptors (below) read this layout.
__device__ __forceinline__ unsigned swizzle_128b_offset(int row, int chunk) {
    return static_cast<unsigned>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// Order this thread's earlier reads of shared memory written by the generic
// proxy (cp.async, plain stores) before its later async-proxy accesses
// (wgmma's operand reads, TMA).
__device__ __forceinline__ void fence_proxy_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
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

// Two fp32 values as one packed pair of 16-bit ones (lo in the low half), by
// one hardware conversion (round to nearest even; NaN stays NaN). Branch-free
// on purpose: a branch on accumulator values (common.cuh's software bf16
// rounding tests for NaN) made ptxas serialize every wgmma of the bf16
// kernels (its note C7520: "compiler-inserted WG.AR in divergent path"): each
// wgmma waited for the one before, and wait_group 1 overlapped nothing.
__device__ __forceinline__ unsigned pack_pair(bf16_t, float lo, float hi) {
    unsigned packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
}
__device__ __forceinline__ unsigned pack_pair(f16_t, float lo, float hi) {
    unsigned packed;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
}

// The group of row tile `tile_row` (in grouped_tile_offsets' units): the last
// g with tile_offsets[g] <= tile_row (empty groups share their offset with the
// next one and are skipped). The caller checked tile_row < tile_offsets[num_groups].
__device__ __forceinline__ int sm90_find_group(int tile_row, const int* __restrict__ tile_offsets,
                                               int num_groups) {
    int lo = 0, hi = num_groups - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (tile_offsets[mid] <= tile_row) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// The tile mailboxes of a persistent CTA: the load thread tells the math
// warpgroups which tile comes next through a ring of SM90_SCHED_SLOTS slots;
// tile[j % slots] holds the CTA's j-th tile (or -1: no more tiles), published
// with an arrival on full (release) and freed when every reader has read it
// (empty). A fresh barrier counts as having completed the phase before phase
// 0, so the first pass over the slots does not wait.
#define SM90_SCHED_SLOTS 2
struct Sm90Mailboxes {
    unsigned long long full[SM90_SCHED_SLOTS];
    unsigned long long empty[SM90_SCHED_SLOTS];
    long long tile[SM90_SCHED_SLOTS];
};

// One thread, before the block's barrier: `readers` threads take each tile.
__device__ __forceinline__ void sm90_mailboxes_init(Sm90Mailboxes* m, unsigned readers) {
#pragma unroll
    for (int s = 0; s < SM90_SCHED_SLOTS; ++s) {
        mbarrier_init(&m->full[s], 1);
        mbarrier_init(&m->empty[s], readers);
    }
}

// The load thread, in two steps (between them it may write more about the
// tile in shared memory of its own, indexed by the slot j % SM90_SCHED_SLOTS,
// which the readers see after their sm90_mailbox_read): wait until slot
// j % SM90_SCHED_SLOTS is free, then post the CTA's j-th tile (-1: none).
__device__ __forceinline__ void sm90_mailbox_claim(Sm90Mailboxes* m, unsigned j) {
    mbarrier_wait(&m->empty[j % SM90_SCHED_SLOTS], ((j / SM90_SCHED_SLOTS) & 1) ^ 1);
}
__device__ __forceinline__ void sm90_mailbox_post(Sm90Mailboxes* m, unsigned j, long long tile) {
    const int slot = j % SM90_SCHED_SLOTS;
    m->tile[slot] = tile;
    mbarrier_arrive(&m->full[slot]);  // release: the readers see tile[slot] and what was written with it
}
// Both steps at once (the bf16 kernels' form, kept as one body: their SASS stays as measured).
__device__ __forceinline__ void sm90_mailbox_publish(Sm90Mailboxes* m, unsigned j, long long tile) {
    const int slot = j % SM90_SCHED_SLOTS;
    mbarrier_wait(&m->empty[slot], ((j / SM90_SCHED_SLOTS) & 1) ^ 1);
    m->tile[slot] = tile;
    mbarrier_arrive(&m->full[slot]);  // release: the readers see tile[slot]
}

// Every reader, in two steps (between them it may read what the load thread
// wrote with the tile): the CTA's j-th tile (-1: none), then free the slot.
__device__ __forceinline__ long long sm90_mailbox_read(Sm90Mailboxes* m, unsigned j) {
    const int slot = j % SM90_SCHED_SLOTS;
    mbarrier_wait(&m->full[slot], (j / SM90_SCHED_SLOTS) & 1);  // acquire: tile[slot] is written
    return m->tile[slot];
}
__device__ __forceinline__ void sm90_mailbox_release(Sm90Mailboxes* m, unsigned j) {
    mbarrier_arrive(&m->empty[j % SM90_SCHED_SLOTS]);
}
// Both steps at once (the bf16 kernels' form, kept as one body: their SASS stays as measured).
__device__ __forceinline__ long long sm90_mailbox_take(Sm90Mailboxes* m, unsigned j) {
    const int slot = j % SM90_SCHED_SLOTS;
    mbarrier_wait(&m->full[slot], (j / SM90_SCHED_SLOTS) & 1);  // acquire: tile[slot] is written
    const long long tile = m->tile[slot];
    mbarrier_arrive(&m->empty[slot]);
    return tile;
}

// The store of one math warpgroup's 64 rows, 64 columns at a time: columns
// c0 .. c0 + 63 are accumulator registers acc[4 * (8 * p + jc) + ...] of the
// wgmma D fragment (thread t holds rows 16 * (t / 32) + (t % 32) / 4 and that
// + 8, columns 8 * j + 2 * (t % 4) and that + 1, j = 8 * p + jc). Each thread
// writes its pairs into the warpgroup's staging area (64 rows, pitch
// SM90_C_PITCH: the 8 rows one warp writes at once fall in 8 different bank
// quads), the warpgroup syncs (named barrier `barrier`), and each thread
// copies 16-byte chunks of whole rows out, so a warp writes 4 full 128-byte
// lines per instruction (from registers directly it wrote 8 half-filled
// sectors). Rows at or past row_end (the next group's, or past M) and columns
// past N are not stored; N % 8 == 0, so a chunk is all in or all out.
#define SM90_C_PITCH 72
#define SM90_C_STAGE_ELEMS (64 * SM90_C_PITCH)
template <class T, int NACC>
__device__ __forceinline__ void sm90_store_pass(const float (&acc)[NACC], int p, T* stage, T* __restrict__ out,
                                                int r_first, int row_end, int c0, int N, int barrier) {
    const int tid = threadIdx.x & 127, warp = tid >> 5, lane = tid & 31;
#pragma unroll
    for (int jc = 0; jc < 8; ++jc) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = warp * 16 + (lane >> 2) + 8 * h;
            const int i = 4 * (8 * p + jc) + 2 * h;
            *reinterpret_cast<unsigned*>(stage + r * SM90_C_PITCH + 8 * jc + 2 * (lane & 3)) =
                pack_pair(T{}, acc[i], acc[i + 1]);
        }
    }
    named_barrier_sync(barrier);  // this warpgroup's pairs are in the stage
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int chunk = tid + 128 * q;  // 64 rows x 8 chunks of 8 columns
        const int r = chunk >> 3, col = c0 + 8 * (chunk & 7);
        if (r_first + r < row_end && col < N) {
            *reinterpret_cast<uint4*>(out + static_cast<long long>(r_first + r) * N + col) =
                *reinterpret_cast<const uint4*>(stage + r * SM90_C_PITCH + 8 * (chunk & 7));
        }
    }
    named_barrier_sync(barrier);  // the stage is read before the next pass writes it
}
