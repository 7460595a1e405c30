"""Eviction policies: exact hit counts on hand-made traces, and each policy against a brute-force model."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.policies import (
    POLICY_NAMES,
    ActivationPolicy,
    EvictionPolicy,
    LFUPolicy,
    make_policy,
)
from edgeprism.cache.slot_table import SlotTable
from edgeprism.errors import ConfigError

ROUNDS = 10


def unit(layer: int, expert: int, group: int = 0) -> SubExpertKey:
    return SubExpertKey(layer, expert, group)


def never_pinned(key: SubExpertKey) -> bool:
    return False


def count_hits(
    policy: EvictionPolicy, num_slots: int, trace: Iterable[tuple[int, SubExpertKey]], num_layers: int
) -> int:
    """Acquire and release each (step, unit) alone, the current layer being the unit's own."""
    table = SlotTable(num_slots, policy)
    for step, key in trace:
        table.acquire([key], step, key.layer, num_layers)
        table.release([key])
        table.check_invariants()
    return table.hits


def one_layer_trace(keys: list[SubExpertKey]) -> list[tuple[int, SubExpertKey]]:
    return list(enumerate(keys))


# ----- hand-made traces with hit counts derived by hand -----


def cyclic_trace(num_slots: int) -> list[tuple[int, SubExpertKey]]:
    """ROUNDS passes over num_slots + 1 units of one layer."""
    return one_layer_trace([unit(0, i % (num_slots + 1)) for i in range(ROUNDS * (num_slots + 1))])


@pytest.mark.parametrize("num_slots", [1, 2, 4, 7])
def test_cyclic_trace_lru_never_hits(num_slots: int) -> None:
    # Each unit is the least recently used one exactly when it is next needed.
    assert count_hits(make_policy("lru"), num_slots, cyclic_trace(num_slots), num_layers=1) == 0


@pytest.mark.parametrize("num_slots", [1, 2, 4, 7])
def test_cyclic_trace_lfu_degenerates_to_lru(num_slots: int) -> None:
    # With ties broken by recency LFU cannot do better. During pass p, residents not yet seen in it
    # have p - 1 accesses, the others p; the victim is the least recent of the lowest count, i.e. the
    # unit seen earliest in the previous pass: the one needed next (at the end of a pass, all have p
    # and the victim is this pass's first unit, needed first in the next). 0 hits, as LRU.
    assert count_hits(make_policy("lfu"), num_slots, cyclic_trace(num_slots), num_layers=1) == 0


def hot_unit_trace() -> list[tuple[int, SubExpertKey]]:
    """ROUNDS rounds of (hot unit, two fresh cold units), for 2 slots."""
    keys: list[SubExpertKey] = []
    for r in range(ROUNDS):
        keys += [unit(0, 0), unit(0, 1 + 2 * r), unit(0, 2 + 2 * r)]
    return one_layer_trace(keys)


def test_hot_unit_lru_never_hits() -> None:
    # Two cold units come between two uses of the hot one: with 2 slots LRU always drops it.
    assert count_hits(make_policy("lru"), 2, hot_unit_trace(), num_layers=1) == 0


def test_hot_unit_lfu_hits_from_third_round() -> None:
    # Round 1: every count is 1, the tie goes to the least recent, the hot unit H is evicted.
    # Round 2: H (count 2) misses and evicts the cold unit; the next cold units evict each other.
    # Rounds 3..ROUNDS: H hits. Counts persisting across evictions is what makes round 2 work.
    assert count_hits(make_policy("lfu"), 2, hot_unit_trace(), num_layers=1) == ROUNDS - 2


def hot_set_trace() -> list[tuple[int, SubExpertKey]]:
    """ROUNDS rounds of (A, B, three fresh cold units), for 4 slots."""
    keys: list[SubExpertKey] = []
    for r in range(ROUNDS):
        keys += [unit(0, 0), unit(0, 1)] + [unit(0, 2 + 3 * r + i) for i in range(3)]
    return one_layer_trace(keys)


def test_hot_set_lfu_beats_lru() -> None:
    # 5 distinct units per round in 4 slots: LRU evicts A and B just before they come back.
    # LFU: A is evicted in round 1 (all counts 1), A and B miss once more in round 2 (count 2 each),
    # then from round 3 on they outrank every cold unit: 2 hits per round.
    assert count_hits(make_policy("lru"), 4, hot_set_trace(), num_layers=1) == 0
    assert count_hits(make_policy("lfu"), 4, hot_set_trace(), num_layers=1) == 2 * (ROUNDS - 2)


def layer_cycle_trace(num_layers: int) -> list[tuple[int, SubExpertKey]]:
    """ROUNDS decode steps; each step routes expert 0 of every layer in order."""
    return [(step, unit(layer, 0)) for step in range(ROUNDS) for layer in range(num_layers)]


def test_layer_cycle_lru_never_hits() -> None:
    assert count_hits(make_policy("lru"), 2, layer_cycle_trace(3), num_layers=3) == 0


def test_layer_cycle_activation_matches_belady() -> None:
    # 3 layers, 2 slots. With the distance term dominating, the victim is the unit whose layer runs
    # farthest ahead: Belady's choice. After the 3 cold misses, hits and misses alternate (the unit
    # kept is always the next one, the other comes back one step too late): accesses 3..29 = 27,
    # hits at 3, 5, ..., 29 -> 14.
    policy = make_policy("activation", distance_weight=10.0)
    assert count_hits(policy, 2, layer_cycle_trace(3), num_layers=3) == 14


def test_layer_cycle_activation_default_beats_lru() -> None:
    assert count_hits(make_policy("activation"), 2, layer_cycle_trace(3), num_layers=3) > 0


# ----- activation policy: the three terms of its priority -----


def resident_policy(accesses: list[tuple[SubExpertKey, int]], **options: float) -> ActivationPolicy:
    """An activation policy fed (unit, step) routings; a unit is inserted at its first routing."""
    policy = ActivationPolicy(**options)
    resident: set[SubExpertKey] = set()
    for key, step in accesses:
        policy.on_access(key, step)
        if key not in resident:
            policy.on_insert(key, step)
            resident.add(key)
    return policy


def test_activation_evicts_layer_just_computed_before_next_layer() -> None:
    a, b = unit(0, 0), unit(1, 0)  # same history: routed once at step 0
    policy = resident_policy([(a, 0), (b, 0)])
    assert policy.choose_victim(never_pinned, 1, current_layer=0, num_layers=2) == a  # layer 1 is next
    assert policy.choose_victim(never_pinned, 1, current_layer=1, num_layers=2) == b  # layer 0 is next


def test_activation_next_layer_ignored_without_distance_weight() -> None:
    a, b = unit(0, 0), unit(1, 0)
    policy = resident_policy([(b, 0), (a, 0)], distance_weight=0.0)
    assert policy.choose_victim(never_pinned, 1, current_layer=0, num_layers=2) == b  # least recent


def test_activation_frequency_outweighs_distance() -> None:
    # a (just computed, r = 2) was routed 4 times, b (next, r = 1) once: 4 / 2 > 1 / 1.
    a, b = unit(0, 0), unit(1, 0)
    policy = resident_policy([(a, 10), (a, 10), (a, 10), (a, 10), (b, 10)])
    assert policy.choose_victim(never_pinned, 10, current_layer=0, num_layers=2) == b


@pytest.mark.parametrize(("half_life", "victim_expert"), [(4.0, 0), (1000.0, 1)])
def test_activation_half_life_trades_frequency_for_recency(half_life: float, victim_expert: int) -> None:
    # x: 3 routings at step 0; y: 1 routing at step 40. Short half-life: x has decayed (3/2**10 < 1),
    # evict x. Long half-life: x still counts ~2.9 > 1, evict y.
    x, y = unit(0, 0), unit(0, 1)
    policy = resident_policy([(x, 0), (x, 0), (x, 0), (y, 40)], half_life=half_life)
    assert policy.choose_victim(never_pinned, 40, current_layer=0, num_layers=1) == unit(0, victim_expert)


def test_activation_prefetched_unit_is_not_first_victim() -> None:
    # An unrouted unit would have priority 0; the prefetch credit makes it count as routed once.
    old, fetched = unit(1, 0), unit(1, 1)
    policy = resident_policy([(old, 0)])
    policy.on_insert(fetched, 8)
    assert policy.choose_victim(never_pinned, 8, current_layer=0, num_layers=2) == old


def test_lfu_prefetched_unit_without_history_goes_first() -> None:
    policy = LFUPolicy()
    policy.on_access(unit(0, 0), 0)
    policy.on_insert(unit(0, 0), 0)
    policy.on_insert(unit(0, 1), 1)
    assert policy.choose_victim(never_pinned, 1, 0, 1) == unit(0, 1)


# ----- contract shared by all policies -----


@pytest.mark.parametrize("name", ["lfu", "activation"])
def test_heaps_stay_bounded_under_many_accesses(name: str) -> None:
    # Lazy deletion leaves one dead entry per access; the heap is rebuilt once they outnumber the live.
    policy = make_policy(name)
    hot, warm, cold = unit(0, 0), unit(0, 1), unit(0, 2)
    for key in (hot, warm, cold):
        policy.on_access(key, 0)
        policy.on_insert(key, 0)
    for i in range(1000):
        policy.on_access(hot if i % 3 else warm, 0)
    assert policy.choose_victim(never_pinned, 0, 0, 1) == cold
    heap = policy._heap if name == "lfu" else policy._heaps[0]
    assert len(heap.entries) <= 2 * 3 + 64 + 1


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_no_victim_when_empty_or_all_pinned(name: str) -> None:
    policy = make_policy(name)
    assert policy.choose_victim(never_pinned, 0, 0, 2) is None
    for expert in range(3):
        policy.on_access(unit(0, expert), 0)
        policy.on_insert(unit(0, expert), 0)
    assert policy.choose_victim(lambda key: True, 0, 0, 2) is None


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_skips_pinned_and_evicted(name: str) -> None:
    policy = make_policy(name)
    keys = [unit(layer, expert) for layer in range(2) for expert in range(3)]
    for key in keys:
        policy.on_access(key, 0)
        policy.on_insert(key, 0)
    first = policy.choose_victim(never_pinned, 0, 0, 2)
    assert first is not None
    second = policy.choose_victim(lambda key: key == first, 0, 0, 2)
    assert second not in (None, first)
    policy.on_evict(first)
    assert policy.choose_victim(never_pinned, 0, 0, 2) == second


def test_policy_names() -> None:
    assert POLICY_NAMES == ("lru", "lfu", "activation")
    assert [make_policy(name).name for name in POLICY_NAMES] == list(POLICY_NAMES)


def test_unknown_policy_names_valid_choices() -> None:
    with pytest.raises(ConfigError, match="lru, lfu, activation"):
        make_policy("fifo")


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("lru", {"half_life": 4.0}),
        ("activation", {"halflife": 4.0}),
        ("activation", {"half_life": 0.0}),
        ("activation", {"half_life": -1.0}),
        ("activation", {"prefetch_credit": 0.0}),
        ("activation", {"distance_weight": -0.5}),
        ("activation", {"distance_weight": math.nan}),
    ],
)
def test_bad_policy_options(name: str, options: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        make_policy(name, **options)


# ----- each policy against a brute-force reference -----

KEYS = [unit(layer, expert) for layer in range(3) for expert in range(3)]
NUM_LAYERS = 3


class Reference:
    """What each policy should choose, computed by scanning every resident unit."""

    def __init__(self, half_life: float) -> None:
        self.half_life = half_life
        self.resident: set[SubExpertKey] = set()
        self.touched: dict[SubExpertKey, int] = {}  # sequence number of last access or insert
        self.count: dict[SubExpertKey, int] = {}
        self.weights: dict[SubExpertKey, list[int]] = {}  # steps of routings and prefetch credits
        self.last_step: dict[SubExpertKey, int] = {}
        self.seq = 0

    def access(self, key: SubExpertKey, step: int) -> None:
        self.count[key] = self.count.get(key, 0) + 1
        self.weights.setdefault(key, []).append(step)
        self.last_step[key] = step
        if key in self.resident:
            self.touch(key)

    def insert(self, key: SubExpertKey, step: int) -> None:
        if self.last_step.get(key) != step:
            self.weights.setdefault(key, []).append(step)
        self.resident.add(key)
        self.touch(key)

    def touch(self, key: SubExpertKey) -> None:
        self.seq += 1
        self.touched[key] = self.seq

    def rank(self, name: str, key: SubExpertKey, step: int, current_layer: int) -> tuple[float, int]:
        if name == "lru":
            return (0.0, self.touched[key])
        if name == "lfu":
            return (float(self.count.get(key, 0)), self.touched[key])
        f = sum(2.0 ** (-(step - s) / self.half_life) for s in self.weights.get(key, []))
        r = (key.layer - current_layer - 1) % NUM_LAYERS + 1
        return (f / r, self.touched[key])


op = st.one_of(
    st.tuples(st.just("access"), st.sampled_from(KEYS)),
    st.tuples(st.just("insert"), st.sampled_from(KEYS)),
    st.tuples(st.just("evict"), st.sampled_from(KEYS)),
    st.tuples(st.just("step"), st.integers(0, 30)),
    st.tuples(st.just("victim"), st.sets(st.sampled_from(KEYS), max_size=3), st.integers(0, NUM_LAYERS - 1)),
)


@pytest.mark.parametrize("name", POLICY_NAMES)
@settings(max_examples=100, deadline=None)
@given(ops=st.lists(op, max_size=60))
def test_policy_matches_brute_force(name: str, ops: list[tuple]) -> None:
    half_life = 8.0
    policy = make_policy(name, half_life=half_life) if name == "activation" else make_policy(name)
    ref = Reference(half_life)
    step = 0
    for kind, *args in ops:
        if kind == "step":
            step += args[0]
        elif kind == "access":
            policy.on_access(args[0], step)
            ref.access(args[0], step)
        elif kind == "insert" and args[0] not in ref.resident:
            policy.on_insert(args[0], step)
            ref.insert(args[0], step)
        elif kind == "evict" and args[0] in ref.resident:
            policy.on_evict(args[0])
            ref.resident.discard(args[0])
        elif kind == "victim":
            check_victim(name, policy, ref, pinned=args[0], step=step, current_layer=args[1])


def check_victim(
    name: str, policy: EvictionPolicy, ref: Reference, pinned: set[SubExpertKey], step: int, current_layer: int
) -> None:
    victim = policy.choose_victim(pinned.__contains__, step, current_layer, NUM_LAYERS)
    candidates = ref.resident - pinned
    if not candidates:
        assert victim is None
        return
    assert victim in candidates
    best = min(ref.rank(name, key, step, current_layer) for key in candidates)
    got = ref.rank(name, victim, step, current_layer)
    if name == "activation":  # floats summed two ways: equal priorities may differ in the last bits
        assert math.isclose(got[0], best[0], rel_tol=1e-9)
    else:
        assert got == best
