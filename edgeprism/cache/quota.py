"""Per-layer quotas and a top/bottom split over the slot table's one pool (MoEpic's cache layout).

Why: with one global LRU, every layer competes for every slot, and a layer whose routing is spread
over many experts (a large working set, few reuses) pushes out the few hot units of a skewed layer
that would hit on almost every token. MoEpic (arXiv 2509.08342) gives each layer its own share of
the cache, and within a layer a share for its *top* units (an expert's most important groups: the
refactor artifact orders groups by importance, so group g is top iff g < top_groups) and one for the
rest, each run as an LRU; `schedule/adaptive.py` picks the shares from measured hit curves.

The quotas are soft. On a miss the victim comes from the layer that would then hold more than its
quota (the missing unit's own layer first, then the over-quota layer whose turn comes last), and
within that layer from its top region if the top units would exceed their share, else from its
bottom region. Pinned units are never chosen; when no over-quota layer has an unpinned unit this
class returns None and the table falls back to its eviction policy's victim, so a quota can never
make `acquire` fail where it succeeded without one.

Cost on the decode path: O(1) per access, placement and eviction (dict moves); choosing a victim
is O(number of over-quota layers) plus the pinned units stepped over at a region's old end.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.policies import IsPinned
from edgeprism.errors import ConfigError

Region = OrderedDict[SubExpertKey, None]  # resident units of one (layer, top|bottom), least recent first


class LayerQuotas:
    """Resident units per layer and region, in LRU order, against per-layer quotas.

    `quotas[layer]`: slots the layer may hold before its units become the first victims; a layer
    missing from `quotas` has quota 0. `top_slots[layer]` (<= its quota): the part of the quota meant
    for top units (group < `top_groups`); None or top_groups=0 means no split (all units bottom).
    `resident`: the units already in the table, least recently used first.
    """

    def __init__(self, num_slots: int, quotas: Mapping[int, int], top_slots: Mapping[int, int] | None,
                 top_groups: int, resident: Iterable[SubExpertKey]) -> None:
        _check(num_slots, quotas, top_slots, top_groups)
        self.quotas = dict(quotas)
        self.top_slots = dict(top_slots or {})
        self.top_groups = top_groups
        self._regions: dict[int, tuple[Region, Region]] = {}  # layer -> (bottom, top)
        self._region_of: dict[SubExpertKey, Region] = {}
        self._held: dict[int, int] = {}  # layer -> resident units, only layers holding >= 1
        self._over: set[int] = set()  # layers holding more than their quota
        for key in resident:
            self.place(key)

    # ----- bookkeeping (called by the slot table) -----

    def place(self, key: SubExpertKey) -> None:
        layer = key.layer
        regions = self._regions.get(layer)
        if regions is None:
            regions = self._regions[layer] = (OrderedDict(), OrderedDict())
        region = self._region_of[key] = regions[key.group < self.top_groups]
        region[key] = None
        held = self._held[layer] = self._held.get(layer, 0) + 1
        if held > self.quotas.get(layer, 0):
            self._over.add(layer)

    def touch(self, key: SubExpertKey) -> None:
        self._region_of[key].move_to_end(key)

    def remove(self, key: SubExpertKey) -> None:
        del self._region_of.pop(key)[key]
        layer = key.layer
        held = self._held[layer] - 1
        if held:
            self._held[layer] = held
        else:
            del self._held[layer]
        if held <= self.quotas.get(layer, 0):
            self._over.discard(layer)

    # ----- the victim -----

    def victim(self, incoming: SubExpertKey, is_pinned: IsPinned, current_layer: int,
               num_layers: int) -> SubExpertKey | None:
        """The unit to evict so that `incoming` can be placed; None: no over-quota layer can give one."""
        layer = incoming.layer
        if self._held.get(layer, 0) + 1 > self.quotas.get(layer, 0):
            found = self._victim_in(layer, incoming, is_pinned)
            if found is not None:
                return found
        others = [other for other in self._over if other != layer]
        if len(others) > 1:  # the layer whose turn comes last first: its units are needed farthest ahead
            others.sort(key=lambda other: (-((other - current_layer - 1) % num_layers), other))
        for other in others:
            found = self._victim_in(other, None, is_pinned)
            if found is not None:
                return found
        return None

    def _victim_in(self, layer: int, incoming: SubExpertKey | None, is_pinned: IsPinned) -> SubExpertKey | None:
        """Least recent unpinned unit of `layer`, from the region over its share first."""
        if layer not in self._regions:  # holds nothing yet
            return None
        bottom, top = self._regions[layer]
        top_held = len(top) + (incoming is not None and incoming.group < self.top_groups)
        first, second = (top, bottom) if top_held > self.top_slots.get(layer, 0) else (bottom, top)
        for region in (first, second):
            for key in region:
                if not is_pinned(key):
                    return key
        return None

    # ----- checks -----

    def in_lru_order(self) -> list[SubExpertKey]:
        """Every tracked unit, each region least recent first (to carry recency into new quotas)."""
        return [key for regions in self._regions.values() for region in regions for key in region]

    def tracked(self) -> set[SubExpertKey]:
        return set(self.in_lru_order())

    def check_invariants(self) -> None:
        held: dict[int, int] = {}
        for layer, regions in self._regions.items():
            for is_top, region in enumerate(regions):
                for key in region:
                    _require(key.layer == layer and (key.group < self.top_groups) == is_top, f"{key} in the wrong region")
                    _require(self._region_of[key] is region, f"{key} indexed under another region")
                held[layer] = held.get(layer, 0) + len(region)
        _require(len(self._region_of) == sum(held.values()), "region index and regions differ in size")
        held = {layer: n for layer, n in held.items() if n}
        _require(held == self._held, "per-layer resident counts are out of date")
        over = {layer for layer, n in held.items() if n > self.quotas.get(layer, 0)}
        _require(over == self._over, f"over-quota layers {sorted(self._over)}, expected {sorted(over)}")


def _check(num_slots: int, quotas: Mapping[int, int], top_slots: Mapping[int, int] | None, top_groups: int) -> None:
    """ConfigError unless the quotas fit the pool and each top share fits its layer's quota."""
    if any(isinstance(q, bool) or not isinstance(q, int) or q < 0 for q in quotas.values()):
        raise ConfigError(f"cache quotas must be whole numbers of slots >= 0, got {dict(quotas)}")
    if sum(quotas.values()) > num_slots:
        raise ConfigError(f"cache quotas sum to {sum(quotas.values())} slots but the cache has {num_slots}; "
                          "lower them (the adaptive configuration never asks for more than the cache has)")
    if isinstance(top_groups, bool) or not isinstance(top_groups, int) or top_groups < 0:
        raise ConfigError(f"top_groups must be a whole number of groups >= 0, got {top_groups!r}")
    if (top_groups > 0) != (top_slots is not None):
        raise ConfigError(f"top_groups={top_groups} with top_slots={top_slots!r}: a top/bottom split needs both "
                          "(top_groups > 0 and a top share per layer), no split neither")
    for layer, top in (top_slots or {}).items():
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= quotas.get(layer, 0):
            raise ConfigError(f"top_slots[{layer}]={top!r} must be a whole number between 0 and the layer's "
                              f"quota {quotas.get(layer, 0)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
