"""The sliding-window neuron cache: window semantics, LRU under pressure, overflow, slot moves with
their record bytes (records encode their id), look-ahead admits. (Its per-layer capacities come from
the plan: tests/test_placement_plan.py.)"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetinfer.offload.cache import WindowCache

RECORD = 16  # bytes: the id and a second word derived from it, so a misplaced or stale row shows


def record(ids) -> np.ndarray:
    """uint8 [n, RECORD]: the record a flash read of `ids` would deliver."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids, ids * 31 + 7], axis=1).view(np.uint8)


def new_cache(n_ids, capacity, window) -> WindowCache:
    slots = np.full((capacity, RECORD), 0xAB, dtype=np.uint8)  # garbage until a read fills a slot
    return WindowCache(n_ids, capacity, window, slots)


def read(cache, ids, slots) -> None:
    """What the engine does with a step's misses or an admit's new ids: read each into its slot."""
    ids, slots = np.asarray(ids), np.asarray(slots)
    fit = slots >= 0
    cache.slots[slots[fit]] = record(ids[fit])


def present(cache) -> set:
    return set(cache.ids().tolist())


def check_slots(cache) -> None:
    """Occupied slots are [0, n_used), slot_of agrees with them both ways, and each row holds its id's record."""
    held = cache.ids()
    assert cache.n_used <= cache.capacity and len(set(held.tolist())) == len(held)
    np.testing.assert_array_equal(cache.slot_of(held), np.arange(cache.n_used))
    absent = np.setdiff1d(np.arange(cache.n_ids), held)
    assert (cache.slot_of(absent) == -1).all()
    np.testing.assert_array_equal(cache.slots[:cache.n_used], record(held))


def check_pressure(before, after, allowed, protected, last, capacity) -> None:
    """The ids present `after` a call, given those `before`: exactly the `allowed` (window) ones when
    they fit; otherwise the cache is full, keeps the `protected` (this token's) ids while it evicts
    others, and evicts the least recently used others first."""
    assert after <= allowed
    if len(allowed) <= capacity:
        assert after == allowed
        return
    assert len(after) == capacity
    kept_protected = protected & after
    assert kept_protected == (protected & allowed) or after <= protected
    others = (allowed & before) - protected
    kept, gone = others & after, others - after
    if kept and gone:
        assert max(last[i] for i in gone) <= min(last[i] for i in kept)


def checked_admit(cache, ids, token, last) -> None:
    before = present(cache)
    k = cache.window
    ids = np.asarray(sorted(ids), dtype=np.int64)
    live = {i for i in before if last[i] >= token - k}  # could hit at `token`: no read needed
    prefetched = cache.prefetched
    slots = cache.admit(ids, token)
    needs = np.array([i not in live for i in ids.tolist()], dtype=bool)
    assert (slots[~needs] == -1).all()
    placed = slots[needs]
    assert (np.diff((placed >= 0).astype(int)) <= 0).all()  # the ids that did not fit are a suffix
    assert cache.prefetched == prefetched + int((placed >= 0).sum())
    read(cache, ids[needs], placed)
    after = present(cache)
    wanted = set(ids.tolist())
    protected = wanted | {i for i in before if last[i] == token}
    check_pressure(before, after, live | wanted, protected, last, cache.capacity)
    if (placed < 0).any():
        assert after <= protected
    assert live & wanted <= after and set(ids[needs][placed >= 0].tolist()) <= after
    assert not set(ids[needs][placed < 0].tolist()) & after
    for i in ids.tolist():
        last[i] = token
    check_slots(cache)


def checked_step(cache, ids, token, last) -> None:
    before = present(cache)
    k = cache.window
    ids = np.asarray(sorted(ids), dtype=np.int64)
    hits_before = cache.hits + cache.misses
    s = cache.step(ids, token)
    hit_ids = np.setdiff1d(ids, s.miss_ids)
    assert set(hit_ids.tolist()) == {i for i in ids.tolist() if i in before and last[i] >= token - k}
    np.testing.assert_array_equal(s.miss_ids, np.sort(s.miss_ids))
    assert len(s.hit_slots) == len(hit_ids) and len(s.miss_slots) == len(s.miss_ids)
    np.testing.assert_array_equal(cache.slots[s.hit_slots], record(hit_ids))  # valid now, before any read
    np.testing.assert_array_equal(cache.slot_of(hit_ids), s.hit_slots)
    assert (np.diff((s.miss_slots >= 0).astype(int)) <= 0).all()
    assert s.overflow == int((s.miss_slots < 0).sum())
    read(cache, s.miss_ids, s.miss_slots)
    after = present(cache)
    assert s.evicted == len(before - (after - set(s.miss_ids.tolist())))  # left, or expired and read again
    window = {i for i in before if last[i] > token - k} | set(ids.tolist())
    check_pressure(before, after, window, set(ids.tolist()), last, cache.capacity)
    assert set(hit_ids.tolist()) <= after  # a hit is never evicted
    if s.overflow:
        assert after <= set(ids.tolist()) and len(after) == cache.capacity
    assert cache.hits + cache.misses == hits_before + len(ids)
    for i in ids.tolist():
        last[i] = token
    check_slots(cache)


tokens = st.lists(st.tuples(st.integers(1, 3),                                  # token advance
                            st.sets(st.integers(0, 29), max_size=18),           # asked ids
                            st.none() | st.sets(st.integers(0, 29), max_size=12)),  # look-ahead admit
                  min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(0, 34), window=st.integers(0, 4), seq=tokens)
def test_every_step_keeps_the_window_within_capacity(capacity, window, seq):
    cache = new_cache(30, capacity, window)
    last, token, asked = {}, 0, 0
    for advance, ids, predicted in seq:
        token += advance
        if predicted is not None:
            checked_admit(cache, predicted, token, last)
        checked_step(cache, ids, token, last)
        asked += len(ids)
    assert cache.hits + cache.misses == asked


@settings(max_examples=100, deadline=None)
@given(window=st.integers(0, 4), seq=st.lists(st.sets(st.integers(0, 29), max_size=20), min_size=1, max_size=20))
def test_present_ids_are_exactly_those_asked_in_the_window(window, seq):
    """With room for all ids, after step(ids, t) an id is present iff asked in (t - window, t] (or at t)."""
    cache = new_cache(30, 30, window)
    for t, ids in enumerate(seq):
        s = cache.step(np.asarray(sorted(ids), dtype=np.int64), t)
        read(cache, s.miss_ids, s.miss_slots)
        expect = set(ids).union(*seq[max(0, t - window + 1):t + 1])
        assert present(cache) == expect
        check_slots(cache)


def test_window_zero_never_hits_across_tokens():
    cache = new_cache(10, 10, 0)
    s = cache.step(np.array([1, 2]), 0)
    read(cache, s.miss_ids, s.miss_slots)
    assert present(cache) == {1, 2}  # kept for its own token's compute
    s = cache.step(np.array([2, 3]), 1)
    assert len(s.hit_slots) == 0 and s.miss_ids.tolist() == [2, 3] and s.evicted == 2
    read(cache, s.miss_ids, s.miss_slots)
    assert present(cache) == {2, 3} and cache.hits == 0 and cache.misses == 4
    check_slots(cache)


def test_capacity_zero_reports_every_miss_as_overflow():
    cache = WindowCache(8, 0, 3, np.zeros((0, RECORD), np.uint8))
    s = cache.step(np.array([0, 5, 7]), 0)
    assert s.miss_ids.tolist() == [0, 5, 7] and s.miss_slots.tolist() == [-1, -1, -1] and s.overflow == 3
    assert cache.n_used == 0 and cache.admit(np.array([1]), 1).tolist() == [-1]


def test_a_token_larger_than_the_capacity_overflows_and_never_exceeds_it():
    cache = new_cache(10, 3, 2)
    s = cache.step(np.arange(6), 0)
    assert s.miss_slots.tolist() == [0, 1, 2, -1, -1, -1] and s.overflow == 3 and cache.n_used == 3
    read(cache, s.miss_ids, s.miss_slots)
    s = cache.step(np.array([4, 5, 6]), 1)  # 0..2 are still in the window but must make room
    assert s.miss_ids.tolist() == [4, 5, 6] and s.overflow == 0 and s.evicted == 3
    read(cache, s.miss_ids, s.miss_slots)
    assert present(cache) == {4, 5, 6}
    s = cache.step(np.array([2, 4, 7, 8]), 2)  # 4 hits and stays; 5 and 6 go before any of this token's ids
    assert len(s.hit_slots) == 1 and s.miss_slots.tolist() == [1, 2, -1]
    read(cache, s.miss_ids, s.miss_slots)
    assert present(cache) == {2, 4, 7}
    check_slots(cache)


def test_least_recently_used_leaves_first_and_the_last_slot_fills_the_hole():
    cache = new_cache(10, 3, 5)
    for t, i in enumerate([0, 1, 2]):
        s = cache.step(np.array([i]), t)
        read(cache, s.miss_ids, s.miss_slots)
    s = cache.step(np.array([0]), 3)  # 0 is now the most recent; 1 the least
    s = cache.step(np.array([3]), 4)
    read(cache, s.miss_ids, s.miss_slots)
    assert present(cache) == {0, 2, 3} and s.evicted == 1
    check_slots(cache)
    assert cache.ids().tolist() == [0, 2, 3]  # 1 left slot 1; 2 moved in from the last slot
    cache.step(np.array([2, 3]), 5)
    s = cache.step(np.array([2, 3]), 8)  # 0 (last used at 3) leaves slot 0: the last slot's id moves in
    assert len(s.hit_slots) == 2 and s.evicted == 1 and cache.ids().tolist() == [3, 2]
    check_slots(cache)


def test_admitted_ids_hit_at_their_step_and_stay_for_the_window():
    cache = new_cache(10, 5, 2)
    slots = cache.admit(np.array([5, 6]), 1)
    assert slots.tolist() == [0, 1] and cache.prefetched == 2
    assert cache.admit(np.array([5, 6]), 1).tolist() == [-1, -1]  # present: nothing more to read
    read(cache, [5, 6], slots)
    s = cache.step(np.array([5, 7]), 1)
    assert cache.slot_of(np.array([5])).tolist() == s.hit_slots.tolist() and s.miss_ids.tolist() == [7]
    assert cache.hits == 1 and cache.misses == 1 and cache.hit_rate == 0.5
    read(cache, s.miss_ids, s.miss_slots)
    assert present(cache) == {5, 6, 7}  # 6 was read for token 1, so it stays through token 2
    cache.step(np.array([7]), 2)
    assert present(cache) == {5, 6, 7}
    cache.step(np.array([7]), 3)
    assert present(cache) == {7}
    check_slots(cache)


def test_admit_never_evicts_ids_needed_by_its_token():
    cache = new_cache(10, 2, 3)
    read(cache, [1, 2], cache.admit(np.array([1, 2]), 4))
    assert cache.admit(np.array([1, 3]), 4).tolist() == [-1, -1]  # 2 is needed by token 4 too: 3 gets no slot
    assert present(cache) == {1, 2}
    assert cache.admit(np.array([3]), 5).tolist() == [1]  # for token 5 one of 1, 2 leaves; 3 takes the last slot
    assert len(present(cache) & {1, 2}) == 1


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="slots"):
        WindowCache(4, 3, 1, np.zeros((2, RECORD), np.uint8))
    with pytest.raises(ValueError, match=">= 0"):
        WindowCache(4, 0, -1, np.zeros((0, RECORD), np.uint8))

