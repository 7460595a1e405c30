"""SlotTable: behaviour on small hand-made cases, and random op sequences under every policy."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.policies import POLICY_NAMES, EvictionPolicy, make_policy
from edgeprism.cache.slot_table import SlotTable
from edgeprism.errors import CacheFullError, ConfigError

A, B, C, D = (SubExpertKey(0, expert, 0) for expert in range(4))


def table(num_slots: int, policy: str = "lru") -> SlotTable:
    return SlotTable(num_slots, make_policy(policy))


# ----- hand-made cases -----


def test_miss_then_hit() -> None:
    t = table(2)
    assert t.acquire([A, B], step=0, current_layer=0, num_layers=1) == ([0, 1], [(A, 0), (B, 1)])
    t.release([A, B])
    assert t.acquire([B], step=1, current_layer=0, num_layers=1) == ([1], [])
    assert (t.hits, t.misses, t.accesses, t.evictions) == (1, 2, 3, 0)


def test_eviction_reuses_victim_slot() -> None:
    t = table(2)
    t.acquire([A, B], 0, 0, 1)
    t.release([A, B])
    slots, fills = t.acquire([C], 1, 0, 1)
    assert (slots, fills) == ([0], [(C, 0)])  # A was least recent
    assert t.lookup(A) is None and t.evictions == 1


def test_duplicates_share_a_slot_and_need_one_release_each() -> None:
    t = table(2)
    slots, fills = t.acquire([A, A, B], 0, 0, 1)
    assert slots == [0, 0, 1] and fills == [(A, 0), (B, 1)]
    assert (t.hits, t.misses, t.pin_count(A)) == (1, 2, 2)
    t.release([A])
    assert t.is_pinned(A)
    t.release([A, B])
    assert not t.is_pinned(A) and not t.is_pinned(B)


def test_hits_are_pinned_before_misses_evict() -> None:
    # LRU alone would evict A (least recent) for C, and then miss A: pinning hits first prevents it.
    t = table(2)
    t.acquire([A, B], 0, 0, 1)
    t.release([A, B])
    slots, fills = t.acquire([C, A], 1, 0, 1)
    assert fills == [(C, 1)] and slots == [1, 0]
    assert (t.hits, t.misses) == (1, 3)


def test_pinned_units_are_never_evicted() -> None:
    t = table(2)
    t.acquire([A], 0, 0, 1)
    t.acquire([B], 0, 0, 1)
    t.release([B])
    t.acquire([C], 1, 0, 1)
    assert t.lookup(A) == 0 and t.lookup(B) is None


def test_lookup_counts_nothing() -> None:
    t = table(1)
    t.acquire([A], 0, 0, 1)
    assert t.lookup(A) == 0 and t.lookup(B) is None
    assert t.accesses == 1


def test_release_unpinned_is_rejected_and_changes_nothing() -> None:
    t = table(2)
    t.acquire([A], 0, 0, 1)
    with pytest.raises(ValueError, match="pinned"):
        t.release([A, B])
    with pytest.raises(ValueError, match="pinned"):
        t.release([A, A])
    assert t.pin_count(A) == 1


def test_cache_full_error_says_what_to_do_and_changes_nothing() -> None:
    t = table(2)
    t.acquire([A], 0, 0, 1)
    before = snapshot(t)
    with pytest.raises(CacheFullError, match="has 2 slots but this step needs 3 distinct units.*VRAM budget"):
        t.acquire([B, C, B], 0, 0, 1)
    assert snapshot(t) == before


def test_cache_full_counts_units_not_occurrences() -> None:
    t = table(2)
    assert t.acquire([A, B, A, B], 0, 0, 1)[0] == [0, 1, 0, 1]


def test_insert_prefetched() -> None:
    t = table(2)
    assert t.insert_prefetched(A, 0, 0, 1) == 0
    assert t.insert_prefetched(A, 0, 0, 1) is None  # already resident
    assert not t.is_pinned(A)
    assert (t.prefetches, t.accesses) == (1, 0)
    t.acquire([A], 1, 0, 1)
    assert (t.hits, t.misses) == (1, 0)  # a prefetched unit is a hit when routed


def test_insert_prefetched_never_evicts_pinned() -> None:
    t = table(2)
    t.acquire([A, B], 0, 0, 1)
    assert t.insert_prefetched(C, 0, 0, 1) is None
    assert t.prefetches == 0 and t.lookup(C) is None
    t.release([B])
    assert t.insert_prefetched(C, 0, 0, 1) == 1
    assert (t.prefetches, t.evictions) == (1, 1)


def test_preload_fills_free_slots_only() -> None:
    t = table(3)
    t.acquire([A], 0, 0, 1)
    assert t.preload([A, B, B, C, D]) == [(B, 1), (C, 2)]
    assert (t.accesses, t.evictions, t.num_resident) == (1, 0, 3)
    assert not t.is_pinned(B)
    t.check_invariants()


def test_reset_counters() -> None:
    t = table(1)
    t.acquire([A], 0, 0, 1)
    t.release([A])
    t.acquire([B], 1, 0, 1)
    t.reset_counters()
    assert (t.hits, t.misses, t.evictions, t.prefetches, t.accesses) == (0, 0, 0, 0, 0)


@pytest.mark.parametrize("num_slots", [0, -3, 2.5, True, "8"])
def test_bad_slot_count(num_slots: Any) -> None:
    with pytest.raises(ConfigError, match="at least 1 slot"):
        SlotTable(num_slots, make_policy("lru"))


def test_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="valid choices"):
        make_policy("random")


# ----- random op sequences -----

KEYS = st.builds(SubExpertKey, st.integers(0, 2), st.integers(0, 2), st.integers(0, 1))
NUM_LAYERS = 3


class RecordingPolicy:
    """Forwards to a real policy and counts calls, to prove a failed acquire never reached it."""

    def __init__(self, inner: EvictionPolicy) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def on_access(self, key: SubExpertKey, step: int) -> None:
        self.calls += 1
        self.inner.on_access(key, step)

    def on_insert(self, key: SubExpertKey, step: int) -> None:
        self.calls += 1
        self.inner.on_insert(key, step)

    def on_evict(self, key: SubExpertKey) -> None:
        self.calls += 1
        self.inner.on_evict(key)

    def choose_victim(self, is_pinned: Any, step: int, current_layer: int, num_layers: int) -> SubExpertKey | None:
        self.calls += 1
        return self.inner.choose_victim(is_pinned, step, current_layer, num_layers)


def snapshot(t: SlotTable) -> tuple:
    pins = tuple(sorted((key, t.pin_count(key)) for key in t.resident_keys()))
    slots = tuple(sorted((key, t.lookup(key)) for key in t.resident_keys()))
    return slots, pins, t.hits, t.misses, t.evictions, t.prefetches


class SlotTableMachine(RuleBasedStateMachine):
    """Random acquire / release / prefetch / preload; checks what must hold after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.outstanding: list[list[SubExpertKey]] = []  # acquires not yet released
        self.routed = 0
        self.step = 0

    @initialize(policy=st.sampled_from(POLICY_NAMES), num_slots=st.integers(1, 8))
    def setup(self, policy: str, num_slots: int) -> None:
        self.policy = RecordingPolicy(make_policy(policy))
        self.table = SlotTable(num_slots, self.policy)

    def pinned_slots(self) -> dict[SubExpertKey, int | None]:
        return {key: self.table.lookup(key) for key in self.table.resident_keys() if self.table.is_pinned(key)}

    @rule(keys=st.lists(KEYS, min_size=1, max_size=6), layer=st.integers(0, NUM_LAYERS - 1))
    def acquire(self, keys: list[SubExpertKey], layer: int) -> None:
        pinned = self.pinned_slots()
        if len(set(pinned) | set(keys)) > self.table.num_slots:
            self.acquire_fails(keys, layer)
            return
        resident_before = set(self.table.resident_keys())
        slots, fills = self.table.acquire(keys, self.step, layer, NUM_LAYERS)
        assert slots == [self.table.lookup(key) for key in keys]
        assert all(self.table.is_pinned(key) for key in keys)
        assert sorted(fills) == sorted((key, self.table.lookup(key)) for key in set(keys) - resident_before)
        assert all(self.table.lookup(key) == slot for key, slot in pinned.items())
        self.routed += len(keys)
        self.outstanding.append(keys)

    def acquire_fails(self, keys: list[SubExpertKey], layer: int) -> None:
        before, calls = snapshot(self.table), self.policy.calls
        try:
            self.table.acquire(keys, self.step, layer, NUM_LAYERS)
        except CacheFullError:
            pass
        else:
            raise AssertionError("acquire should have raised CacheFullError")
        assert snapshot(self.table) == before and self.policy.calls == calls

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        keys = self.outstanding.pop(data.draw(st.integers(0, len(self.outstanding) - 1)))
        self.table.release(keys)

    @rule(key=KEYS, layer=st.integers(0, NUM_LAYERS - 1))
    def insert_prefetched(self, key: SubExpertKey, layer: int) -> None:
        pinned, was_resident = self.pinned_slots(), self.table.lookup(key) is not None
        slot = self.table.insert_prefetched(key, self.step, layer, NUM_LAYERS)
        full_of_pins = len(pinned) == self.table.num_slots
        assert (slot is None) == (was_resident or full_of_pins)
        assert all(self.table.lookup(k) == s for k, s in pinned.items())
        if slot is not None:
            assert self.table.lookup(key) == slot and not self.table.is_pinned(key)

    @rule(keys=st.lists(KEYS, max_size=4))
    def preload(self, keys: list[SubExpertKey]) -> None:
        counters = snapshot(self.table)[2:]
        self.table.preload(keys)
        assert snapshot(self.table)[2:] == counters

    @rule(tokens=st.integers(1, 5))
    def advance(self, tokens: int) -> None:
        self.step += tokens

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "table"):
            return
        self.table.check_invariants()
        assert self.table.num_resident <= self.table.num_slots
        assert self.table.hits + self.table.misses == self.table.accesses == self.routed
        expected_pins = Counter(key for keys in self.outstanding for key in keys)
        assert all(self.table.pin_count(key) == n for key, n in expected_pins.items())
        assert sum(self.table.pin_count(k) for k in self.table.resident_keys()) == sum(expected_pins.values())


TestSlotTableMachine = SlotTableMachine.TestCase
TestSlotTableMachine.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)


# ----- soft per-layer quotas and the top/bottom split -----


def released(t: SlotTable, *keys: SubExpertKey) -> None:
    """Acquire and release each key in turn (each one as its own layer's step)."""
    for key in keys:
        t.acquire([key], 0, key.layer, 2)
        t.release([key])


def test_quota_victim_comes_from_the_over_quota_layer() -> None:
    c1, a0, b0, d1 = SubExpertKey(1, 2, 0), SubExpertKey(0, 0, 0), SubExpertKey(0, 1, 0), SubExpertKey(1, 3, 0)
    t = table(3)
    t.configure({0: 1, 1: 2})
    released(t, c1, a0, b0)  # layer 0 holds 2 > 1
    released(t, d1)
    assert t.lookup(a0) is None and t.lookup(c1) is not None  # plain LRU would have evicted c1
    t.check_invariants()


def test_layer_at_its_quota_evicts_its_own_unit() -> None:
    x1, a0, b0, c0 = SubExpertKey(1, 0, 0), SubExpertKey(0, 0, 0), SubExpertKey(0, 1, 0), SubExpertKey(0, 2, 0)
    t = table(3)
    t.configure({0: 2, 1: 1})
    released(t, x1, a0, b0, c0)
    assert t.lookup(a0) is None and t.lookup(x1) is not None


@pytest.mark.parametrize(("top_slots", "incoming", "victim"), [
    (1, SubExpertKey(0, 3, 1), SubExpertKey(0, 0, 0)),  # 2 top units held > 1: the oldest top goes
    (2, SubExpertKey(0, 3, 1), SubExpertKey(0, 1, 1)),  # top at its share: the bottom unit goes
    (2, SubExpertKey(0, 3, 0), SubExpertKey(0, 0, 0)),  # a third top unit would exceed 2: a top goes
])
def test_top_bottom_split_picks_the_region(top_slots: int, incoming: SubExpertKey, victim: SubExpertKey) -> None:
    t = table(3)
    t.configure({0: 3}, top_slots={0: top_slots}, top_groups=1)
    released(t, SubExpertKey(0, 1, 1), SubExpertKey(0, 0, 0), SubExpertKey(0, 2, 0))
    released(t, incoming)
    assert t.lookup(victim) is None and t.evictions == 1
    t.check_invariants()


def test_quota_falls_back_to_the_policy_when_over_quota_units_are_pinned() -> None:
    a0, b0, c1, d1 = SubExpertKey(0, 0, 0), SubExpertKey(0, 1, 0), SubExpertKey(1, 0, 0), SubExpertKey(1, 1, 0)
    t = table(3)
    t.configure({0: 1, 1: 2})
    released(t, c1)
    t.acquire([a0, b0], 1, 0, 2)  # layer 0 over its quota, but pinned
    t.acquire([d1], 1, 1, 2)
    assert t.lookup(c1) is None and t.is_pinned(a0) and t.is_pinned(b0)


def test_configure_none_restores_the_plain_policy() -> None:
    t = table(2)
    t.configure({0: 1})
    assert t.quotas == {0: 1}
    t.configure(None)
    assert t.quotas is None
    released(t, A, B, C)
    assert t.lookup(A) is None  # plain LRU


@pytest.mark.parametrize(("quotas", "top_slots", "top_groups", "match"), [
    ({0: 2, 1: 2}, None, 0, "sum to 4 slots but the cache has 3"),
    ({0: -1}, None, 0, "whole numbers"),
    ({0: 2}, {0: 3}, 1, "between 0 and the layer's quota 2"),
    ({0: 2}, None, 1, "needs both"),
    ({0: 2}, {0: 1}, 0, "needs both"),
])
def test_bad_quotas_are_rejected_and_change_nothing(quotas: dict, top_slots: dict | None, top_groups: int,
                                                    match: str) -> None:
    t = table(3)
    with pytest.raises(ConfigError, match=match):
        t.configure(quotas, top_slots, top_groups)
    assert t.quotas is None


def test_observer_sees_every_acquire() -> None:
    t = table(2)
    seen: list[list[SubExpertKey]] = []
    t.observer = lambda keys: seen.append(list(keys))
    t.acquire([A, B, A], 0, 0, 1)
    assert seen == [[A, B, A]]


class QuotaSlotTableMachine(SlotTableMachine):
    """The same random runs, with quotas and splits reconfigured at random: every invariant of the
    plain table must still hold, and acquire must fail exactly when it would without quotas."""

    @rule(data=st.data(), top_groups=st.integers(0, 1))
    def configure(self, data: st.DataObject, top_groups: int) -> None:
        cuts = sorted(data.draw(st.lists(st.integers(0, self.table.num_slots), min_size=NUM_LAYERS, max_size=NUM_LAYERS)))
        quotas = {layer: cuts[layer] - (cuts[layer - 1] if layer else 0) for layer in range(NUM_LAYERS)}
        top_slots = {layer: data.draw(st.integers(0, q)) for layer, q in quotas.items()} if top_groups else None
        self.table.configure(quotas, top_slots, top_groups)


TestQuotaSlotTableMachine = QuotaSlotTableMachine.TestCase
TestQuotaSlotTableMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
