"""A model of the 2-CTA cluster kernel's synchronization (``kernels/sm90_cluster.cuh``),
run on the CPU under random interleavings: each thread role is a generator
that follows the kernel's steps (rank 0's draw past holes and its mailbox to
rank 1, the math mailboxes, the stage ring with ``full[s]`` counting one
arrival plus bytes and ``empty[s]`` four arrivals from both CTAs), TMA
deliveries (A to its CTA, each B half multicast to both) land in any order,
before or after the receiving CTA's expect_tx. Checked: no deadlock, every
stage read holds the fill it should (no load overwrote it, none is missing),
no delivery lands in a stage being read, every (row tile, column tile) is
computed once, and the tile counter ends at the tile count. It checks the
design, not the compiled kernel (the GPU tests do)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cublas_grouped.gemm.backends import hopper

STAGES, SLOTS = hopper.STAGES, 2
A_BYTES, HALF_BYTES = 16, 16  # any sizes: what matters is that expect_tx counts what lands


class Barrier:
    """An mbarrier: a phase completes when its pending arrivals and its
    transaction bytes both reach zero (bytes may land before they are expected)."""

    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _check(self):
        if self.pending == 0 and self.tx == 0:
            self.phase, self.pending = self.phase + 1, self.count

    def arrive(self, expect=0):
        self.tx += expect
        self.pending -= 1
        assert self.pending >= 0, "more arrivals than the barrier counts"
        self._check()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        self._check()

    def passed(self, parity):
        """try_wait.parity: the phase of this parity has completed."""
        return (self.phase & 1) != parity


def _cta():
    return {
        "full": [Barrier(1) for _ in range(STAGES)],
        "empty": [Barrier(4) for _ in range(STAGES)],
        "mail_full": [Barrier(1) for _ in range(SLOTS)],
        "mail_empty": [Barrier(2) for _ in range(SLOTS)],
        "mail": [None] * SLOTS,
        "pair_full": [Barrier(1) for _ in range(SLOTS)],
        "pair_empty": [Barrier(1) for _ in range(SLOTS)],
        "pair": [None] * SLOTS,
        "stage": [{} for _ in range(STAGES)],
        "readers": [0] * STAGES,
    }


def simulate(sizes, n_tiles, num_k, clusters, seed, expected_halves=2, release_both=True):
    """One run of the model; ``expected_halves`` and ``release_both`` break
    it on purpose (what expect_tx counts of B; whether a math warpgroup
    releases the partner's stage too)."""
    rng = random.Random(seed)
    tiles = hopper.tile_schedule(sizes)
    per_group = np.bincount(tiles[:, 0], minlength=len(sizes))
    first = np.concatenate(([0], np.cumsum(per_group)))
    total = len(tiles) * n_tiles
    state = {"counter": 0}
    computed: dict = {}
    deliveries: list = []

    def find(slot, rank):
        """find_pair_tile: whether the slot leads a pair, and rank's (group, n, m) or None."""
        g = int(np.searchsorted(first[:-1], slot // n_tiles, side="right") - 1)
        while per_group[g] == 0:
            g -= 1
        local = slot - first[g] * n_tiles
        m, n = local % per_group[g], local // per_group[g]
        return m % 2 == 0, ((g, n, m + rank) if m + rank < per_group[g] else None)

    def wait(bar, parity):
        while not bar.passed(parity):
            yield

    def producer(pair, r):
        me, slot, fills, j = pair[r], pair["index"], 0, 0
        while True:
            i, parity = j % SLOTS, (j // SLOTS) & 1
            if r == 0:
                tile = None
                while slot < total:
                    lead, tile = find(slot, 0)
                    if lead:
                        break
                    slot, state["counter"] = clusters + state["counter"], state["counter"] + 1
                slot = slot if slot < total else -1
                yield from wait(me["pair_empty"][i], parity ^ 1)
                pair[1]["pair"][i] = slot
                pair[1]["pair_full"][i].arrive()
            else:
                yield from wait(me["pair_full"][i], parity)
                slot = me["pair"][i]
                pair[0]["pair_empty"][i].arrive()
                tile = find(slot, 1)[1] if slot >= 0 else None
            yield from wait(me["mail_empty"][i], parity ^ 1)
            me["mail"][i] = -1 if slot < 0 else (slot, tile)
            me["mail_full"][i].arrive()
            if slot < 0:
                return
            for kt in range(num_k):
                f = fills + kt
                s = f % STAGES
                yield from wait(me["empty"][s], ((f // STAGES) & 1) ^ 1)
                me["full"][s].arrive(expect=(A_BYTES if tile else 0) + expected_halves * HALF_BYTES)
                if tile:
                    deliveries.append((pair[r], s, "A", f, A_BYTES))
                deliveries.extend((pair[d], s, f"B{r}", f, HALF_BYTES) for d in (0, 1))  # multicast
                yield
            fills, j = fills + num_k, j + 1
            if r == 0:
                slot, state["counter"] = clusters + state["counter"], state["counter"] + 1

    def math(pair, r, w):
        me, fills, j = pair[r], 0, 0
        while True:
            i = j % SLOTS
            yield from wait(me["mail_full"][i], (j // SLOTS) & 1)
            word = me["mail"][i]
            me["mail_empty"][i].arrive()
            if word == -1:
                return
            tile = word[1]
            for kt in range(num_k):
                f = fills + kt
                s = f % STAGES
                yield from wait(me["full"][s], (f // STAGES) & 1)
                held = me["stage"][s]
                assert held.get("B0") == f and held.get("B1") == f, f"stage {s} holds {held}, not fill {f}"
                assert tile is None or held.get("A") == f, f"stage {s} A holds {held}, not fill {f}"
                me["readers"][s] += 1
                yield
                me["readers"][s] -= 1
                for d in (0, 1) if release_both else (r, r):  # both CTAs' empty[s]
                    pair[d]["empty"][s].arrive()
            if tile is not None and w == 0:
                computed[tile] = computed.get(tile, 0) + 1
            fills, j = fills + num_k, j + 1

    roles = []
    for c in range(min(clusters, total)):  # clusters past the slots leave at once
        pair = {0: _cta(), 1: _cta(), "index": c}
        for r in (0, 1):
            roles += [producer(pair, r), math(pair, r, 0), math(pair, r, 1)]
    steps = 0
    while roles or deliveries:
        steps += 1
        assert steps < 1_000_000, "no progress: a deadlock"
        if deliveries and (not roles or rng.random() < 0.3):
            cta, s, part, f, nbytes = deliveries.pop(rng.randrange(len(deliveries)))
            assert cta["readers"][s] == 0, "a load landed in a stage being read"
            cta["stage"][s][part] = f
            cta["full"][s].complete_tx(nbytes)
            continue
        role = rng.choice(roles)
        try:
            next(role)
        except StopIteration:
            roles.remove(role)
    want = {(g, n, m) for g in range(len(sizes)) for n in range(n_tiles) for m in range(per_group[g])}
    assert set(computed) == want and set(computed.values()) <= {1}
    assert state["counter"] == (total if total >= clusters else state["counter"])
    return state["counter"], total


@pytest.mark.parametrize("seed", range(30))
def test_the_protocol_model_finishes_and_reads_what_it_should(seed):
    rng = np.random.default_rng(seed)
    e = int(rng.integers(1, 8))
    sizes = rng.integers(0, 700, e)
    sizes[rng.random(e) < 0.3] = 0
    sizes[0] = max(sizes[0], 1)
    n_tiles, num_k, clusters = int(rng.integers(1, 4)), int(rng.integers(1, 7)), int(rng.integers(1, 5))
    counter, total = simulate(sizes, n_tiles, num_k, clusters, seed)
    if total >= clusters:
        assert counter == total


@pytest.mark.parametrize("broken", [{"expected_halves": 1}, {"release_both": False}])
def test_the_model_can_fail(broken):
    """A full[s] expecting one B half too few completes before the other
    lands (a reader sees an old fill); a math warpgroup releasing its own
    CTA's empty[s] twice instead of both lets a multicast land in the
    partner's stage while it is read, or stalls."""
    sizes = np.array([300, 0, 129, 700])
    with pytest.raises(AssertionError):
        for seed in range(20):
            simulate(sizes, 2, 6, 2, seed, **broken)
