"""Per layer, what to do with each routed unit: hit, wait for its copy, fetch, compute on the CPU, or drop.

`plan` is a pure function over plain data (no tensors, no CUDA): the engine describes one layer's
routed units (score mass, and whether each is resident, in flight with an expected ready time, or
missing), gives the machine's `CostModel`, a quality floor `keep` and optionally a latency budget,
and gets a `Plan`. Keeping it pure makes it testable against brute force and cheap to call 48 times
a token.

Timing model of one layer (seconds from the moment the routing is known):

- copies serialise on one copy engine, which is busy until `copy_free_s` with copies already issued
  (prefetches, possibly for later layers); a new fetch starts after them and costs `copy_unit_s`;
- an in-flight unit that is waited for is ready at its `ready_s` (≤ `copy_free_s`: one FIFO engine);
- the CPU path runs in parallel with copies: ``cpu_seconds(n)`` for its n units (one call);
- the GPU computes the layer once everything it reads has landed and the CPU result is back:
  ``latency = max(copy finish, CPU finish) + gpu_seconds(routed units)``. The GPU term is charged
  for every routed unit whatever the plan, because the decode segment graph computes a fixed k·G
  unit slots (dropped and CPU units ride along at weight 0); it sets the prediction, not the choice.

Why the split of misses between PCIe and CPU is a count balance (identical unit sizes)
--------------------------------------------------------------------------------------
Every missing unit has the same copy price c and the same marginal CPU price b, so the latency of an
assignment depends only on the *number* n of misses sent to the CPU, never on which ones: swapping a
fetched and a CPU unit changes nothing. With at least one fetch the copy chain ends after every
in-flight copy (F ≥ W below), so waiting for in-flight units is free and they all wait. With m kept
misses, n of them on the CPU (0 ≤ n ≤ m − 1),

    L(n) = max(copy(m − n), cpu(n)) + G,   copy(k) = max(W, F + k·c),   cpu(n) = a + n·b (cpu(0) = 0),

with W the latest waited in-flight unit and F = `copy_free_s`. copy(m − n) is non-increasing in n
and cpu(n) non-decreasing for n ≥ 1, so L is minimised where the two queues cross: at
n* = ⌊(F + m·c − a) / (b + c)⌋ or n* + 1, at n = 0 (no CPU call at all), or — where W flattens the
copy term — at the smallest n whose copy chain fits under W. Checking those few counts is exact;
`tests/test_schedule.py` checks it against brute force over every assignment of small instances.
With no fetch at all (n = m), copy finish is the latest in-flight unit that is waited for; the
exchange argument again says which in-flight units to move to the CPU or drop: the latest-ready
ones (ties: lower score first), so that case is a scan over how many of them leave the copy queue.

Drops: dropping a missing (or CPU) unit saves the same time whichever it is, so for a given number
of drops the lowest-score units go first, and a case's latency never rises with more drops (so per
case only a few drop counts can win: `_Layer.drop_counts`); a plan's kept mass must stay ≥ keep × routed mass, at
least one unit is kept, a resident unit is never dropped (it costs no transfer), and at keep = 1
nothing is dropped. Without a budget the planner minimises latency, and among plans within 1e-9
(relative) of the best keeps the most mass. With `budget_s` it keeps the most mass among plans that
meet the budget (then the fewest drops, then the lowest latency); if none does, it returns the
fastest plan and says so.
Ties are broken by unit key, so a plan is a function of the set of units, not of their order.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from edgeprism.cache.keys import SubExpertKey
from edgeprism.errors import InputError
from edgeprism.schedule.cost import CostModel

REL_TIE = 1e-9  # latencies this close (relative) count as equal: the plan that keeps more mass wins


class Residency(Enum):
    RESIDENT = "resident"
    INFLIGHT = "inflight"
    MISSING = "missing"


class Action(str, Enum):
    HIT = "hit"  # resident: compute from its slot
    WAIT = "wait"  # in flight: compute once its copy lands
    FETCH = "fetch"  # missing: copy it in, then compute on the GPU
    CPU = "cpu"  # compute on the CPU from the host arena
    DROP = "drop"  # skip it (its routing weight is lost)


@dataclass(frozen=True)
class RoutedUnit:
    """One routed unit of the layer: its score mass (router weight × the group's share) and where it is."""

    key: SubExpertKey
    score: float
    residency: Residency = Residency.MISSING
    ready_s: float = 0.0  # in flight only: seconds from now until its copy lands


@dataclass(frozen=True)
class Plan:
    """The decision for each routed unit, with the predicted timing and the mass it keeps."""

    actions: tuple[tuple[SubExpertKey, Action], ...]  # sorted by key
    latency_s: float
    copy_s: float  # when the last copy the layer needs lands
    cpu_s: float  # when the CPU path finishes
    gpu_s: float
    kept_mass: float
    total_mass: float
    within_budget: bool  # True without a budget

    def action(self, key: SubExpertKey) -> Action:
        return dict(self.actions)[key]

    def keys(self, action: Action) -> tuple[SubExpertKey, ...]:
        return tuple(k for k, a in self.actions if a is action)

    def count(self, action: Action) -> int:
        return sum(a is action for _, a in self.actions)


@dataclass(frozen=True)
class _Candidate:
    latency: float
    kept: float
    copy_s: float
    cpu_s: float
    fetched: int  # -1: the no-fetch case, else how many kept misses are fetched
    inflight_out: int  # no-fetch case: how many latest in-flight units leave the copy queue
    drops: int


def routed_units(layer: int, experts: Sequence[int], weights: Sequence[float], groups: int,
                 resident: Container[SubExpertKey], inflight: Mapping[SubExpertKey, float],
                 shares: Sequence[Sequence[float]] | None = None) -> list[RoutedUnit]:
    """One token's routing as the planner's input: unit (e, g) of routed expert e with router weight w
    has score w · shares[i][g] (the group's share of its expert's output; uniform 1/G by default),
    and is resident, in flight (`inflight[key]` = seconds until it lands) or missing."""
    if len(experts) != len(weights) or (shares is not None and len(shares) != len(experts)):
        raise InputError(f"{len(experts)} experts, {len(weights)} weights and "
                         f"{None if shares is None else len(shares)} share rows do not match")
    out = []
    for i, (e, w) in enumerate(zip(experts, weights)):
        row = shares[i] if shares is not None else [1.0 / groups] * groups
        if len(row) != groups:
            raise InputError(f"expert {e}: {len(row)} group shares for {groups} groups")
        for g in range(groups):
            key = SubExpertKey(layer, e, g)
            if key in resident:
                out.append(RoutedUnit(key, w * row[g], Residency.RESIDENT))
            elif key in inflight:
                out.append(RoutedUnit(key, w * row[g], Residency.INFLIGHT, inflight[key]))
            else:
                out.append(RoutedUnit(key, w * row[g]))
    return out


def plan(units: Sequence[RoutedUnit], cost: CostModel, keep: float = 1.0, budget_s: float | None = None,
         copy_free_s: float | None = None, allow_cpu: bool = True) -> Plan:
    """The fastest plan keeping ≥ `keep` of the routed score mass (or, with `budget_s`, the one keeping
    the most mass within the budget); `copy_free_s` defaults to the latest in-flight ready time."""
    units = sorted(units, key=_by_key)
    copy_free = _validate(units, keep, budget_s, copy_free_s)
    total = math.fsum(u.score for u in units)
    missing = [u for u in units if u.residency is Residency.MISSING]
    inflight = [u for u in units if u.residency is Residency.INFLIGHT]
    if not missing and not inflight:  # the steady state of a warm cache: nothing to decide
        gpu_s = cost.gpu_seconds(len(units))
        return Plan(tuple((u.key, Action.HIT) for u in units), gpu_s, 0.0, 0.0, gpu_s, total, total,
                    budget_s is None or _close(gpu_s, budget_s))
    missing.sort(key=_drop_order)
    inflight.sort(key=lambda u: (-u.ready_s, u.score, u.key))  # latest first: they leave the queue first
    ctx = _Layer(cost.copy_unit_s, cost.cpu_call_s, cost.cpu_unit_s, copy_free, keep * total, keep < 1.0,
                 len(units), total, allow_cpu, cost.gpu_seconds(len(units)), budget_s)
    if not inflight and keep >= 1.0 and budget_s is None and allow_cpu:  # the common decode case
        fetched, copy_s, cpu_s, latency = plain_plan(len(missing), copy_free, ctx.copy_unit, ctx.cpu_call,
                                                     ctx.cpu_unit, ctx.gpu_s)
        best, within = _Candidate(latency, total, copy_s, cpu_s, fetched, 0, 0), True
    else:
        cands = list(ctx.fetch_cases(missing, inflight)) + list(ctx.nofetch_cases(missing, inflight))
        best, within = _choose(cands, budget_s)
    return _build(units, missing, inflight, best, ctx.gpu_s, total, within)


def _validate(units: Sequence[RoutedUnit], keep: float, budget_s: float | None,
              copy_free_s: float | None) -> float:
    if not (0.0 < keep <= 1.0):
        raise InputError(f"keep must be in (0, 1], got {keep}")
    if budget_s is not None and not budget_s > 0:
        raise InputError(f"budget_s must be positive, got {budget_s}")
    if len({u.key for u in units}) != len(units):
        raise InputError("a unit is routed twice in one layer's plan")
    if not all(0.0 <= u.score < math.inf and 0.0 <= u.ready_s < math.inf for u in units):  # NaN fails too
        bad = next(u for u in units if not (0.0 <= u.score < math.inf and 0.0 <= u.ready_s < math.inf))
        raise InputError(f"unit {bad.key}: score and ready_s must be finite and ≥ 0, got {bad.score}, {bad.ready_s}")
    latest = max((u.ready_s for u in units if u.residency is Residency.INFLIGHT), default=0.0)
    if copy_free_s is None:
        return latest
    if not (latest <= copy_free_s < math.inf):
        raise InputError(f"copy_free_s={copy_free_s} is before an in-flight copy of this layer lands "
                         f"({latest}): one copy engine finishes its copies in order")
    return copy_free_s


def _by_key(u: RoutedUnit) -> SubExpertKey:
    return u.key


def _drop_order(u: RoutedUnit) -> tuple[float, SubExpertKey]:
    return (u.score, u.key)


def _prefix(units: Iterable[RoutedUnit]) -> list[float]:
    return [0.0, *itertools.accumulate(u.score for u in units)]


@dataclass(frozen=True)
class _Layer:
    copy_unit: float  # c: one fetch
    cpu_call: float  # a: the CPU call's fixed cost
    cpu_unit: float  # b: one more unit on the CPU
    copy_free: float  # F
    floor: float  # keep × routed mass: a plan's kept mass (total − dropped prefix) must reach it
    may_drop: bool
    n_units: int
    total: float
    allow_cpu: bool
    gpu_s: float  # the same for every plan; part of each candidate's latency so budgets compare right
    budget: float | None

    def cpu(self, n: int) -> float:
        if n == 0:
            return 0.0
        return self.cpu_call + n * self.cpu_unit if self.allow_cpu else math.inf

    def max_drops(self, prefix: list[float]) -> int:
        """How many of a pool's lowest-score units may go (prefix: cumulative score in drop order)."""
        if not self.may_drop:
            return 0
        d = 0
        while d + 1 < len(prefix) and self.total - prefix[d + 1] >= self.floor and self.n_units - (d + 1) >= 1:
            d += 1
        return d

    def drop_counts(self, latency_of: Callable[[int], float], dmax: int) -> list[int]:
        """The drop counts of one case that can win. Its latency never rises with more drops and its
        kept mass falls, so only these can: the fewest drops reaching the case's best latency, the
        most drops, and the fewest drops meeting the budget."""
        best = latency_of(dmax)
        out = {dmax}
        need_best, need_budget = True, self.budget is not None
        for d in range(dmax):
            if not (need_best or need_budget):
                break
            lat = latency_of(d)
            if need_best and _close(lat, best):
                out.add(d)
                need_best = False
            if need_budget and _close(lat, self.budget):  # type: ignore[arg-type]
                out.add(d)
                need_budget = False
        return sorted(out)

    def fetch_cases(self, missing: list[RoutedUnit], inflight: list[RoutedUnit]) -> Iterator[_Candidate]:
        """At least one miss is fetched: every in-flight unit is waited for (its copy is ahead in the
        queue, so waiting is free); d lowest misses dropped, the rest balanced between PCIe and CPU."""
        if not missing:
            return
        prefix = _prefix(missing)
        waited = max((u.ready_s for u in inflight), default=0.0)
        splits = {}

        def latency_of(d: int) -> float:
            splits[d] = self.split(len(missing) - d, waited)
            return max(splits[d][1], splits[d][2]) + self.gpu_s

        for d in self.drop_counts(latency_of, min(self.max_drops(prefix), len(missing) - 1)):
            n_cpu, copy_s, cpu_s = splits[d] if d in splits else self.split(len(missing) - d, waited)
            yield _Candidate(max(copy_s, cpu_s) + self.gpu_s, self.total - prefix[d], copy_s, cpu_s,
                             len(missing) - d - n_cpu, 0, d)

    def split(self, m: int, waited: float) -> tuple[int, float, float]:
        """Best count n of m misses (≥ 1 fetched) on the CPU: (n, copy finish, CPU finish)."""
        return split_misses(m, waited, self.copy_free, self.copy_unit, self.cpu_call, self.cpu_unit, self.allow_cpu)

    def nofetch_cases(self, missing: list[RoutedUnit], inflight: list[RoutedUnit]) -> Iterator[_Candidate]:
        """Nothing fetched: the j latest in-flight units leave the copy queue and join the misses in
        a pool that the CPU computes, lowest scores dropped first."""
        pool = list(missing)
        for j in range(len(inflight) + 1):
            if j:
                bisect.insort(pool, inflight[j - 1], key=_drop_order)
            prefix = _prefix(pool)
            copy_s = inflight[j].ready_s if j < len(inflight) else 0.0

            def latency_of(d: int) -> float:
                return max(copy_s, self.cpu(len(pool) - d)) + self.gpu_s  # noqa: B023 - used in this iteration

            for d in self.drop_counts(latency_of, self.max_drops(prefix)):
                cpu_s = self.cpu(len(pool) - d)
                if cpu_s < math.inf:
                    yield _Candidate(max(copy_s, cpu_s) + self.gpu_s, self.total - prefix[d], copy_s, cpu_s, -1, j, d)


def split_misses(m: int, waited: float, F: float, c: float, a: float, b: float,
                 allow_cpu: bool = True) -> tuple[int, float, float]:
    """Best count n of m misses on the CPU with at least one fetched: (n, copy finish, CPU finish);
    F: copy engine free, c: one copy, a + n·b: the CPU call (module docstring)."""
    counts = {0}
    if allow_cpu and m > 1:
        cross = (F + m * c - a) / (b + c)
        flat = m - math.floor((waited - F) / c) if c > 0 and waited > F else m  # copy chain under W
        counts |= {1, m - 1, *(min(max(int(v), 0), m - 1) for v in (math.floor(cross), math.ceil(cross), flat))}
    best = (0, max(waited, F + m * c), 0.0)
    for n in sorted(counts):
        copy_s, cpu_s = max(waited, F + (m - n) * c), (a + n * b if n else 0.0)
        if max(copy_s, cpu_s) < max(best[1], best[2]):
            best = (n, copy_s, cpu_s)
    return best


def plain_plan(m: int, F: float, c: float, a: float, b: float, gpu_s: float) -> tuple[int, float, float, float]:
    """`plan` for m misses, nothing in flight, keep = 1, no budget, the CPU allowed, without building
    a `Plan`: (misses fetched — the first ones in key order — or -1 for all on the CPU, copy finish,
    CPU finish, latency). The candidates `fetch_cases` + `nofetch_cases` give in that case (one split
    with at least one fetch; everything on the CPU) and `_choose`'s pick between them, without the
    drop-count search; `plan` and the decode hot path (`MissScheduler`) both call it."""
    n_cpu, copy_s, cpu_s = split_misses(m, 0.0, F, c, a, b)
    fetch_latency, cpu_latency = max(copy_s, cpu_s) + gpu_s, a + m * b + gpu_s
    if cpu_latency < fetch_latency:  # `_choose`: equal mass, so the lower latency; ties to the fetch case
        return -1, 0.0, a + m * b, cpu_latency
    return m - n_cpu, copy_s, cpu_s, fetch_latency


def _close(a: float, b: float) -> bool:
    return a <= b + REL_TIE * max(abs(b), 1e-12)


def _choose(cands: list[_Candidate], budget_s: float | None) -> tuple[_Candidate, bool]:
    """Fastest (then most mass), or with a budget the most mass within it (then fastest); candidates
    come in a deterministic order and the first of equals wins."""
    feasible = [c for c in cands if budget_s is not None and _close(c.latency, budget_s)]
    if feasible:  # the budget is met: drop nothing more than needed, not even zero-score units
        top = max(c.kept for c in feasible)
        return min((c for c in feasible if c.kept >= top), key=lambda c: (c.drops, c.latency)), True
    fastest = min(c.latency for c in cands)
    near = [c for c in cands if _close(c.latency, fastest)]
    top = max(c.kept for c in near)
    return min((c for c in near if c.kept >= top), key=lambda c: c.latency), budget_s is None


def _build(units: list[RoutedUnit], missing: list[RoutedUnit], inflight: list[RoutedUnit], best: _Candidate,
           gpu_s: float, total: float, within: bool) -> Plan:
    acts: dict[SubExpertKey, Action] = {}
    if best.fetched >= 0:
        acts.update((u.key, Action.WAIT) for u in inflight)
        acts.update((u.key, Action.DROP) for u in missing[:best.drops])
        kept = sorted(u.key for u in missing[best.drops:])
        # adjacent keys are adjacent host rows: fetches coalesce, and the CPU path reads runs of rows
        acts.update((k, Action.FETCH if i < best.fetched else Action.CPU) for i, k in enumerate(kept))
    else:
        j = best.inflight_out
        acts.update((u.key, Action.WAIT) for u in inflight[j:])
        pool = sorted(missing + inflight[:j], key=_drop_order)
        acts.update((u.key, Action.DROP if i < best.drops else Action.CPU) for i, u in enumerate(pool))
    # kept mass as the candidate computed it: the very number the floor was checked on
    return Plan(tuple((u.key, acts.get(u.key, Action.HIT)) for u in units), best.latency, best.copy_s, best.cpu_s,
                gpu_s, best.kept, total, within)
