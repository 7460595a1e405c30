"""Adaptive cache configuration (MoEpic): each layer's share of the expert cache and its top/bottom
split, chosen from measured hit curves by a fixed-point iteration.

Why: layers differ. One routes most tokens to a few experts (a few slots catch most accesses), another
spreads them over all experts (slots buy few hits); a global LRU gives slots to whichever misses most,
which is the wrong way round. Likewise an expert's top groups (run on most tokens) can be worth more
slots than its bottom groups (dropped by the gate at keep < 1, or bottom of MoEpic's split).

How:
- Observe. The slot table hands every `acquire`'s keys to `HitCurves.observe` (one tuple append);
  `update` replays them through one LRU stack per region (layer, top|bottom) and histograms each
  access's *stack distance* d (distinct units of that region used since its last use). An LRU of s
  slots hits exactly the accesses with d < s (Mattson et al. 1970), so the histogram's prefix sums are
  the region's hit curve H(s) for every s at once. Distances are taken at the start of each acquire,
  since the table pins an acquire's hits before its misses evict anything; a key repeated within
  one acquire is a sure hit (pinned with its first occurrence) and is counted apart. Not exact for
  multi-unit acquires: the table makes an acquire's hits older than its misses, and which units hit
  depends on s, so one stack order cannot match every size (here: units seen before, then new ones).
- Price. Saved time of a layer with q slots, t of them top: c_l · (H_top(t) + H_bottom(q - t)),
  c_l = seconds per miss of layer l (the cost model's `copy_unit_s`, or measured).
- Solve (`solve_shares`), a fixed point over the split ratios rho_l = t_l / q_l:
  1. with rho fixed, water-fill: each layer first gets `min_slots` (one token's k·G units, so decode
     can always pin a layer), then the remaining slots go one by one to the largest marginal saving
     per slot; the upper concave hull of each layer's curve makes greedy exact on non-concave curves
     (the classic cache-partitioning trick: a cliff is bought whole or not at all);
  2. with the quotas fixed, each layer's best split (the t maximising its saved time, by scan);
  3. rho <- rho + damping · (best - rho); stop when the quotas repeat and rho moved < tol, or after
     max_iter rounds. Everything is ordered by layer, so results are deterministic.
- Apply: `SlotTable.configure(quotas, top_slots, top_groups)`. Old windows fade by `history` per
  update, so the shares follow the text.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.slot_table import SlotTable
from edgeprism.errors import ConfigError

log = logging.getLogger(__name__)

Region = tuple[int, bool]  # (layer, is top)


class HitCurves:
    """LRU stack-distance histograms per region (layer, top|bottom) of the units routed to the table.

    `observe` is the table's observer: it only stores the keys (the decode path stays cheap);
    `drain` processes them. Pending batches beyond `max_pending` are drained at once, so memory
    stays bounded when `drain` is rarely called. Work per routed unit: one list scan over its
    region's distinct units (C speed; a region holds at most experts x groups units).
    """

    def __init__(self, top_groups: int, max_pending: int = 4096) -> None:
        self.top_groups = top_groups
        self.max_pending = max_pending
        self._pending: list[tuple[SubExpertKey, ...]] = []
        self._stacks: dict[Region, list[SubExpertKey]] = {}  # most recent first
        self._seen: set[SubExpertKey] = set()
        self.hist: dict[Region, list[float]] = {}  # hist[r][d]: accesses at stack distance d
        self.accesses = 0.0  # every routed key occurrence, repeats included
        self.sure_hits = 0.0  # repeats within one acquire

    def observe(self, keys: Sequence[SubExpertKey]) -> None:
        self._pending.append(tuple(keys))
        if len(self._pending) >= self.max_pending:
            self.drain()

    def drain(self) -> None:
        top_groups, stacks, hist, seen = self.top_groups, self._stacks, self.hist, self._seen
        for keys in self._pending:
            distinct = dict.fromkeys(keys)
            self.accesses += len(keys)
            self.sure_hits += len(keys) - len(distinct)
            found = []  # distances before this acquire: the table pins its hits before any miss evicts
            for key in distinct:
                region = (key.layer, key.group < top_groups)
                stack = stacks.get(region)
                if stack is None:
                    stack, hist[region] = stacks.setdefault(region, []), []
                found.append((key, stack, hist[region], stack.index(key) if key in seen else -1))
            found.sort(key=lambda entry: entry[3] < 0)  # as the table: units seen before, then cold ones
            for key, stack, counts, d in found:
                if d < 0:  # a cold miss: no distance, a miss at every size
                    seen.add(key)
                    counts.append(0.0)
                else:
                    stack.remove(key)
                    counts[d] += 1.0
                stack.insert(0, key)
        self._pending.clear()

    def fade(self, factor: float) -> None:
        """Weigh everything observed so far by `factor` (0 forgets it; the stacks are kept)."""
        for counts in self.hist.values():
            counts[:] = [c * factor for c in counts]
        self.accesses *= factor
        self.sure_hits *= factor

    def curve(self, layer: int, top: bool) -> np.ndarray:
        """H(s), s = 0..n: hits of an LRU of s slots given to this region; n = its distinct units."""
        counts = self.hist.get((layer, top), [])
        return np.concatenate(([0.0], np.cumsum(counts, dtype=np.float64)))


@dataclass(frozen=True)
class Shares:
    """One solution: slots per layer, top slots per layer, and what the curves predict for it."""

    quotas: dict[int, int]
    top_slots: dict[int, int]
    iterations: int
    converged: bool
    predicted_hits: float
    accesses: float

    @property
    def predicted_hit_rate(self) -> float:
        return self.predicted_hits / self.accesses if self.accesses else 0.0


def solve_shares(curves: Mapping[int, tuple[np.ndarray, np.ndarray]], total: int, min_slots: int,
                 miss_cost: Mapping[int, float], *, sure_hits: float = 0.0, accesses: float = 0.0,
                 tol: float = 0.01, max_iter: int = 50, damping: float = 0.5) -> Shares:
    """The fixed point described in the module docstring.

    `curves[layer]` = (H_top, H_bottom) hit curves (index = slots); layers are solved in sorted order.
    If `total` cannot give every layer `min_slots`, the minimum becomes an equal share total // layers.
    """
    layers = sorted(curves)
    minimum = min(min_slots, total // len(layers))
    if minimum < min_slots:
        log.info("%d slots cannot give %d layers %d each; minimum per layer lowered to %d",
                 total, len(layers), min_slots, minimum)
    rho = {layer: _static_split(*curves[layer]) for layer in layers}
    quotas: dict[int, int] = {}
    converged, iterations = False, 0
    while not converged and iterations < max_iter:
        iterations += 1
        values = {layer: miss_cost[layer] * _layer_curve(*curves[layer], rho[layer]) for layer in layers}
        previous, quotas = quotas, _water_fill(values, layers, total, minimum)
        moved = 0.0
        for layer in layers:
            best = _best_top(*curves[layer], quotas[layer], rho[layer]) / max(quotas[layer], 1)
            step = damping * (best - rho[layer])
            rho[layer] += step
            moved = max(moved, abs(step))
        converged = quotas == previous and moved < tol
    top_slots = {layer: _top_of(*curves[layer], quotas[layer], rho[layer]) for layer in layers}
    hits = sure_hits + sum(_hits(*curves[layer], quotas[layer], top_slots[layer]) for layer in layers)
    return Shares(quotas, top_slots, iterations, converged, hits, accesses)


def _static_split(top: np.ndarray, bottom: np.ndarray) -> float:
    """Start from the top region's share of the distinct units (the split by size)."""
    units = len(top) - 1 + len(bottom) - 1
    return (len(top) - 1) / units if units else 0.0


def _top_of(top: np.ndarray, bottom: np.ndarray, q: int, rho: float) -> int:
    """Top slots of a layer with q slots at split rho, kept within what each region can use."""
    n_top, n_bottom = len(top) - 1, len(bottom) - 1
    q = min(q, n_top + n_bottom)
    return min(max(round(rho * q), q - n_bottom, 0), n_top, q)


def _hits(top: np.ndarray, bottom: np.ndarray, q: int, t: int) -> float:
    """Hits of a layer with q slots, t of them top (slots beyond a region's units hit nothing more)."""
    n_top, n_bottom = len(top) - 1, len(bottom) - 1
    return float(top[min(t, n_top)] + bottom[min(q - t, n_bottom)])


def _layer_curve(top: np.ndarray, bottom: np.ndarray, rho: float) -> np.ndarray:
    """Hits of the layer for q = 0..n_top + n_bottom slots at split rho."""
    n_top, n_bottom = len(top) - 1, len(bottom) - 1
    q = np.arange(n_top + n_bottom + 1)
    t = np.clip(np.rint(rho * q).astype(np.int64), np.maximum(q - n_bottom, 0), np.minimum(q, n_top))  # as _top_of
    return top[t] + bottom[q - t]


def _best_top(top: np.ndarray, bottom: np.ndarray, q: int, rho: float) -> int:
    """The top slots that maximise the layer's hits with q slots; ties go to the one nearest rho·q."""
    n_top, n_bottom = len(top) - 1, len(bottom) - 1
    q = min(q, n_top + n_bottom)
    t = np.arange(max(0, q - n_bottom), min(q, n_top) + 1)
    hits = top[t] + bottom[q - t]
    best = t[hits >= hits.max()]
    return int(best[np.argmin(np.abs(best - rho * q))])


def _water_fill(values: Mapping[int, np.ndarray], layers: Sequence[int], total: int, minimum: int) -> dict[int, int]:
    """Quotas: `minimum` each, then the largest marginal values per slot of the concave hulls.

    values[layer][q]: saved time with q slots (flat beyond the array). Slots whose marginal value is 0
    are left unassigned (the table's soft quotas let any layer use them).
    """
    gains, owners, positions = [], [], []
    for index, layer in enumerate(layers):
        curve = values[layer]
        if len(curve) - 1 > minimum:
            gain = np.diff(_concave_hull(curve[minimum:]))
            gains.append(gain)
            owners.append(np.full(len(gain), index))
            positions.append(np.arange(len(gain)))
    quotas = dict.fromkeys(layers, minimum)
    if not gains:
        return quotas
    gain, owner, position = np.concatenate(gains), np.concatenate(owners), np.concatenate(positions)
    order = np.lexsort((position, owner, -gain))[: total - minimum * len(layers)]
    chosen = owner[order[gain[order] > 0]]
    for index, count in zip(*np.unique(chosen, return_counts=True)):
        quotas[layers[int(index)]] += int(count)
    return quotas


def _concave_hull(y: np.ndarray) -> np.ndarray:
    """The least concave majorant of y over x = 0..len(y)-1, at every x (monotone chain)."""
    hull: list[int] = []
    for x in range(len(y)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (y[b] - y[a]) * (x - a) <= (y[x] - y[a]) * (b - a):  # b lies on or below the chord a-x
                hull.pop()
            else:
                break
        hull.append(x)
    return np.interp(np.arange(len(y)), hull, y[hull])


class AdaptiveCacheConfig:
    """Measures per-layer hit curves from a slot table's traffic and re-partitions it on `update()`.

    Construction registers `HitCurves.observe` as `table.observer`. `min_slots` is one token's units
    of one layer (top_k x groups); `top_groups` > 0 splits each layer's share between groups
    < top_groups (the artifact's most important) and the rest; `miss_cost` is seconds per miss, one
    number or one per layer (set it again with `set_miss_cost` as measurements come in); `history`
    is the weight kept by older windows at each update.
    """

    def __init__(self, table: SlotTable, layers: Sequence[int], *, min_slots: int, top_groups: int = 0,
                 miss_cost: float | Mapping[int, float] = 1.0, history: float = 0.5, tol: float = 0.01,
                 max_iter: int = 50, damping: float = 0.5) -> None:
        if not layers:
            raise ConfigError("the adaptive cache configuration needs at least one MoE layer")
        if isinstance(min_slots, bool) or not isinstance(min_slots, int) or min_slots < 1:
            raise ConfigError(f"min_slots={min_slots!r}: must be a whole number >= 1 (top_k x groups)")
        if not (0 <= history <= 1 and 0 < damping <= 1 and tol > 0 and max_iter >= 1):
            raise ConfigError(f"adaptive cache: need 0 <= history <= 1 (got {history}), 0 < damping <= 1 "
                              f"(got {damping}), tol > 0 (got {tol}), max_iter >= 1 (got {max_iter})")
        self.table = table
        self.layers = sorted(layers)
        self.min_slots = min_slots
        self.top_groups = top_groups
        self.history, self.tol, self.max_iter, self.damping = history, tol, max_iter, damping
        self.set_miss_cost(miss_cost)
        self.curves = HitCurves(top_groups)
        self.shares: Shares | None = None
        self.observed_hit_rate: float | None = None
        self._table_hits, self._table_accesses = table.hits, table.accesses
        table.observer = self.curves.observe

    def set_miss_cost(self, miss_cost: float | Mapping[int, float]) -> None:
        costs = miss_cost if isinstance(miss_cost, Mapping) else dict.fromkeys(self.layers, miss_cost)
        if set(costs) != set(self.layers) or not all(0 < c < math.inf for c in costs.values()):
            raise ConfigError(f"miss_cost must be positive and finite for each MoE layer {self.layers}, got {miss_cost}")
        self.miss_cost = {layer: float(costs[layer]) for layer in self.layers}

    def update(self) -> Shares | None:
        """Solve on the observations so far, apply the shares to the table, fade old windows.

        Returns the new shares, or None (table unchanged) when nothing was routed since the start.
        """
        self.curves.drain()
        self._note_observed()
        if not self.curves.accesses:
            return None
        curves = {layer: (self.curves.curve(layer, True), self.curves.curve(layer, False)) for layer in self.layers}
        self.shares = solve_shares(curves, self.table.num_slots, self.min_slots, self.miss_cost,
                                   sure_hits=self.curves.sure_hits, accesses=self.curves.accesses, tol=self.tol,
                                   max_iter=self.max_iter, damping=self.damping)
        split = self.shares.top_slots if self.top_groups else None
        self.table.configure(self.shares.quotas, split, self.top_groups)
        self.curves.fade(self.history)
        log.info("adaptive cache: %s", self.summary())
        return self.shares

    def _note_observed(self) -> None:
        """The table's own hit rate since the last update (its counters may have been reset)."""
        hits, accesses = self.table.hits, self.table.accesses
        if accesses < self._table_accesses:
            self._table_hits = self._table_accesses = 0
        window = accesses - self._table_accesses
        if window:
            self.observed_hit_rate = (hits - self._table_hits) / window
        self._table_hits, self._table_accesses = hits, accesses

    def summary(self) -> dict:
        """Quotas, top slots and split ratios per layer, predicted vs observed hit rate, iterations."""
        s = self.shares
        if s is None:
            return {"quotas": None, "observed_hit_rate": self.observed_hit_rate}
        return {
            "quotas": s.quotas,
            "top_slots": s.top_slots if self.top_groups else None,
            "split": {layer: round(s.top_slots[layer] / q, 3) if q else 0.0 for layer, q in s.quotas.items()}
            if self.top_groups else None,
            "predicted_hit_rate": round(s.predicted_hit_rate, 4),
            "observed_hit_rate": None if self.observed_hit_rate is None else round(self.observed_hit_rate, 4),
            "iterations": s.iterations,
            "converged": s.converged,
        }
