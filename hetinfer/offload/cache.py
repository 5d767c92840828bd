"""Sliding-window neuron cache (LLM in a Flash, Alizadeh et al. 2023; issue #15).

One `WindowCache` per layer keeps the flash neurons used in the last `window` tokens in a
preallocated slot buffer (`slots`, uint8 [capacity, record_bytes]), so a token reads from flash
only the neurons it needs that are not there yet. Occupied slots are always [0, n_used): an id
that leaves frees its slot by moving the last occupied slot into it (record bytes and
bookkeeping), so the kernels compute over `slots[:n_used]` in place, with no gather.

Window. An id is *used* at token t when `step` asks for it at t or `admit` prefetches it for t.
At `step(ids, t)` an asked id hits iff it was used at a token in [t - window, t]: window k
saves the read of a neuron idle for fewer than k tokens, the (1-p)^k miss rate of the
placement cost model. After `step(ids, t)` an id is present iff it was used in (t - window, t]
or asked at t (window 0 keeps a token's own ids only until the next step, so the kernels can
compute over them), as far as the capacity allowed.

Capacity. When the ids of the window do not fit, the least recently used leave first (ties in
any order), never one the current token needs (asked by this step, or prefetched for this token
by `admit`). When a token's own set exceeds the capacity, the misses that fit take the free
slots in ascending id order (flash ids follow store order, hottest first) and the rest are
reported with slot -1: the engine computes those from a scratch buffer.

Ids are flash-local (0 .. n_ids-1); `step` and `admit` take them sorted and unique, with tokens
that never decrease, and do not check (the engine calls them once per layer per token). Each call
costs O(len(ids) + n_used) numpy work, independent of n_ids. `offload.deploy.cache_capacity` sizes
each layer's slots from the plan's window-cache bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CacheStep:
    """What one token's lookup found and where its reads go."""
    hit_slots: np.ndarray   # int64 [n_hit]: slots of the asked ids already present (their rows are valid now)
    miss_ids: np.ndarray    # int64 [n_miss]: asked ids that must be read, ascending
    miss_slots: np.ndarray  # int64 [n_miss]: slot to read each miss into; -1: did not fit (a suffix)
    evicted: int            # ids that left the cache during this call

    @property
    def overflow(self) -> int:
        """Misses that did not fit (`miss_ids[miss_slots < 0]`, a suffix): computed from a scratch buffer."""
        return int(np.count_nonzero(self.miss_slots < 0))


class WindowCache:
    """One layer's flash neurons used in the last `window` tokens, in `slots[:n_used]`."""

    def __init__(self, n_ids: int, capacity: int, window: int, slots: np.ndarray):
        if n_ids < 0 or capacity < 0 or window < 0:
            raise ValueError(f"n_ids, capacity and window must be >= 0, got {n_ids}, {capacity}, {window}")
        if slots.dtype != np.uint8 or slots.ndim != 2 or slots.shape[0] != capacity:
            raise ValueError(f"slots must be uint8 [capacity={capacity}, record_bytes], got {slots.dtype} {slots.shape}")
        self.n_ids, self.capacity, self.window, self.slots = n_ids, capacity, window, slots
        self.n_used = 0
        self.hits = 0        # asked ids found present, cumulative
        self.misses = 0      # asked ids not present (read, or computed from scratch when they did not fit)
        self.prefetched = 0  # ids given a slot by admit (read ahead of their step)
        self._slot_of = np.full(n_ids, -1, dtype=np.int64)  # id -> slot, -1 absent
        self._id_of = np.zeros(capacity, dtype=np.int64)    # slot -> id, valid below n_used
        self._used = np.zeros(capacity, dtype=np.int64)     # slot -> last token its id was used
        self._clean_for = 0  # no id is expired for tokens up to this one (see _expire)

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def slot_of(self, ids: np.ndarray) -> np.ndarray:
        """int64 slots of `ids`, -1 where absent."""
        return self._slot_of[ids]

    def ids(self) -> np.ndarray:
        """int64 [n_used]: the id held in each occupied slot."""
        return self._id_of[:self.n_used].copy()

    def step(self, ids: np.ndarray, token: int) -> CacheStep:
        """Token `token`'s lookup of its active ids (sorted int64); read the misses into their slots
        before computing over `slots[:n_used]`. Reads into slots from `admit` must be complete:
        a step moves rows."""
        evicted = self._expire(token)
        slot = self._slot_of[ids]
        hit = slot >= 0
        hit_slots = slot[hit]
        miss_ids = ids[~hit]
        self._used[hit_slots] = token
        n = self.n_used
        gone = self._used[:n] <= token - self.window  # out of the window after this token
        if not self.window:
            gone[hit_slots] = False  # window 0 keeps this token's ids for its compute
        gone = np.flatnonzero(gone)
        short = len(miss_ids) - (self.capacity - n + len(gone))
        if short > 0:
            others = np.ones(n, dtype=bool)  # present, not asked, still in the window
            others[hit_slots] = False
            others[gone] = False
            gone = np.sort(np.concatenate([gone, self._least_recent(others, short)]))
        if len(gone):
            evicted += self._evict(gone)
            hit_slots = self._slot_of[ids[hit]]  # hits may have moved into holes
        self._clean_for = token + 1 if self.window else token
        self.hits += len(hit_slots)
        self.misses += len(miss_ids)
        return CacheStep(hit_slots, miss_ids, self._place(miss_ids, token), evicted)

    def admit(self, ids: np.ndarray, token: int) -> np.ndarray:
        """int64 [len(ids)]: the slot to read each of `ids` (sorted int64) into, ahead of the step at
        `token` (look-ahead: the ids predicted for it); -1 where no read is needed now (present) or no
        slot could be freed (its step reports it as a miss). All present ones count as used at `token`,
        so its step counts them as hits: `m = slots >= 0`, then read `ids[m]` into `slots[m]`."""
        self._expire(token)
        slot = self._slot_of[ids]
        absent = slot < 0
        self._used[slot[~absent]] = token
        new = ids[absent]
        n = self.n_used
        short = len(new) - (self.capacity - n)
        if short > 0:
            self._evict(np.sort(self._least_recent(self._used[:n] < token, short)))
        out = np.full(len(ids), -1, dtype=np.int64)
        out[absent] = self._place(new, token)
        self.prefetched += int(np.count_nonzero(out >= 0))
        return out

    def _expire(self, token: int) -> int:
        """Evict the ids last used before token - window (they cannot hit at `token`); returns how many."""
        if token <= self._clean_for:
            return 0
        self._clean_for = token
        gone = np.flatnonzero(self._used[:self.n_used] < token - self.window)
        return self._evict(gone) if len(gone) else 0

    def _least_recent(self, candidates: np.ndarray, count: int) -> np.ndarray:
        """int64 slots: the `count` least recently used of the `candidates` (bool [n_used]), all if fewer."""
        cand = np.flatnonzero(candidates)
        if len(cand) > count:
            cand = cand[np.argpartition(self._used[cand], count - 1)[:count]]
        return cand

    def _evict(self, gone: np.ndarray) -> int:
        """Free the slots `gone` (ascending, below n_used): the occupied slots past the new end move
        into the holes below it, record bytes included. Returns how many ids left."""
        old = self.n_used
        n = old - len(gone)
        self._slot_of[self._id_of[gone]] = -1
        k = int(np.searchsorted(gone, n))  # gone[:k]: the holes below the new end
        if k:
            tail = np.ones(old - n, dtype=bool)
            tail[gone[k:] - n] = False
            src = np.flatnonzero(tail)  # occupied slots past the new end, as many as holes
            src += n
            holes = gone[:k]
            self.slots[holes] = self.slots[src]
            moved = self._id_of[src]
            self._id_of[holes] = moved
            self._used[holes] = self._used[src]
            self._slot_of[moved] = holes
        self.n_used = n
        return len(gone)

    def _place(self, new: np.ndarray, token: int) -> np.ndarray:
        """Give the absent ids `new` the free slots, in order; int64 slots, -1 for those that did not fit."""
        n = self.n_used
        fit = min(len(new), self.capacity - n)
        slots = np.arange(n, n + fit)
        if fit < len(new):
            slots = np.concatenate([slots, np.full(len(new) - fit, -1, dtype=np.int64)])
            new = new[:fit]
        self._id_of[n:n + fit] = new
        self._used[n:n + fit] = token
        self._slot_of[new] = slots[:fit]
        self.n_used = n + fit
        return slots

