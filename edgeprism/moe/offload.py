"""The expert provider of the engine: routed units served from an `ExpertCache`.

Three execution paths, chosen per call by size:
- static: every unit is resident (the budget holds all experts). Slot ids come from a device-side
  table, so a decode step needs no host sync at all.
- gathered (decode, one token): the step's units are pinned in slots (missing ones copied in) and
  computed by one batched GEMV over the slots; no Python loop per unit.
- unit by unit (prefill, or units too large to gather): one unit pinned at a time, so a cache far
  smaller than one layer's experts still runs a long prompt.
- direct (`schedule="direct"`, one token): slots from a device-side map of the cached units, and the
  kernels read the others straight from pinned host RAM (cache/direct.py): no host sync either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from edgeprism.cache.direct import DirectCache
from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.vram_cache import ExpertCache
from edgeprism.prefetch.prefetcher import Prefetcher


class OffloadedExperts:
    """`ExpertProvider` over a slot cache; `step` is set by the engine (decode-token counter).

    Every copy into the cache goes through `fetch` (the prefetcher owns the copy stream).
    """

    def __init__(self, cache: ExpertCache, fetch: Prefetcher, gather_limit_bytes: int) -> None:
        self.cache, self.fetch = cache, fetch
        self.groups = cache.store.groups
        self.unit_bytes = cache.store.unit_bytes
        self.gather_limit = gather_limit_bytes
        self.step = 0
        # Calls of up to this many tokens take the gathered path (batched decode raises it for its
        # steps with `gather_tokens`; prefill chunks keep the unit-by-unit path)
        self.gather_max = 1
        # static cache (everything resident): where each unit sits, on the host for the unit-by-unit
        # path and on the device for the sync-free decode path; None when the cache is dynamic
        self.host_slot_map = self._static_map() if cache.preload_all() else None
        self.slot_map = self.host_slot_map.to(cache.device) if self.host_slot_map is not None else None
        self.direct: DirectCache | None = None  # zero-copy decode (`enable_direct`)

    def enable_direct(self, top_k: int, admit_units: int) -> DirectCache:
        """One-token calls read missed units from host RAM in the kernel (a dynamic cache only)."""
        assert self.slot_map is None, "every unit is resident: nothing to read from the host"
        self.direct = DirectCache(self.cache, self.fetch, top_k, admit_units)
        return self.direct

    def _static_map(self) -> torch.Tensor:
        store, table = self.cache.store, self.cache.table
        slot_map = torch.zeros(max(store.layers) + 1, store.num_experts, self.groups, dtype=torch.long)
        for layer in store.layers:
            for e in range(store.num_experts):
                for g in range(self.groups):
                    slot_map[layer, e, g] = table.lookup(SubExpertKey(layer, e, g))
        return slot_map  # [L, E, G]

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 units: torch.Tensor | None = None) -> torch.Tensor:
        # x: [T, D]; ids, weights: [T, k]; units: [T, k, G] per-unit weights (0 = skip) or None -> [T, D]
        # The path depends only on the call's shape, never on the cache state, so that outputs are
        # bit-identical whatever the cache size or policy. A decode step's k·G units always fit.
        if self.direct is not None:
            if ids.shape[0] == 1 and self.can_gather(ids.shape[1]):
                return self._direct(layer, x, ids, weights, units)
            self.direct.stale = True  # the paths below move units: rebuild the map before the next direct call
        if not (ids.shape[0] <= self.gather_max and self.can_gather(ids.shape[0] * ids.shape[1])):
            return self._unit_by_unit(layer, x, ids, weights, units)
        if self.slot_map is not None:
            return self._static(layer, x, ids, weights, units)
        return self._gathered(layer, x, ids, weights, units)

    def can_gather(self, k: int) -> bool:
        """Whether k experts' units (one token's k·G) fit the gather workspace (else they go unit by unit)."""
        return k * self.groups * self.unit_bytes <= self.gather_limit

    @contextmanager
    def gather_tokens(self, n: int) -> Iterator[None]:
        """Let calls of up to `n` tokens take the gathered (or static) path, as one decode token does:
        batched decode's B tokens then run in one grouped call per layer, each unit pinned once
        however many of them route to it, instead of one call per unit."""
        old, self.gather_max = self.gather_max, n
        try:
            yield
        finally:
            self.gather_max = old

    def _expand(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                units: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token index and weight of each (token, expert, group) assignment: [A] each."""
        T, k = ids.shape
        tokens = torch.arange(T, device=x.device).repeat_interleave(k * self.groups)
        return tokens, self._unit_weights(weights, units)

    def _unit_weights(self, weights: torch.Tensor, units: torch.Tensor | None) -> torch.Tensor:
        """Weight of each assignment [A], contiguous: the per-unit weights, else each expert's weight
        repeated over its G groups (no copy for G = 1: one kernel fewer per layer in a graph)."""
        if units is not None:
            return units.reshape(-1).contiguous()
        flat = weights.reshape(-1).contiguous()
        return flat if self.groups == 1 else flat.repeat_interleave(self.groups)

    def _static(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                units: torch.Tensor | None = None) -> torch.Tensor:
        # skipped units are multiplied by 0 here: no host sync, and every unit is resident anyway
        slots = self.slot_map[layer][ids].reshape(-1)  # [T, k, G] -> [A]
        tokens, w = self._expand(x, ids, weights, units)
        return self.cache.format.grouped(x, self.cache.parts, slots, tokens, w)

    def _direct(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                units: torch.Tensor | None = None) -> torch.Tensor:
        # graph-safe: device ops only (the map is sent by DirectCache.before_step; eager callers
        # such as a one-token prefill chunk find it stale and send it here)
        direct = self.direct
        assert direct is not None
        if direct.stale and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            direct.before_step()
        direct.join(layer)  # a staging copy for this layer (prefetch) has landed before the lookup reads it
        slots, rows = direct.lookup(layer, ids)
        stage_early = direct.prefetching and not direct.after_experts
        if stage_early:  # prefetch: the next layer's predicted units, beside this layer's work
            direct.stage_next(layer, x)
        tokens, w = direct.tokens, self._unit_weights(weights, units)  # one token: constant token ids
        if direct.lossy:
            w = direct.drop_misses(layer, slots, w)
        share = direct.cpu_share if direct.cpu_share is not None and direct.cpu_share.armed else None
        if share is not None:  # part of the misses computed by the CPU meanwhile (schedule/cpu_share.py)
            w = share.split(layer, x, slots, rows, w)
        y = self.cache.format.grouped_direct(x, self.cache.parts, direct.host_parts[layer], slots, rows, tokens, w)
        if direct.prefetching and not stage_early:  # ... once this layer's own misses are read
            direct.stage_next(layer, x)
        return share.merge(layer, y) if share is not None else y

    def _gathered(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                  units: torch.Tensor | None = None) -> torch.Tensor:
        keys = [SubExpertKey(layer, e, g) for row in ids.tolist() for e in row for g in range(self.groups)]
        if ids.shape[0] > 1 and len(set(keys)) > self.cache.num_slots:  # a batch needing more units than slots
            return self._unit_by_unit(layer, x, ids, weights, units)
        tokens, w = self._expand(x, ids, weights, units)
        if units is not None:  # skipped units are neither acquired, copied nor computed
            live = [i for i, u in enumerate(units.reshape(-1).tolist()) if u != 0]
            keys, pick = [keys[i] for i in live], torch.tensor(live, dtype=torch.long, device=x.device)
            tokens, w = tokens[pick], w[pick]
        slots = self.fetch.acquire(keys, self.step, layer)
        slot_ids = torch.tensor(slots, dtype=torch.long).to(x.device, non_blocking=True)
        y = self.cache.format.grouped(x, self.cache.parts, slot_ids, tokens, w)
        self.fetch.release(keys)  # later copies into these slots wait for the GEMV (a read mark)
        return y

    def _unit_by_unit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                      units: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros_like(x)
        k = ids.shape[1]
        # One host sync for the whole call (the expert counts), none per expert: the host then
        # runs ahead of the GPU, so the next unit's copy overlaps this unit's compute.
        order = torch.argsort(ids.reshape(-1), stable=True)  # assignments grouped by expert, tokens ascending
        counts = torch.bincount(ids.reshape(-1), minlength=self.cache.store.num_experts).tolist()
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            sel, start = order[start:start + n], start + n
            tokens, pos = sel // k, sel % k  # [n] each, as torch.nonzero(ids == e) would give them
            xe, we = x[tokens], weights[tokens, pos][:, None]  # [n, D], [n, 1]
            for g in range(self.groups):
                rows, xg, wg = _unit_rows(tokens, pos, xe, we, units, g)
                if rows.numel() == 0:
                    continue  # every token skips this unit: not acquired, copied or computed
                key = SubExpertKey(layer, e, g)
                slot = self._slot(key, layer)
                y = self.cache.format.unit(xg, self.cache.parts, slot)
                out.index_add_(0, rows, (y * wg).to(x.dtype))
                if self.slot_map is None:
                    self.fetch.release([key])
        return out

    def _slot(self, key: SubExpertKey, layer: int) -> int:
        if self.slot_map is not None:
            return int(self.host_slot_map[key.layer, key.expert, key.group])  # type: ignore[index]
        return self.fetch.acquire([key], self.step, layer)[0]


def _unit_rows(tokens: torch.Tensor, pos: torch.Tensor, xe: torch.Tensor, we: torch.Tensor,
               units: torch.Tensor | None, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens of one expert that run its group g, their inputs [n, D] and weights [n, 1]."""
    if units is None:
        return tokens, xe, we
    wg = units[tokens, pos, g]  # [n]
    live = torch.nonzero(wg).squeeze(-1)
    return tokens[live], xe[live], wg[live][:, None]
