"""The latency planner (schedule/scheduler.py) on synthetic cost models.

Acceptance properties (hypothesis): more budget (more resident units, a lower quality floor) never
gives a slower plan; zero pressure drops nothing; the quality floor is respected; ties are
deterministic. And optimality: the plan equals brute force over every assignment of small instances.
Scores are multiples of 1/8 and floors multiples of 1/16, so mass sums are exact in binary floats.
"""

from __future__ import annotations

import itertools
import math
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeprism.cache.keys import SubExpertKey
from edgeprism.errors import InputError
from edgeprism.schedule.cost import CostModel
from edgeprism.schedule.scheduler import (
    REL_TIE,
    Action,
    Residency,
    RoutedUnit,
    plan,
    routed_units,
)

R, F, M = Residency.RESIDENT, Residency.INFLIGHT, Residency.MISSING
EXAMPLES = int(os.environ.get("EDGEPRISM_HYPOTHESIS_EXAMPLES", "40"))  # raise it for a long local sweep
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNIT_BYTES = 1 << 20


def synthetic_cost(copy_s: float, cpu_call_s: float, cpu_unit_s: float, gpu_unit_s: float = 1e-5) -> CostModel:
    """A cost model whose unit copy takes copy_s and whose CPU path costs cpu_call_s + n·cpu_unit_s."""
    return CostModel(unit_bytes=UNIT_BYTES, h2d_latency_s=0.0, h2d_sizes=(UNIT_BYTES,),
                     h2d_bytes_per_s=(UNIT_BYTES / copy_s,), cpu_call_s=cpu_call_s,
                     cpu_bytes_per_s=UNIT_BYTES / cpu_unit_s, gpu_call_s=2e-5, gpu_unit_s=gpu_unit_s)


costs = st.builds(synthetic_cost, st.sampled_from([0.5e-3, 1e-3, 2e-3, 3e-3]), st.sampled_from([0.0, 0.5e-3, 1e-3]),
                  st.sampled_from([0.25e-3, 1e-3, 2e-3, 5e-3]))


@st.composite
def layers(draw: st.DrawFn, max_units: int = 5) -> list[RoutedUnit]:
    n = draw(st.integers(1, max_units))
    keys = draw(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 3)), min_size=n, max_size=n, unique=True))
    out = []
    for e, g in keys:
        res = draw(st.sampled_from([R, F, M, M]))
        ready = draw(st.integers(0, 8)) * 0.5e-3 if res is F else 0.0
        out.append(RoutedUnit(SubExpertKey(0, e, g), draw(st.integers(0, 8)) / 8, res, ready))
    return out


keeps = st.integers(1, 16).map(lambda k: k / 16)


def latency(units: list[RoutedUnit], acts: dict, cost: CostModel, copy_free: float) -> float:
    """Independent evaluation of one assignment under the timing model of scheduler.py."""
    fetched = sum(a is Action.FETCH for a in acts.values())
    waited = max((u.ready_s for u in units if acts[u.key] is Action.WAIT), default=0.0)
    copy_s = max(waited, copy_free + fetched * cost.copy_unit_s) if fetched else waited
    cpu_s = cost.cpu_seconds(sum(a is Action.CPU for a in acts.values()))
    return max(copy_s, cpu_s) + cost.gpu_seconds(len(units))


def brute(units: list[RoutedUnit], cost: CostModel, keep: float, copy_free: float) -> list[tuple[float, float]]:
    """(latency, kept mass) of every assignment that respects the floor."""
    options = {R: [Action.HIT], F: [Action.WAIT, Action.CPU, Action.DROP], M: [Action.FETCH, Action.CPU, Action.DROP]}
    total = math.fsum(u.score for u in units)
    out = []
    for choice in itertools.product(*(options[u.residency] for u in units)):
        acts = {u.key: a for u, a in zip(units, choice)}
        kept = math.fsum(u.score for u in units if acts[u.key] is not Action.DROP)
        dropped = sum(a is Action.DROP for a in choice)
        if (keep >= 1 and dropped) or dropped == len(units) or kept < keep * total:
            continue
        out.append((latency(units, acts, cost, copy_free), kept))
    return out


def close(a: float, b: float) -> bool:
    return a <= b + REL_TIE * max(abs(b), 1e-12) * 2


def copy_free_of(units: list[RoutedUnit], extra: float) -> float:
    return max((u.ready_s for u in units if u.residency is F), default=0.0) + extra


# ---- optimality -------------------------------------------------------------------------------

@SETTINGS
@given(layers(), costs, keeps, st.sampled_from([0.0, 1e-3, 4e-3]))
def test_plan_is_optimal_against_brute_force(units: list[RoutedUnit], cost: CostModel, keep: float,
                                             extra: float) -> None:
    copy_free = copy_free_of(units, extra)
    p = plan(units, cost, keep, copy_free_s=copy_free)
    acts = dict(p.actions)
    assert p.latency_s == pytest.approx(latency(units, acts, cost, copy_free), rel=1e-12)  # prediction is honest
    options = brute(units, cost, keep, copy_free)
    best = min(lat for lat, _ in options)
    assert close(p.latency_s, best) and close(best, p.latency_s)
    assert p.kept_mass == max(k for lat, k in options if close(lat, best))  # among the fastest, keeps most


@SETTINGS
@given(layers(), costs, keeps, st.sampled_from([0.5e-3, 2e-3, 4e-3, 8e-3]))
def test_budget_keeps_the_most_mass_that_fits(units: list[RoutedUnit], cost: CostModel, keep: float,
                                              budget: float) -> None:
    copy_free = copy_free_of(units, 0.0)
    p = plan(units, cost, keep, budget_s=budget)
    options = brute(units, cost, keep, copy_free)
    fits = [k for lat, k in options if close(lat, budget)]
    assert p.within_budget == bool(fits)
    if fits:
        assert close(p.latency_s, budget) and p.kept_mass == max(fits)
    else:
        assert close(p.latency_s, min(lat for lat, _ in options))


def test_split_is_a_count_balance() -> None:
    # 10 misses, copy 1 ms, CPU 0.5 ms/call + 1 ms/unit: (10 - n)·1 = 0.5 + n·1 at n = 4.75;
    # n = 4 → max(6, 4.5) = 6 ms, n = 5 → max(5, 5.5) = 5.5 ms
    units = [RoutedUnit(SubExpertKey(0, e, 0), 1.0) for e in range(10)]
    p = plan(units, synthetic_cost(1e-3, 0.5e-3, 1e-3))
    assert (p.count(Action.FETCH), p.count(Action.CPU)) == (5, 5)
    assert p.keys(Action.FETCH) == tuple(SubExpertKey(0, e, 0) for e in range(5))  # key order: rows coalesce
    assert p.copy_s == pytest.approx(5e-3) and p.cpu_s == pytest.approx(5.5e-3)


def test_cpu_off_or_slow_means_fetch_and_fast_cpu_takes_everything() -> None:
    units = [RoutedUnit(SubExpertKey(0, e, 0), 1.0) for e in range(4)]
    assert plan(units, synthetic_cost(1e-3, 0.0, 1e-3), allow_cpu=False).count(Action.FETCH) == 4
    assert plan(units, synthetic_cost(1e-3, 0.0, 50e-3)).count(Action.FETCH) == 4
    assert plan(units, synthetic_cost(10e-3, 0.0, 1e-3)).count(Action.CPU) == 4


def test_late_prefetch_moves_to_cpu() -> None:
    # a prefetch that lands in 9 ms is slower than computing it on the CPU (1 ms)
    units = [RoutedUnit(SubExpertKey(0, 0, 0), 1.0, R), RoutedUnit(SubExpertKey(0, 1, 0), 1.0, F, 9e-3),
             RoutedUnit(SubExpertKey(0, 2, 0), 1.0, F, 0.5e-3)]
    p = plan(units, synthetic_cost(1e-3, 0.0, 1e-3))
    assert [a for _, a in p.actions] == [Action.HIT, Action.CPU, Action.WAIT]


# ---- acceptance properties ------------------------------------------------------------------------

@SETTINGS
@given(layers(max_units=10), costs, keeps, st.data())
def test_more_budget_is_never_slower(units: list[RoutedUnit], cost: CostModel, keep: float,
                                     data: st.DataObject) -> None:
    base = plan(units, cost, keep)
    # more VRAM: some missing or in-flight units are resident
    promote = data.draw(st.sets(st.sampled_from([u.key for u in units])))
    richer = [RoutedUnit(u.key, u.score, R) if u.key in promote else u for u in units]
    assert plan(richer, cost, keep, copy_free_s=copy_free_of(units, 0.0)).latency_s <= base.latency_s * (1 + 1e-12)
    # more quality budget: a lower floor
    lower = data.draw(st.integers(1, 16).map(lambda k: k / 16).filter(lambda k: k <= keep))
    assert plan(units, cost, lower).latency_s <= base.latency_s * (1 + 1e-12)
    # more latency budget keeps no less mass
    b1, b2 = sorted(data.draw(st.lists(st.sampled_from([1e-3, 3e-3, 6e-3, 20e-3]), min_size=2, max_size=2)))
    assert plan(units, cost, keep, budget_s=b2).kept_mass >= plan(units, cost, keep, budget_s=b1).kept_mass


@SETTINGS
@given(layers(max_units=10), costs, keeps)
def test_zero_pressure_drops_nothing(units: list[RoutedUnit], cost: CostModel, keep: float) -> None:
    resident = [RoutedUnit(u.key, u.score, R) for u in units]
    p = plan(resident, cost, keep)
    assert p.count(Action.HIT) == len(units) and p.latency_s == pytest.approx(cost.gpu_seconds(len(units)))
    full = plan(units, cost, 1.0)
    assert full.count(Action.DROP) == 0 and full.kept_mass == full.total_mass
    # a budget the full-quality plan already meets drops nothing either
    assert plan(units, cost, keep, budget_s=full.latency_s * 1.001).count(Action.DROP) == 0


@SETTINGS
@given(layers(max_units=12), costs, keeps, st.sampled_from([None, 1e-3, 5e-3]))
def test_quality_floor_is_respected(units: list[RoutedUnit], cost: CostModel, keep: float,
                                    budget: float | None) -> None:
    p = plan(units, cost, keep, budget_s=budget)
    assert p.kept_mass >= keep * p.total_mass
    assert p.count(Action.DROP) < len(units)
    assert all(p.action(u.key) is Action.HIT for u in units if u.residency is R)
    for u in units:  # actions match residency
        allowed = {R: {Action.HIT}, F: {Action.WAIT, Action.CPU, Action.DROP},
                   M: {Action.FETCH, Action.CPU, Action.DROP}}[u.residency]
        assert p.action(u.key) in allowed


@SETTINGS
@given(layers(max_units=12), costs, keeps, st.randoms(use_true_random=False))
def test_ties_are_deterministic(units: list[RoutedUnit], cost: CostModel, keep: float, rng: random.Random) -> None:
    shuffled = list(units)
    rng.shuffle(shuffled)
    assert plan(shuffled, cost, keep) == plan(units, cost, keep)


def test_equal_scores_drop_by_key() -> None:
    units = [RoutedUnit(SubExpertKey(0, e, 0), 1.0) for e in (3, 1, 2, 0)]
    p = plan(units, synthetic_cost(1e-3, 0.0, 1e-3), keep=0.5)
    assert p.keys(Action.DROP) == (SubExpertKey(0, 0, 0), SubExpertKey(0, 1, 0))


def test_bad_inputs_raise_typed_errors() -> None:
    cost = synthetic_cost(1e-3, 0.0, 1e-3)
    unit = RoutedUnit(SubExpertKey(0, 0, 0), 1.0)
    for kwargs in ({"keep": 0.0}, {"keep": 1.5}, {"budget_s": 0.0}):
        with pytest.raises(InputError):
            plan([unit], cost, **kwargs)
    for bad in ([unit, unit], [RoutedUnit(unit.key, -1.0)], [RoutedUnit(unit.key, float("nan"))],
                [RoutedUnit(unit.key, 1.0, F, -1.0)]):
        with pytest.raises(InputError):
            plan(bad, cost)
    with pytest.raises(InputError):
        plan([RoutedUnit(unit.key, 1.0, F, 2e-3)], cost, copy_free_s=1e-3)
    assert plan([], cost).actions == ()


def test_routed_units_from_routing() -> None:
    k = SubExpertKey
    units = routed_units(3, [5, 2], [0.75, 0.25], 2, resident={k(3, 5, 0)}, inflight={k(3, 2, 1): 1e-3},
                         shares=[[0.5, 0.5], [0.75, 0.25]])
    assert units == [RoutedUnit(k(3, 5, 0), 0.375, R), RoutedUnit(k(3, 5, 1), 0.375, M),
                     RoutedUnit(k(3, 2, 0), 0.1875, M), RoutedUnit(k(3, 2, 1), 0.0625, F, 1e-3)]
    assert [u.score for u in routed_units(0, [1], [1.0], 4, set(), {})] == [0.25] * 4
    with pytest.raises(InputError):
        routed_units(0, [1, 2], [1.0], 2, set(), {})
    with pytest.raises(InputError):
        routed_units(0, [1], [1.0], 2, set(), {}, shares=[[1.0]])
