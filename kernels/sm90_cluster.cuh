// sm90_cluster.cuh: what a kernel of CTA pairs (thread block clusters of two,
// sm_90a) needs beyond sm90.cuh: the CTA's rank in its cluster and the
// cluster's index, shared::cluster addresses (mapa), arrivals on the
// partner's mbarriers, TMA loads multicast into both CTAs, the cluster
// barrier, and a mailbox that carries one 64-bit word per work item from
// rank 0's load thread to rank 1's. Included after sm90.cuh; no kernel.

__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned cluster_index() {
    unsigned r;
    asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned cluster_count() {
    unsigned r;
    asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
    return r;
}

// The shared::cluster address of `p` (this CTA's shared memory) in CTA `rank`.
__device__ __forceinline__ unsigned cluster_address(const void* p, unsigned rank) {
    unsigned out;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(shared_address(p)), "r"(rank));
    return out;
}

// A stage release in both CTAs of the pair: an arrival on `bar` here and on
// the partner's barrier at the same offset, with the default (.release.cta)
// semantics. The stage was read by wgmma, finished (wgmma.wait_group) before
// the arrival, and is refilled by TMA, so no generic-proxy access needs
// ordering at cluster scope; a .release.cluster arrival would fence the
// issuing thread on every stage (v13 measured that at 2.4x the time).
__device__ __forceinline__ void mbarrier_arrive_pair(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(cluster_address(bar, 0)) : "memory");
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(cluster_address(bar, 1)) : "memory");
}

// tma_load_2d into the same offset of both CTAs' shared memory; each CTA's
// mbarrier at `bar`'s offset receives the bytes that land in that CTA.
__device__ __forceinline__ void tma_load_2d_pair(void* dst, const TmaMap* map, unsigned long long* bar, int x, int y) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(shared_address(dst)),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(x), "r"(y), "r"(shared_address(bar)),
        "h"(static_cast<unsigned short>(0x3))
        : "memory");
}

// Every thread of both CTAs meets here (release, then acquire). Not
// .aligned: the threads of a warp may arrive at different times.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

// The pair's work items: rank 0's load thread takes each item from the tile
// counter and posts it to rank 1's load thread (post p carries item p + 1;
// item 0 is the cluster's index, known to both). `word` and `full` are read
// in rank 1 (written and arrived on by rank 0), `empty` in rank 0 (arrived on
// by rank 1). A fresh barrier counts as having completed the phase before
// phase 0, so the first pass over the slots does not wait.
#define PAIR_SLOTS 2
struct PairMailbox {
    unsigned long long full[PAIR_SLOTS];
    unsigned long long empty[PAIR_SLOTS];
    long long word[PAIR_SLOTS];
};

__device__ __forceinline__ void pair_mailbox_init(PairMailbox* box) {
#pragma unroll
    for (int i = 0; i < PAIR_SLOTS; ++i) {
        mbarrier_init(&box->full[i], 1);
        mbarrier_init(&box->empty[i], 1);
    }
}

// mbarrier_wait acquiring at cluster scope (the arrival came from the partner).
__device__ __forceinline__ void mbarrier_wait_cluster(unsigned long long* bar, unsigned phase) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(shared_address(bar)),
        "r"(phase)
        : "memory");
}

// Rank 0: post number p (p = 0, 1, ...) once rank 1 has taken post p - PAIR_SLOTS.
__device__ __forceinline__ void pair_mailbox_post(PairMailbox* box, unsigned p, long long word) {
    const int i = p % PAIR_SLOTS;
    mbarrier_wait_cluster(&box->empty[i], ((p / PAIR_SLOTS) & 1) ^ 1);
    asm volatile("st.shared::cluster.b64 [%0], %1;" ::"r"(cluster_address(&box->word[i], 1)), "l"(word) : "memory");
    // Release at cluster scope: the word is written before the arrival is seen.
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(
                     cluster_address(&box->full[i], 1))
                 : "memory");
}

// Rank 1: post number p, then its slot freed in rank 0.
__device__ __forceinline__ long long pair_mailbox_take(PairMailbox* box, unsigned p) {
    const int i = p % PAIR_SLOTS;
    mbarrier_wait_cluster(&box->full[i], (p / PAIR_SLOTS) & 1);
    const long long word = *reinterpret_cast<volatile long long*>(&box->word[i]);
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(
                     cluster_address(&box->empty[i], 0))
                 : "memory");
    return word;
}
