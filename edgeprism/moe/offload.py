"""The expert provider of the engine: routed units served from an `ExpertCache`.

Three execution paths, chosen per call by size:
- static: every unit is resident (the budget holds all experts). Slot ids come from a device-side
  table, so a decode step needs no host sync at all.
- gathered (decode, one token): the step's units are pinned in slots (missing ones copied in) and
  computed by one batched GEMV over the slots; no Python loop per unit.
- unit by unit (prefill, or units too large to gather): one unit pinned at a time, so a cache far
  smaller than one layer's experts still runs a long prompt.
"""

from __future__ import annotations

import torch

from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.vram_cache import ExpertCache


class OffloadedExperts:
    """`ExpertProvider` over a slot cache; `step` is set by the engine (decode-token counter)."""

    def __init__(self, cache: ExpertCache, gather_limit_bytes: int) -> None:
        self.cache = cache
        self.groups = cache.store.groups
        self.unit_bytes = cache.store.unit_bytes
        self.gather_limit = gather_limit_bytes
        self.step = 0
        # static cache (everything resident): where each unit sits, on the host for the unit-by-unit
        # path and on the device for the sync-free decode path; None when the cache is dynamic
        self.host_slot_map = self._static_map() if cache.preload_all() else None
        self.slot_map = self.host_slot_map.to(cache.device) if self.host_slot_map is not None else None

    def _static_map(self) -> torch.Tensor:
        store, table = self.cache.store, self.cache.table
        slot_map = torch.zeros(max(store.layers) + 1, store.num_experts, self.groups, dtype=torch.long)
        for layer in store.layers:
            for e in range(store.num_experts):
                for g in range(self.groups):
                    slot_map[layer, e, g] = table.lookup(SubExpertKey(layer, e, g))
        return slot_map  # [L, E, G]

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # x: [T, D]; ids, weights: [T, k] -> [T, D]
        # The path depends only on the call's shape, never on the cache state, so that outputs are
        # bit-identical whatever the cache size or policy. A decode step's k·G units always fit.
        assignments = ids.numel() * self.groups
        gather = ids.shape[0] == 1 and assignments * self.unit_bytes <= self.gather_limit
        if not gather:
            return self._unit_by_unit(layer, x, ids, weights)
        if self.slot_map is not None:
            return self._static(layer, x, ids, weights)
        return self._gathered(layer, x, ids, weights)

    def _expand(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token index and routing weight of each (token, expert, group) assignment: [A] each."""
        T, k = ids.shape
        tokens = torch.arange(T, device=x.device).repeat_interleave(k * self.groups)
        return tokens, weights.reshape(-1).repeat_interleave(self.groups)

    def _static(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        slots = self.slot_map[layer][ids].reshape(-1)  # [T, k, G] -> [A]
        tokens, w = self._expand(x, ids, weights)
        return self.cache.format.grouped(x, self.cache.parts, slots, tokens, w)

    def _gathered(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        keys = [SubExpertKey(layer, e, g) for row in ids.tolist() for e in row for g in range(self.groups)]
        slots = self.cache.acquire(keys, self.step, layer)
        slot_ids = torch.tensor(slots, dtype=torch.long).to(x.device, non_blocking=True)
        tokens, w = self._expand(x, ids, weights)
        y = self.cache.format.grouped(x, self.cache.parts, slot_ids, tokens, w)
        self.cache.release(keys)  # later copies into these slots queue behind the GEMV on this stream
        return y

    def _unit_by_unit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tokens, pos = torch.nonzero(ids == e, as_tuple=True)  # [n] each
            xe, we = x[tokens], weights[tokens, pos][:, None]  # [n, D], [n, 1]
            for g in range(self.groups):
                key = SubExpertKey(layer, e, g)
                slot = self._slot(key, layer)
                y = self.cache.format.unit(xe, self.cache.parts, slot)
                out.index_add_(0, tokens, (y * we).to(x.dtype))
                if self.slot_map is None:
                    self.cache.release([key])
        return out

    def _slot(self, key: SubExpertKey, layer: int) -> int:
        if self.slot_map is not None:
            return int(self.host_slot_map[key.layer, key.expert, key.group])  # type: ignore[index]
        return self.cache.acquire([key], self.step, layer)[0]
