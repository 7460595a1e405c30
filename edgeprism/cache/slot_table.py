"""Which sub-expert unit sits in which VRAM slot: the bookkeeping half of the expert cache.

The VRAM cache owns a fixed pool of equally sized slots; this table decides, in plain Python, what
goes where, and the caller moves the weights. It holds no tensors, so it can be tested exhaustively
on the CPU, and it holds no ranking logic: an :class:`EvictionPolicy` picks victims.

Pins are the safety rule. `acquire` pins every unit a layer is about to read and `release` unpins it
after the layer's GEMM is done; a pinned unit is never evicted, because the GEMM (possibly still
running on the GPU) reads its slot, and overwriting that slot would corrupt the output silently.

Opt-in, `configure` gives each layer a soft quota of slots and a top/bottom split
(:class:`~edgeprism.cache.quota.LayerQuotas`); without it the table behaves as a plain global
cache run by its policy. `observer`, when set, sees the keys of every `acquire` (the adaptive
configuration measures hit curves from them).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence, Sized

from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.policies import EvictionPolicy
from edgeprism.cache.quota import LayerQuotas
from edgeprism.errors import CacheFullError, ConfigError

log = logging.getLogger(__name__)

Fill = tuple[SubExpertKey, int]  # a unit the caller must now copy into the slot
Observer = Callable[[Sequence[SubExpertKey]], None]


class SlotTable:
    """Slot <-> unit maps, pin counts and hit/miss counters of a pool of `num_slots` VRAM slots.

    Free slots are handed out lowest first, so runs are deterministic and easy to read in tests.
    Counters: `hits` and `misses` count routed uses in `acquire` (one per key occurrence),
    `evictions` every unit pushed out (by acquire or prefetch), `prefetches` every unit placed by
    `insert_prefetched`. `preload` counts nothing: start-up filling is not traffic.
    """

    def __init__(self, num_slots: int, policy: EvictionPolicy) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ConfigError(f"the expert cache needs at least 1 slot, got num_slots={num_slots!r}")
        self.num_slots = num_slots
        self.policy = policy
        self._slot_of: dict[SubExpertKey, int] = {}
        self._key_in: list[SubExpertKey | None] = [None] * num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest slot
        self._pins: dict[SubExpertKey, int] = {}  # pinned units only, count >= 1
        self._quotas: LayerQuotas | None = None
        self.observer: Observer | None = None
        self.reset_counters()

    def configure(self, quotas: Mapping[int, int] | None, top_slots: Mapping[int, int] | None = None,
                  top_groups: int = 0) -> None:
        """Soft per-layer quotas (slots per layer, summing to at most num_slots) and, with
        `top_groups` > 0, the part `top_slots[layer]` of each quota meant for the layer's top units
        (group < top_groups); None turns quotas off. Nothing is evicted now: units move as misses
        need slots. Raises ConfigError, changing nothing, on quotas the pool cannot honour.
        """
        if quotas is None:
            self._quotas = None
            return
        resident = self._quotas.in_lru_order() if self._quotas is not None else list(self._slot_of)
        self._quotas = LayerQuotas(self.num_slots, quotas, top_slots, top_groups, resident)
        log.debug("cache quotas %s, top slots %s (top_groups=%d)", dict(quotas), top_slots, top_groups)

    @property
    def quotas(self) -> dict[int, int] | None:
        return None if self._quotas is None else dict(self._quotas.quotas)

    # ----- queries -----

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    def resident_keys(self) -> list[SubExpertKey]:
        return list(self._slot_of)

    def lookup(self, key: SubExpertKey) -> int | None:
        """The slot holding `key`, or None; counts nothing and leaves the policy alone."""
        return self._slot_of.get(key)

    def is_pinned(self, key: SubExpertKey) -> bool:
        return key in self._pins

    def pin_count(self, key: SubExpertKey) -> int:
        return self._pins.get(key, 0)

    def reset_counters(self) -> None:
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.prefetches = 0

    # ----- the decode path -----

    def acquire(
        self, keys: Sequence[SubExpertKey], step: int, current_layer: int, num_layers: int
    ) -> tuple[list[int], list[Fill]]:
        """Pin every key and give its slot (same order; a repeated key gets the same slot).

        Returns (slot per key, [(key, slot)] the caller must now fill with weights). Units already
        resident are pinned first, so a miss can never evict a unit this same call needs. A repeated
        key counts a hit after its first occurrence, and each occurrence needs its own `release`.

        Raises CacheFullError, before changing anything (table, counters, policy), when the units
        pinned at once would outnumber the slots: then no victim exists and no order of evictions
        could serve the call.
        """
        self._check_fits(keys)
        if self.observer is not None:
            self.observer(keys)
        slots = [0] * len(keys)
        missing: list[int] = []
        for i, key in enumerate(keys):
            slot = self._slot_of.get(key)
            if slot is None:
                missing.append(i)
            else:
                slots[i] = self._use_resident(key, slot, step)
        fills: list[Fill] = []
        for i in missing:
            slots[i] = self._use_missing(keys[i], step, current_layer, num_layers, fills)
        return slots, fills

    def release(self, keys: Sequence[SubExpertKey]) -> None:
        """Unpin: one release per key occurrence passed to `acquire`, once the layer no longer reads
        the slots. Checked in full before anything changes, so a bad call leaves the pins intact."""
        wanted = Counter(keys)
        for key, times in wanted.items():
            if self._pins.get(key, 0) < times:
                pinned = self.pin_count(key)
                raise ValueError(f"release of {key} x{times} but it is pinned {pinned} times")
        for key, times in wanted.items():
            left = self._pins[key] - times
            if left:
                self._pins[key] = left
            else:
                del self._pins[key]

    def count_uses(self, hits: Sequence[SubExpertKey], misses: int, step: int) -> None:
        """Count uses that did not go through `acquire` (zero-copy decode reads misses from host
        RAM without pinning anything): `hits` resident units read from their slots, `misses`
        units read from elsewhere. The policy sees the hits as accesses."""
        for key in hits:
            self.policy.on_access(key, step)
            if self._quotas is not None:
                self._quotas.touch(key)
        self.hits += len(hits)
        self.misses += misses

    def insert_prefetched(
        self, key: SubExpertKey, step: int, current_layer: int, num_layers: int
    ) -> int | None:
        """Place `key` ahead of its layer, unpinned and uncounted as hit or miss; the slot to fill.

        None when it is already resident or every slot is pinned: a prefetch is a hint, and must
        never evict a unit the current layer reads.
        """
        if key in self._slot_of:
            return None
        slot = self._claim_slot(key, step, current_layer, num_layers)
        if slot is None:
            return None
        self._place(key, slot, step)
        self.prefetches += 1
        return slot

    def discard(self, key: SubExpertKey) -> bool:
        """Drop an unpinned `key` from the cache, freeing its slot (a stale prefetch); False if it
        is pinned or not resident. Counted as an eviction."""
        slot = self._slot_of.get(key)
        if slot is None or key in self._pins:
            return False
        self._evict(key)
        self._free.append(slot)
        return True

    def preload(self, keys: Sequence[SubExpertKey]) -> list[Fill]:
        """Fill free slots at start-up (no eviction, nothing counted); returns what to fill.

        Keys that are already resident, repeated, or beyond the free slots are skipped.
        """
        fills: list[Fill] = []
        for key in keys:
            if not self._free:
                break
            if key not in self._slot_of:
                slot = self._free.pop()
                self._place(key, slot, step=0)
                fills.append((key, slot))
        log.info("preloaded %d units into %d slots", len(fills), self.num_slots)
        return fills

    # ----- internals -----

    def _check_fits(self, keys: Sequence[SubExpertKey]) -> None:
        """Raise CacheFullError if pinning `keys` on top of the current pins needs more than all slots.

        This is exact: while fewer units are pinned than there are slots, a full cache always holds
        an unpinned unit to evict, so acquire cannot get stuck half-way.
        """
        new_pins = {key for key in keys if key not in self._pins}
        needed = len(self._pins) + len(new_pins)
        if needed > self.num_slots:
            raise CacheFullError(
                f"the expert cache has {self.num_slots} slots but this step needs {needed} distinct "
                f"units pinned at once ({len(self._pins)} already pinned, {len(new_pins)} more in this "
                "call); raise the VRAM budget"
            )

    def _use_resident(self, key: SubExpertKey, slot: int, step: int) -> int:
        self._pins[key] = self._pins.get(key, 0) + 1
        self.hits += 1
        self.policy.on_access(key, step)
        if self._quotas is not None:
            self._quotas.touch(key)
        return slot

    def _use_missing(
        self, key: SubExpertKey, step: int, current_layer: int, num_layers: int, fills: list[Fill]
    ) -> int:
        """A key not resident at the start of `acquire` (or a repeat of one placed by this call)."""
        slot = self._slot_of.get(key)
        if slot is not None:  # placed by an earlier occurrence in this call
            return self._use_resident(key, slot, step)
        self.misses += 1
        self.policy.on_access(key, step)
        slot = self._claim_slot(key, step, current_layer, num_layers)
        if slot is None:
            raise AssertionError(f"policy {self.policy.name} found no victim though _check_fits passed")
        self._place(key, slot, step)
        self._pins[key] = 1
        fills.append((key, slot))
        return slot

    def _claim_slot(self, incoming: SubExpertKey, step: int, current_layer: int, num_layers: int) -> int | None:
        """A free slot, else the slot of an evicted victim (the quotas', else the policy's) for
        `incoming`; None if every unit is pinned."""
        if self._free:
            return self._free.pop()
        is_pinned = self._pins.__contains__
        victim = None
        if self._quotas is not None:
            victim = self._quotas.victim(incoming, is_pinned, current_layer, num_layers)
        if victim is None:
            victim = self.policy.choose_victim(is_pinned, step, current_layer, num_layers)
        if victim is None:
            return None
        if victim in self._pins or victim not in self._slot_of:
            chooser = "quotas" if self._quotas is not None else "policy"
            raise AssertionError(f"victim {victim} (policy {self.policy.name}, {chooser}): pinned or not resident")
        slot = self._slot_of[victim]
        self._evict(victim)
        return slot

    def _evict(self, key: SubExpertKey) -> None:
        """Forget the resident, unpinned `key`; its slot is the caller's to reuse or free."""
        slot = self._slot_of.pop(key)
        self._key_in[slot] = None
        self.evictions += 1
        self.policy.on_evict(key)
        if self._quotas is not None:
            self._quotas.remove(key)

    def _place(self, key: SubExpertKey, slot: int, step: int) -> None:
        self._slot_of[key] = slot
        self._key_in[slot] = key
        self.policy.on_insert(key, step)
        if self._quotas is not None:
            self._quotas.place(key)

    # ----- checks -----

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (works under python -O too)."""
        occupied = [slot for slot, key in enumerate(self._key_in) if key is not None]
        _require(len(occupied) == len(self._slot_of), "slot->key and key->slot maps differ in size")
        _require(self.num_resident <= self.num_slots, "more resident units than slots")
        for key, slot in self._slot_of.items():
            _require(self._key_in[slot] == key, f"{key} maps to slot {slot}, holding {self._key_in[slot]}")
        empty = set(range(self.num_slots)) - set(occupied)
        _require(sorted(self._free) == sorted(empty), "free list differs from the empty slots")
        _require(len(set(self._free)) == len(self._free), "a slot is free twice")
        for key, count in self._pins.items():
            _require(count >= 1, f"{key} has pin count {count}")
            _require(key in self._slot_of, f"{key} is pinned but not resident")
        tracked = len(self.policy) if isinstance(self.policy, Sized) else self.num_resident
        _require(tracked == self.num_resident, f"policy tracks {tracked} units; {self.num_resident} resident")
        _require(min(self.hits, self.misses, self.evictions, self.prefetches) >= 0, "negative counter")
        if self._quotas is not None:
            _require(self._quotas.tracked() == set(self._slot_of), "quota regions differ from the resident units")
            self._quotas.check_invariants()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
