"""Eviction policies of the VRAM slot cache: LRU, LFU and activation-aware priority.

A policy only ranks units; it owns no slots and no weights. The slot table (``slot_table.py``) tells
it what happens (a unit was routed, placed, evicted) and asks it for a victim when a slot is needed.
Keeping the two apart lets the bookkeeping, which must stay correct, be tested once, while policies,
which only change the hit rate, can be swapped by name (``make_policy``).

``choose_victim`` runs on the per-token decode path, hundreds of times per token over thousands of
resident units, so no policy scans its resident set: LRU keeps an ordered dict, LFU one heap, the
activation policy one heap per layer (`_LazyHeap`: lazy deletion, so updating or evicting a unit
marks its old entry dead instead of searching the heap).

Pinned units (those the current layer's GEMM reads) are never returned. The slot table does not
report pins to the policy, it passes `is_pinned`; pinned units are few (one layer's working set), so
policies step over them (LRU) or park them beside the heap until they are released (LFU, activation).
"""

from __future__ import annotations

import heapq
import inspect
import logging
import math
from collections import OrderedDict
from typing import Callable, Protocol

from edgeprism.cache.keys import SubExpertKey
from edgeprism.errors import ConfigError

log = logging.getLogger(__name__)

IsPinned = Callable[[SubExpertKey], bool]
# A heap entry: [rank, seq, key, alive]; rank and seq order it, alive=False marks it dead.
HeapEntry = list

_RANK, _SEQ, _KEY, _ALIVE = 0, 1, 2, 3
_COMPACT_SLACK = 64  # heaps smaller than this are never rebuilt: not worth the work


class EvictionPolicy(Protocol):
    """What the slot table needs from a policy. Steps are decode-token counters (monotone)."""

    name: str

    def on_access(self, key: SubExpertKey, step: int) -> None:
        """Every routed use of a unit, hit or miss (called before `on_insert` on a miss)."""

    def on_insert(self, key: SubExpertKey, step: int) -> None:
        """The unit was placed into a slot and is now resident."""

    def on_evict(self, key: SubExpertKey) -> None:
        """The unit left the cache."""

    def choose_victim(
        self, is_pinned: IsPinned, step: int, current_layer: int, num_layers: int
    ) -> SubExpertKey | None:
        """The resident, unpinned unit to evict (it stays resident until `on_evict`); None if none."""


def _new_entry(rank: float, seq: int, key: SubExpertKey) -> HeapEntry:
    return [rank, seq, key, True]


class _LazyHeap:
    """A min-heap of entries with lazy deletion that parks pinned entries instead of re-sorting them.

    Entries are [rank, seq, key, alive] lists; a dead entry (alive=False) is dropped when it reaches
    the top, or when the heap is rebuilt once dead entries outnumber live ones (amortised O(1) per
    push). A pinned entry found at the top moves to `parked`; each query re-checks the parked ones,
    O(1) each, and pushes back those whose unit is no longer pinned. Pins are few and short-lived
    (one layer's working set), so this keeps queries cheap while the current layer is pinned.
    """

    def __init__(self) -> None:
        self.entries: list[HeapEntry] = []
        self.parked: list[HeapEntry] = []

    def push(self, entry: HeapEntry, num_live: int) -> None:
        heapq.heappush(self.entries, entry)
        if len(self.entries) > 2 * num_live + _COMPACT_SLACK:
            self.entries = [e for e in self.entries if e[_ALIVE]]
            heapq.heapify(self.entries)

    def best_unpinned(self, is_pinned: IsPinned) -> HeapEntry | None:
        """The smallest live entry whose unit is not pinned (left in place), or None."""
        if self.parked:
            self._unpark(is_pinned)
        heap = self.entries
        while heap:
            top = heap[0]
            if not top[_ALIVE]:
                heapq.heappop(heap)
            elif is_pinned(top[_KEY]):
                self.parked.append(heapq.heappop(heap))
            else:
                return top
        return None

    def _unpark(self, is_pinned: IsPinned) -> None:
        still_pinned: list[HeapEntry] = []
        for entry in self.parked:
            if entry[_ALIVE] and is_pinned(entry[_KEY]):
                still_pinned.append(entry)
            elif entry[_ALIVE]:
                heapq.heappush(self.entries, entry)
        self.parked = still_pinned


class LRUPolicy:
    """Evict the least recently accessed resident unit.

    A unit placed by prefetch counts as just used, else it would be the first victim before the
    layer that wanted it runs. choose_victim is O(1) plus the pinned units it steps over: pinned
    units were accessed by the current acquire, so they sit at the recent end.
    """

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[SubExpertKey, None] = OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._order)

    def on_access(self, key: SubExpertKey, step: int) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_insert(self, key: SubExpertKey, step: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_evict(self, key: SubExpertKey) -> None:
        del self._order[key]

    def choose_victim(
        self, is_pinned: IsPinned, step: int, current_layer: int, num_layers: int
    ) -> SubExpertKey | None:
        for key in self._order:
            if not is_pinned(key):
                return key
        return None


class LFUPolicy:
    """Evict the resident unit with the fewest accesses; ties go to the least recently used.

    Counts persist across evictions: they count routings, not hits. Expert popularity is a property
    of the model and the text, not of what happens to be resident; an in-cache LFU would reset a hot
    unit to 1 each time it is re-fetched and, whenever the cache thrashes, degrade to LRU (see the
    hot-unit trace in tests/test_policies.py). Memory is one int per unit ever routed, bounded by
    layers x experts x groups. A prefetched unit that was never routed has count 0 and is the first
    victim: pure LFU has no notion of prediction (the activation policy has).

    choose_victim: O(log n) amortised (lazy deletion), plus O(1) per parked pinned unit.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[SubExpertKey, int] = {}
        self._entry_of: dict[SubExpertKey, HeapEntry] = {}  # resident units only
        self._heap = _LazyHeap()  # [count, seq, key, alive] of resident units
        self._seq = 0

    def __len__(self) -> int:
        return len(self._entry_of)

    def on_access(self, key: SubExpertKey, step: int) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        if key in self._entry_of:
            self._push(key)

    def on_insert(self, key: SubExpertKey, step: int) -> None:
        self._push(key)

    def on_evict(self, key: SubExpertKey) -> None:
        self._entry_of.pop(key)[_ALIVE] = False

    def choose_victim(
        self, is_pinned: IsPinned, step: int, current_layer: int, num_layers: int
    ) -> SubExpertKey | None:
        entry = self._heap.best_unpinned(is_pinned)
        return None if entry is None else entry[_KEY]

    def _push(self, key: SubExpertKey) -> None:
        """(Re)rank `key` with its current count as the most recent unit."""
        old = self._entry_of.get(key)
        if old is not None:
            old[_ALIVE] = False
        self._seq += 1
        entry = _new_entry(self._count.get(key, 0), self._seq, key)
        self._entry_of[key] = entry
        self._heap.push(entry, len(self._entry_of))


def _log2_add(a: float, b: float) -> float:
    """log2(2**a + 2**b) without overflow; -inf is the log of 0."""
    high, low = (a, b) if a >= b else (b, a)
    if low == -math.inf:
        return high
    return high + math.log2(1.0 + 2.0 ** (low - high))


class ActivationPolicy:
    """Activation-aware priority (after MoE-Infinity): keep units that are routed often, recently,
    and whose layer runs soon; evict the unit with the lowest

        priority(k, t) = f_k(t) / r(layer_k) ** distance_weight

    f_k(t) = sum over the steps s_i at which k was routed of 2 ** (-(t - s_i) / half_life):
        an exponentially decayed routing count. It is (a) frequency over a recent window (the window
        is ~half_life / ln 2 steps) and (b) recency in one number: an access now weighs 1, one
        half_life steps ago weighs 1/2. half_life is the knob between the two: as it shrinks the
        order tends to LRU by step, as it grows to LFU. Equal priorities are broken by recency: the
        least recently touched unit goes first.
    r(l) = ((l - current_layer - 1) mod num_layers) + 1, in 1..num_layers:
        (c) how many layer-computations until layer l runs again. The next layer has r = 1; the
        current layer (being or just computed) has r = num_layers: a full pass away.

    Why this product: f_k (times 1 - 2**(-1/half_life)) estimates the probability that k is routed
    on its layer's next visit, and r is how long the unit holds its slot until then. f / r is the
    expected hits per slot-time (the "hit density" of LHD, Beckmann et al., NSDI'18): evicting the
    lowest frees the slot that earns least. On the layer-cyclic decode order it tends to Belady's
    choice (evict what is needed farthest ahead: the layer just computed), where LRU evicts exactly
    the units needed next; but a unit routed on most tokens still outranks a cold one of the next
    layer. distance_weight = 0 turns the layer term off.

    A unit placed by prefetch without being routed at that step is credited `prefetch_credit`
    accesses at its insert step: the predictor expects it to be routed soon, and without the credit a
    never-routed unit would be the first victim before the layer that wanted it runs.
    Statistics persist across evictions, for the same reason as in LFU.

    Why it is cheap: f_k(t) = 2 ** (-t / half_life) * A_k with A_k = sum_i 2 ** (s_i / half_life).
    The factor in t is the same for every unit, so the order is by A_k, which changes only when k is
    touched (`step` is not needed to choose). Each layer keeps a heap on (log2 A_k, seq); a
    :class:`_LayerRanking` caches each layer's smallest unpinned entry and ranks layers by
    log2 A_k - distance_weight * log2 r(l). choose_victim: O(num_layers) when current_layer changes,
    else O(log num_layers + log n) per layer touched since the last call (typically the previous
    victim's), plus O(1) per parked pinned unit.
    """

    name = "activation"

    def __init__(
        self, half_life: float = 16.0, distance_weight: float = 1.0, prefetch_credit: float = 1.0
    ) -> None:
        _require_positive("half_life", half_life)
        _require_positive("prefetch_credit", prefetch_credit)
        if not distance_weight >= 0:
            raise ConfigError(f"activation policy: distance_weight must be >= 0, got {distance_weight}")
        self.half_life = float(half_life)
        self.distance_weight = float(distance_weight)
        self._log2_credit = math.log2(prefetch_credit)
        self._log2_weight: dict[SubExpertKey, float] = {}  # log2 A_k, persists across evictions
        self._last_step: dict[SubExpertKey, int] = {}
        self._entry_of: dict[SubExpertKey, HeapEntry] = {}  # resident units only
        self._heaps: dict[int, _LazyHeap] = {}  # layer -> [log2 A_k, seq, key, alive] of residents
        self._resident_in_layer: dict[int, int] = {}  # only layers with >= 1 resident unit
        self._ranking = _LayerRanking(self.distance_weight)
        self._seq = 0

    def __len__(self) -> int:
        return len(self._entry_of)

    def priority_log2(self, key: SubExpertKey, step: int, current_layer: int, num_layers: int) -> float:
        """log2 of priority(key, step) in the class docstring; -inf for a unit never seen."""
        log2_f = self._log2_weight.get(key, -math.inf) - step / self.half_life
        distance = _layers_until(key.layer, current_layer, num_layers)
        return log2_f - self.distance_weight * math.log2(distance)

    def on_access(self, key: SubExpertKey, step: int) -> None:
        self._add_weight(key, step / self.half_life)
        self._last_step[key] = step
        if key in self._entry_of:
            self._push(key)

    def on_insert(self, key: SubExpertKey, step: int) -> None:
        if self._last_step.get(key) != step:  # placed by prefetch, not by a routed miss
            self._add_weight(key, step / self.half_life + self._log2_credit)
        self._resident_in_layer[key.layer] = self._resident_in_layer.get(key.layer, 0) + 1
        self._push(key)

    def on_evict(self, key: SubExpertKey) -> None:
        entry = self._entry_of.pop(key)
        entry[_ALIVE] = False
        self._ranking.note_evict(key.layer, entry)
        left = self._resident_in_layer[key.layer] - 1
        if left:
            self._resident_in_layer[key.layer] = left
        else:
            del self._resident_in_layer[key.layer]

    def choose_victim(
        self, is_pinned: IsPinned, step: int, current_layer: int, num_layers: int
    ) -> SubExpertKey | None:
        return self._ranking.choose(self._heaps, is_pinned, current_layer, num_layers)

    def _add_weight(self, key: SubExpertKey, log2_amount: float) -> None:
        self._log2_weight[key] = _log2_add(self._log2_weight.get(key, -math.inf), log2_amount)

    def _push(self, key: SubExpertKey) -> None:
        old = self._entry_of.get(key)
        if old is not None:
            old[_ALIVE] = False
        self._seq += 1
        entry = _new_entry(self._log2_weight.get(key, -math.inf), self._seq, key)
        self._entry_of[key] = entry
        heap = self._heaps.get(key.layer)
        if heap is None:
            heap = self._heaps[key.layer] = _LazyHeap()
        heap.push(entry, self._resident_in_layer[key.layer])
        self._ranking.note_push(key.layer, old, entry)


class _LayerRanking:
    """Finds the activation policy's victim without looking at every layer on every call.

    Each layer's best candidate (its smallest unpinned live entry) is cached and recomputed only when
    that layer's heap changed in a way that can move it ("stale"). Layers with pinned entries parked
    are "volatile" and recomputed on every call, since pins lapse without the policy hearing of it
    (release); pins are few, so this is cheap. A heap over layers orders the bests by
    rank - distance_weight * log2 r(layer); r depends on current_layer, so that heap is rebuilt from
    the cached bests whenever current_layer or num_layers changes: once per layer, O(num_layers).
    """

    def __init__(self, distance_weight: float) -> None:
        self._distance_weight = distance_weight
        self._best: dict[int, HeapEntry | None] = {}  # layer -> cached best; None: all pinned
        self._stale: set[int] = set()
        self._volatile: set[int] = set()
        self._order: list[tuple[float, int, int, HeapEntry]] = []  # (score, seq, layer, best)
        self._context: tuple[int, int] = (-1, -1)  # (current_layer, num_layers) of _order
        self._penalty: list[float] = []  # index r -> distance_weight * log2(r)

    def note_push(self, layer: int, old: HeapEntry | None, new: HeapEntry) -> None:
        """A unit of `layer` got a new entry: the cached best stands if untouched and still smaller."""
        best = self._best.get(layer)
        if best is None or best is old or new < best:
            self._invalidate(layer)

    def note_evict(self, layer: int, entry: HeapEntry) -> None:
        if self._best.get(layer) is entry:
            self._invalidate(layer)

    def choose(
        self, heaps: dict[int, _LazyHeap], is_pinned: IsPinned, current_layer: int, num_layers: int
    ) -> SubExpertKey | None:
        """The victim among the live entries of `heaps` (layer -> heap), never a pinned unit."""
        if (current_layer, num_layers) != self._context:
            self._rescore(current_layer, num_layers)
        for layer in self._stale.union(self._volatile) if self._volatile else self._stale:
            self._refresh(layer, heaps, is_pinned)
        self._stale.clear()
        if len(self._order) > 2 * len(self._best) + _COMPACT_SLACK:
            self._rescore(current_layer, num_layers)
        return self._top(heaps, is_pinned)

    def _invalidate(self, layer: int) -> None:
        self._best.pop(layer, None)
        self._stale.add(layer)

    def _refresh(self, layer: int, heaps: dict[int, _LazyHeap], is_pinned: IsPinned) -> None:
        heap = heaps.get(layer)
        best = None if heap is None else heap.best_unpinned(is_pinned)
        has_pinned = heap is not None and bool(heap.parked)
        if best is None and not has_pinned:  # no resident unit left in this layer
            self._best.pop(layer, None)
            self._volatile.discard(layer)
            return
        self._best[layer] = best
        if has_pinned:
            self._volatile.add(layer)
        else:
            self._volatile.discard(layer)
        if best is not None:
            heapq.heappush(self._order, (self._score(layer, best), best[_SEQ], layer, best))

    def _top(self, heaps: dict[int, _LazyHeap], is_pinned: IsPinned) -> SubExpertKey | None:
        """Smallest valid entry of _order. A best found pinned (pinned without a reported access)
        is recomputed, so correctness does not rest on how the caller reports accesses."""
        while self._order:
            _, _, layer, best = self._order[0]
            if self._best.get(layer) is not best or not best[_ALIVE]:
                heapq.heappop(self._order)
            elif is_pinned(best[_KEY]):
                heapq.heappop(self._order)
                self._refresh(layer, heaps, is_pinned)
            else:
                return best[_KEY]
        return None

    def _rescore(self, current_layer: int, num_layers: int) -> None:
        if len(self._penalty) != num_layers + 1:
            weight = self._distance_weight
            self._penalty = [0.0] + [weight * math.log2(r) for r in range(1, num_layers + 1)]
        self._context = (current_layer, num_layers)
        penalty, after = self._penalty, current_layer + 1
        self._order = [  # _score inlined: this runs for every layer, once per layer
            (best[_RANK] - penalty[(layer - after) % num_layers + 1], best[_SEQ], layer, best)
            for layer, best in self._best.items()
            if best is not None
        ]
        heapq.heapify(self._order)

    def _score(self, layer: int, best: HeapEntry) -> float:
        current_layer, num_layers = self._context
        return best[_RANK] - self._penalty[_layers_until(layer, current_layer, num_layers)]


def _layers_until(layer: int, current_layer: int, num_layers: int) -> int:
    """Layer-computations until `layer` runs again after `current_layer`: 1 (next) .. num_layers."""
    return (layer - current_layer - 1) % num_layers + 1


def _require_positive(option: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"activation policy: {option} must be > 0, got {value}")


_POLICY_CLASSES: dict[str, type[LRUPolicy] | type[LFUPolicy] | type[ActivationPolicy]] = {
    LRUPolicy.name: LRUPolicy,
    LFUPolicy.name: LFUPolicy,
    ActivationPolicy.name: ActivationPolicy,
}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICY_CLASSES)


def make_policy(name: str, **options: float) -> EvictionPolicy:
    """Build the policy called `name` (one of POLICY_NAMES) with its keyword `options`.

    Names and options come from user config, so both are checked here and reported as ConfigError
    that lists what is valid, rather than as a TypeError from deep inside a constructor.
    """
    cls = _POLICY_CLASSES.get(name)
    if cls is None:
        raise ConfigError(f"unknown cache policy {name!r}; valid choices: {', '.join(POLICY_NAMES)}")
    valid = tuple(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"cache policy {name!r} has no option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    log.debug("cache policy %s with options %s", name, options)
    return cls(**options)
