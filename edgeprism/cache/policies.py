"""Eviction policies of the VRAM slot cache: LRU, LFU and activation-aware priority.

A policy only ranks units; it owns no slots and no weights. The slot table (``slot_table.py``) tells
it what happens (a unit was routed, placed, evicted) and asks it for a victim when a slot is needed.
Keeping the two apart lets the bookkeeping, which must stay correct, be tested once, while policies,
which only change the hit rate, can be swapped by name (``make_policy``).

``choose_victim`` runs on the per-token decode path, hundreds of times per token over thousands of
resident units, so no policy scans its resident set: LRU keeps an ordered dict, LFU one heap, the
activation policy one heap per layer. Heaps use lazy deletion: an entry is a small list
``[rank..., seq, key, alive]``; updating or evicting a unit marks its old entry dead instead of
searching the heap, and dead entries are dropped when they reach the top or when the heap is rebuilt
(once it holds more than twice the live entries, so the rebuild is amortised O(1) per update).

Pinned units (those the current layer's GEMM reads) are never returned; they are few (one layer's
working set), so policies step over them rather than track them.
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


def _drop_dead_top(heap: list[HeapEntry]) -> None:
    while heap and not heap[0][_ALIVE]:
        heapq.heappop(heap)


def _first_unpinned(heap: list[HeapEntry], is_pinned: IsPinned) -> HeapEntry | None:
    """Smallest live entry whose unit is not pinned; O(log n) per pinned or dead entry stepped over.

    Pinned entries are popped aside and pushed back, so the heap is unchanged apart from dead
    entries, which are dropped for good.
    """
    _drop_dead_top(heap)
    if not heap:
        return None
    if not is_pinned(heap[0][_KEY]):
        return heap[0]
    aside: list[HeapEntry] = []
    found: HeapEntry | None = None
    while heap:
        entry = heapq.heappop(heap)
        if not entry[_ALIVE]:
            continue
        aside.append(entry)
        if not is_pinned(entry[_KEY]):
            found = entry
            break
    for entry in aside:
        heapq.heappush(heap, entry)
    return found


def _compact_if_bloated(heap: list[HeapEntry], num_live: int) -> None:
    """Rebuild without dead entries once they outnumber live ones (amortised O(1) per push)."""
    if len(heap) > 2 * num_live + _COMPACT_SLACK:
        heap[:] = [entry for entry in heap if entry[_ALIVE]]
        heapq.heapify(heap)


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

    choose_victim: O(log n) amortised, plus O(log n) per pinned unit at the top of the heap.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[SubExpertKey, int] = {}
        self._entry_of: dict[SubExpertKey, HeapEntry] = {}  # resident units only
        self._heap: list[HeapEntry] = []  # [count, seq, key, alive]
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
        entry = _first_unpinned(self._heap, is_pinned)
        return None if entry is None else entry[_KEY]

    def _push(self, key: SubExpertKey) -> None:
        """(Re)rank `key` with its current count as the most recent unit."""
        old = self._entry_of.get(key)
        if old is not None:
            old[_ALIVE] = False
        self._seq += 1
        entry = _new_entry(self._count.get(key, 0), self._seq, key)
        self._entry_of[key] = entry
        heapq.heappush(self._heap, entry)
        _compact_if_bloated(self._heap, len(self._entry_of))


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
        order tends to LRU by step, as it grows to LFU. Equal f (e.g. units routed at the same
        steps) are broken by recency: the least recently touched goes first.
    r(l) = ((l - current_layer - 1) mod num_layers) + 1, in 1..num_layers:
        (c) how many layer-computations until layer l runs again. The next layer has r = 1; the
        current layer, just computed, has r = num_layers (a full pass away).

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

    Why it is cheap: f_k(t) = 2 ** (-t / half_life) * A_k with A_k = sum_i 2 ** (s_i / half_life).
    The factor in t is the same for every unit, so the order is by A_k, which changes only when k is
    touched. Each layer keeps a heap on (log2 A_k, seq); choose_victim scores each layer's smallest
    unpinned entry as log2 A_k - distance_weight * log2 r(l) and takes the lowest:
    O(num_layers + pinned * log n) per call, amortised over lazy deletions. `step` is not needed.
    Statistics persist across evictions for the same reason as in LFU.
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
        self._heaps: dict[int, list[HeapEntry]] = {}  # layer -> [log2 A_k, seq, key, alive]
        self._resident_in_layer: dict[int, int] = {}  # only layers with >= 1 resident unit
        self._seq = 0
        self._distance_penalty: list[float] = []  # index r -> distance_weight * log2(r)

    def __len__(self) -> int:
        return len(self._entry_of)

    def priority_log2(self, key: SubExpertKey, step: int, current_layer: int, num_layers: int) -> float:
        """log2 of priority(key, step) in the class docstring; -inf for a unit never seen."""
        log2_f = self._log2_weight.get(key, -math.inf) - step / self.half_life
        return log2_f - self.distance_weight * math.log2(_layers_until(key.layer, current_layer, num_layers))

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
        self._entry_of.pop(key)[_ALIVE] = False
        left = self._resident_in_layer[key.layer] - 1
        if left:
            self._resident_in_layer[key.layer] = left
        else:
            del self._resident_in_layer[key.layer]

    def choose_victim(
        self, is_pinned: IsPinned, step: int, current_layer: int, num_layers: int
    ) -> SubExpertKey | None:
        penalty = self._penalties(num_layers)
        best: tuple[float, int] | None = None
        victim: SubExpertKey | None = None
        for layer in self._resident_in_layer:
            entry = _first_unpinned(self._heaps[layer], is_pinned)
            if entry is None:
                continue
            score = (entry[_RANK] - penalty[_layers_until(layer, current_layer, num_layers)], entry[_SEQ])
            if best is None or score < best:
                best, victim = score, entry[_KEY]
        return victim

    def _add_weight(self, key: SubExpertKey, log2_amount: float) -> None:
        self._log2_weight[key] = _log2_add(self._log2_weight.get(key, -math.inf), log2_amount)

    def _push(self, key: SubExpertKey) -> None:
        old = self._entry_of.get(key)
        if old is not None:
            old[_ALIVE] = False
        self._seq += 1
        entry = _new_entry(self._log2_weight.get(key, -math.inf), self._seq, key)
        self._entry_of[key] = entry
        heap = self._heaps.setdefault(key.layer, [])
        heapq.heappush(heap, entry)
        _compact_if_bloated(heap, self._resident_in_layer[key.layer])

    def _penalties(self, num_layers: int) -> list[float]:
        """distance_weight * log2(r) for r = 0..num_layers, cached: num_layers rarely changes."""
        if len(self._distance_penalty) != num_layers + 1:
            self._distance_penalty = [0.0] + [self.distance_weight * math.log2(r) for r in range(1, num_layers + 1)]
        return self._distance_penalty


def _layers_until(layer: int, current_layer: int, num_layers: int) -> int:
    """Layer-computations until `layer` runs again after `current_layer`: 1 (next) .. num_layers (itself)."""
    return (current_layer - layer) % num_layers + 1


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
