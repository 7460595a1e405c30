"""Zero-copy decode (`schedule="direct"`): misses are read by the GPU straight from pinned host RAM.

Pinned host memory is mapped into the GPU's address space, so a kernel can load from it over PCIe.
Measured on the H100 box (bench/results/2026-11-23-h100-zerocopy/): the grouped decode kernels read
missed units from the host arena at ~50 GB/s (bf16, int8) and ~40 GB/s (int4) — as fast as a copy
engine moves them (54 GB/s) — with bit-identical results. That removes the host from the decode
loop: a token is one CUDA graph whose MoE layers look their units up in a device-side map
(`dev_map[layer, expert, group]` = slot, or -1 for "read row `rows[expert, group]` of the host
arena"), with no per-layer routing read, slot bookkeeping or copy wait.

The VRAM cache still decides what is fast. Between tokens the host reads the token's routing (one
small copy, made while the next token's graph runs), counts hits and misses, and admits some missed
units into the cache with ordinary copies on the copy stream, evicting the policy's victims. The
protocol keeps every slot read safe without pins:

1. A unit is published in the map only after its copy has landed (its copy ticket has completed).
2. A victim is unpublished (map entry -1) in the map copy that precedes the next graph; its slot is
   overwritten only by a copy issued after that map copy and after the graph that last read it has
   finished (the host waited for it at the step boundary).
3. Anything else that moves units (prefill, batched decode: the acquire/release paths) marks the map
   stale, and it is rebuilt from the slot table before the next direct step.

Admissions are bounded (`admit_units` per token once the cache is full, the most-routed missed units
first) because every admitted unit costs a copy over the same PCIe link the misses are read over.

Prefetch (`enable_prefetch`, from `load(schedule="direct", prefetch=True)`): a miss read in the kernel
sits on the layer's critical path, while PCIe idles during the attention and the cached units' math.
So when MoE layer l runs, the experts of the MoE layer `lookahead` (default 1) ahead are predicted
inside the graph (pre-gating:
that layer's router applied to layer l's input, its norm weights folded into one [D, E] matrix) and
the predicted units the map lacks are copied from host RAM into staging rows of the pool by one
kernel on a side stream. Layer l+1's lookup then finds them there (slot = staging row). Only the
`budget` best-ranked missing units are staged (default one expert's G units, of 2 predicted experts),
since a wrong one costs the PCIe time a right one saves. Ordering, all inside the graph:
- the side stream forks from the compute stream after layer l's experts (default; or after its
  lookup, beside them: `after_experts=False`), in both cases after layer l-1's experts, the last
  readers of the staging rows it writes (lookahead + 1 sets of staging rows, by MoE-layer index),
  and the target layer waits on that staging's own event before its lookup, which reads the codes;
- everything it reads is persistent (the map, row table, a copy of layer l's input), so no buffer it
  uses can be recycled by the compute stream's allocations meanwhile;
- a wrong prediction costs PCIe bandwidth only: staged units are read only where the lookup matched
  their code, and staging rows are never part of the cache.
Staged units are still misses to the cache (they are admitted like any other). Measured, it does not
pay on the H100 box (bench/results/2026-11-24-h100-direct-prefetch/): outside its expert kernels a
layer has ~70 µs of GPU work to hide a copy behind, less than one bf16 expert's PCIe time.

Quality floor (`floor` < 1, from `generate(..., quality=)`): inside the graph, each layer drops its
lowest-weighted *missed* units while the dropped routing mass stays within (1 − floor) of the
layer's total, as the hybrid planner does (a cached unit is never dropped: it costs no PCIe). A
dropped unit's weight is 0, and the kernels read nothing for it. The dropping ops run only in the
graphs captured for a floor < 1 (`lossy`), so exact decode pays nothing for them.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.vram_cache import ExpertCache
from edgeprism.models import fused
from edgeprism.moe.quant import Parts
from edgeprism.prefetch.prefetcher import Prefetcher


class DirectCache:
    """Device map of the published units, host-arena row ids, and admissions between tokens."""

    def __init__(self, cache: ExpertCache, fetch: Prefetcher, top_k: int, admit_units: int) -> None:
        store = cache.store
        self.cache, self.fetch, self.store, self.table = cache, fetch, store, cache.table
        self.device = cache.device
        self.top_k, self.groups, self.admit_units = top_k, store.groups, admit_units
        L, E, G = cache.num_layers, store.num_experts, store.groups
        self.layers = list(store.layers)
        self.host_map = torch.full((L, E, G), -1, dtype=torch.long)  # what the next graph will see
        self.dev_map = self.host_map.to(self.device)
        rows = [[store.row(SubExpertKey(store.layers[0], e, g)) for g in range(G)] for e in range(E)]
        self.rows = torch.tensor(rows, dtype=torch.long, device=self.device)  # [E, G] host-arena row
        self.host_parts: dict[int, Parts] = {layer: store.parts(layer) for layer in store.layers}
        self.route_log = torch.zeros(L, top_k, dtype=torch.long, device=self.device)  # written by the graph
        # which of those units the graph found mapped (the map it read, not the one the host has by
        # the time it counts: admissions published in between were misses for that graph)
        self.hit_log = torch.zeros(L, top_k * G, dtype=torch.bool, device=self.device)
        # a one-token call's assignments all belong to token 0 (made here, outside any graph capture)
        self.tokens = torch.zeros(top_k * G, dtype=torch.long, device=self.device)
        cuda = self.device.type == "cuda"
        self._host_route = torch.zeros(L, top_k, dtype=torch.long, pin_memory=cuda)
        self._host_hit = torch.zeros(L, top_k * G, dtype=torch.bool, pin_memory=cuda)
        self._route_copied = torch.cuda.Event() if cuda else None
        self._logged = False  # _host_route holds a step's routing not yet processed
        self._published: dict[SubExpertKey, int] = {}
        self._pending: dict[SubExpertKey, int] = {}  # admitted, copy in flight: key -> slot
        self._occupant: dict[int, SubExpertKey] = {}  # slot -> its published or pending unit
        # decayed count of each unit's misses (x0.9 per step, kept as one growing increment)
        self._heat: dict[SubExpertKey, float] = {}
        self._inc = 1.0
        self.stale = True  # the map must be rebuilt from the table before the next direct step
        self._map_changed = False  # host_map differs from what the device has
        self.hits = self.misses = self.admitted = 0
        # quality floor: read by the lossy graphs; per layer [dropped units, kept mass, routed mass]
        self.floor = torch.ones((), dtype=torch.float32, device=self.device)
        self.lossy = False  # the graph being run/captured drops misses under `floor`
        self.layer_stats = torch.zeros(L, 3, dtype=torch.float32, device=self.device)
        self._host_stats = torch.zeros(L, 3, dtype=torch.float32, pin_memory=cuda)
        self._logged_lossy = False
        self.dropped, self.mass_kept, self.mass_routed = 0, 0.0, 0.0
        self.cpu_share = None  # schedule/cpu_share.CpuShare: misses the CPU computes inside the graph
        self.prefetching = False  # `enable_prefetch`: next-layer units staged inside the graph
        self.after_experts, self.budget = True, 0
        self._next: dict[int, int] = {}  # MoE layer -> the next one (whose units it prefetches)
        self._base: dict[int, int] = {}  # prefetched MoE layer -> the first of its staging rows
        self._forked: set[int] = set()  # target layers whose staging runs on the side stream, not yet joined
        self.staged_used = 0  # routed units read from staging rows (since the last reset)

    # ----- prefetch (set up once) -----

    def enable_prefetch(self, predictors: dict[int, tuple[int, torch.Tensor]], top: int, base: int,
                        budget: int | None = None, after_experts: bool = True, lookahead: int = 1) -> None:
        """Stage a later MoE layer's predicted units while a layer computes. predictors[l] = (the
        MoE layer `lookahead` MoE layers after l, its router with the norms folded in, [D, E] on the
        device); `top` experts are predicted per layer, and of their units the map lacks the `budget`
        best-ranked are staged (None: all); the pool's rows base .. base + (lookahead + 1)·top·G are
        the staging rows (lookahead + 1 sets, by MoE-layer index: a set is rewritten only after the
        layer that read it). `after_experts`: the staging copy starts once the layer's experts have
        run (so it does not take PCIe from the layer's own misses), else right after its lookup."""
        self.after_experts, self.lookahead = after_experts, lookahead
        L, G, dev = self.cache.num_layers, self.groups, self.device
        self._next = {layer: nxt for layer, (nxt, _) in predictors.items()}
        self._predict_w = {layer: w for layer, (_, w) in predictors.items()}
        self.top, P = top, top * G
        self.budget = P if budget is None else max(0, min(P, budget))  # units staged per layer, at most
        order = {layer: i for i, layer in enumerate(self.layers)}
        sets = lookahead + 1
        self._base = {nxt: base + (order[nxt] % sets) * P for nxt in self._next.values()}  # rows by set
        self.codes = torch.full((L, P), -1, dtype=torch.long, device=dev)  # staged unit codes e·G+g (-1: none)
        self.pred_log = torch.zeros(L, top, dtype=torch.long, device=dev)  # predicted experts, per target
        E = self.store.num_experts
        self._x = torch.zeros(1, self.store.format.dim, dtype=next(iter(self._predict_w.values())).dtype, device=dev)
        self._logits = torch.zeros(1, E, dtype=self._x.dtype, device=dev)
        self._top_v = torch.zeros(1, top, dtype=self._x.dtype, device=dev)
        self._top_i = torch.zeros(1, top, dtype=torch.long, device=dev)
        cuda = dev.type == "cuda"
        self._side = torch.cuda.Stream(dev) if cuda else None
        # one event per target layer, recorded after its staging: the target's lookup waits for that
        # staging only, not for later ones already queued on the side stream (lookahead > 1)
        self._staged = {nxt: torch.cuda.Event() for nxt in self._next.values()} if cuda else {}
        # what the staging kernel copies between: int32 words of the host arenas and the pool (whole
        # rows), or the rows as they are where a row is not a whole number of words
        words = cuda and all(a.shape[-1] * a.element_size() % 4 == 0 for a in self.store.arenas.values())
        self._src = {layer: a.view(torch.int32) if words else a for layer, a in self.store.arenas.items()}
        self._dst = self.cache.pool.view(torch.int32) if words else self.cache.pool
        self._host_codes = torch.full((L, P), -1, dtype=torch.long, pin_memory=cuda)
        self._host_pred = torch.zeros(L, top, dtype=torch.long, pin_memory=cuda)
        self.prefetching = True

    # ----- prefetch (inside the graph) -----

    def join(self, layer: int) -> None:
        """The compute stream waits for the staging of `layer`'s units, if one is in flight (before
        the layer's lookup reads its codes)."""
        if layer in self._forked:
            self._forked.discard(layer)
            if self._side is not None:
                torch.cuda.current_stream(self.device).wait_event(self._staged[layer])

    def stage_next(self, layer: int, x: torch.Tensor) -> None:
        """Predict the MoE layer `lookahead` after `layer` from its input x [1, D] and stage the
        predicted units the map lacks, on the side stream (joined by that layer's `join`). Device ops
        only."""
        nxt = self._next.get(layer)
        if nxt is None:
            return
        self._x.copy_(x)  # on the compute stream: x itself may be recycled before the side stream reads it
        side = self._side
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else nullcontext():
            torch.mm(self._x, self._predict_w[layer], out=self._logits)
            torch.topk(self._logits, self.top, dim=-1, out=(self._top_v, self._top_i))
            ids = self._top_i.reshape(-1)
            self.pred_log[nxt].copy_(ids)
            self._stage(nxt, ids)
            if side is not None:
                self._staged[nxt].record(side)
        self._forked.add(nxt)

    def _stage(self, nxt: int, ids: torch.Tensor) -> None:
        G, base = self.groups, self._base[nxt]
        if self.device.type == "cuda":  # the direct path has Triton on a GPU
            from edgeprism.models import fused_triton

            fused_triton.stage(ids, self.dev_map[nxt], self.rows, self._src[nxt], self._dst, self.codes[nxt], base, G,
                               self.budget)
            return
        # reference (CPU): every predicted unit is copied; those staged (the first `budget` the map
        # lacks, in rank order) get a code
        e = ids.repeat_interleave(G)
        g = torch.arange(G, device=ids.device).repeat(ids.numel())
        slot = self.dev_map[nxt][e, g]
        take = (slot < 0) & ((slot < 0).cumsum(0) <= self.budget)
        self.codes[nxt].copy_(torch.where(take, e * G + g, torch.full_like(slot, -1)))
        P = e.numel()
        self.cache.pool[base:base + P].copy_(self.store.arenas[nxt][self.rows[e, g].cpu()])

    # ----- inside the graph -----

    def lookup(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots (-1 = read from the host arena) and host rows of one token's units ([k·G] each),
        and its routing recorded for the host. Device ops only (graph-safe)."""
        staged = layer in self._base  # a prefetch stages this layer's predicted units
        kern = fused.on(ids.device)
        if kern is not None and ids.shape[0] == 1:  # one launch instead of four
            return kern.lookup(ids, self.dev_map[layer], self.rows, self.hit_log[layer], self.route_log[layer],
                               self.codes[layer] if staged else None, self._base.get(layer, 0))
        self.route_log[layer].copy_(ids.reshape(-1))
        slots = self.dev_map[layer][ids].reshape(-1)
        torch.ge(slots, 0, out=self.hit_log[layer])
        if staged:  # unmapped units found among the staged codes read their staging row
            G = self.groups
            code = (ids.reshape(-1, 1) * G + torch.arange(G, device=ids.device)).reshape(-1)
            codes = self.codes[layer]
            match = (codes[None, :] == code[:, None]) & (codes[None, :] >= 0)
            at = torch.where(match.any(1), match.int().argmax(1), torch.full_like(code, -1))
            slots = torch.where((slots < 0) & (at >= 0), self._base[layer] + at, slots)
        return slots, self.rows[ids].reshape(-1)

    def drop_misses(self, layer: int, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`weights` [A] with the lowest-weighted misses (slot < 0) zeroed while the dropped mass stays
        ≤ (1 − floor) × the layer's routed mass; records the layer's counts. Device ops only."""
        kern = fused.on(weights.device)
        if kern is not None and weights.dim() == 1:  # one launch instead of ~15
            return kern.drop_misses(slots, weights, self.floor, self.layer_stats[layer])
        w = weights.float()
        total = w.sum()
        inf = torch.full_like(w, float("inf"))
        order_w, order = torch.where(slots < 0, w, inf).sort(stable=True)  # ties: lower index first
        finite = order_w.isfinite()
        within = order_w.masked_fill(~finite, 0.0).cumsum(0) <= (1.0 - self.floor) * total
        drop = torch.zeros_like(finite).scatter(0, order, finite & within)
        kept = w.masked_fill(drop, 0.0)
        self.layer_stats[layer].copy_(torch.stack((drop.sum().float(), kept.sum(), total)))
        return kept.to(weights.dtype)

    def set_floor(self, floor: float) -> None:
        """The kept-mass floor of the next steps (1.0 = exact: the graphs without dropping run)."""
        self.lossy = floor < 1.0
        if self.lossy:
            self.floor.fill_(floor)

    # ----- at the step boundaries (host) -----

    def before_step(self) -> None:
        """Publish landed admissions and send the map to the device, ahead of the graph that reads
        it. The last graph has finished (the caller read its logits), so this costs no wait."""
        if self.stale:
            self._rebuild()
        for key, slot in list(self._pending.items()):
            if self.fetch.landed(slot):
                del self._pending[key]
                self._publish(key, slot)
        if self._map_changed:  # a pageable source: staged before copy_ returns, so host_map may change after
            self.dev_map.copy_(self.host_map)
            self._map_changed = False

    def read_routing(self) -> None:
        """Queue the copy of the step's routing to the host (right after its graph)."""
        self._host_route.copy_(self.route_log, non_blocking=self._route_copied is not None)
        self._host_hit.copy_(self.hit_log, non_blocking=self._route_copied is not None)
        self._logged_lossy = self.lossy
        if self.prefetching:
            self._host_codes.copy_(self.codes, non_blocking=self._route_copied is not None)
            self._host_pred.copy_(self.pred_log, non_blocking=self._route_copied is not None)
        if self.lossy:
            self._host_stats.copy_(self.layer_stats, non_blocking=self._route_copied is not None)
        if self._route_copied is not None:
            self._route_copied.record()
        self._logged = True

    def after_step(self, step: int) -> None:
        """Count the routed units of the step `read_routing` logged and admit missed ones (copies
        start now on the copy stream, after all compute issued so far, and are published once
        landed). Called right after the next graph was launched, so it runs while that computes."""
        if not self._logged:
            return
        self._logged = False
        if self._route_copied is not None:
            self._route_copied.synchronize()  # queued before the running graph: already done
        routes, found = self._host_route.tolist(), self._host_hit.tolist()
        if self._logged_lossy:
            dropped, kept, routed = (sum(col) for col in zip(*(self._host_stats[layer].tolist() for layer in self.layers)))
            self.dropped += round(dropped)
            self.mass_kept += kept
            self.mass_routed += routed
        G, hits, missed = self.groups, [], []
        for layer in self.layers:
            mapped = found[layer]
            for i, e in enumerate(routes[layer]):
                for g in range(G):
                    (hits if mapped[i * G + g] else missed).append(SubExpertKey(layer, e, g))
        if self.prefetching:
            self._score_prefetch(routes)
        self.table.count_uses(hits, len(missed), step)
        self.hits += len(hits)
        self.misses += len(missed)
        self._admit(missed, step)

    # ----- internals -----

    def _score_prefetch(self, routes: list[list[int]]) -> None:
        """The logged step's predictions against its routing, into the prefetcher's stats (recall,
        precision, staged bytes used and wasted)."""
        G, stats, ub = self.groups, self.fetch.stats, self.store.unit_bytes
        codes, preds = self._host_codes.tolist(), self._host_pred.tolist()
        for nxt in self._base:
            routed = {e * G + g for e in routes[nxt] for g in range(G)}
            predicted = {e * G + g for e in preds[nxt] for g in range(G)}
            staged = {c for c in codes[nxt] if c >= 0}
            used = len(staged & routed)
            stats.predicted[nxt] += len(predicted)
            stats.routed[nxt] += len(routed)
            stats.correct[nxt] += len(predicted & routed)
            stats.units_prefetched += len(staged)
            stats.bytes_used += used * ub
            stats.bytes_wasted += (len(staged) - used) * ub
            self.staged_used += used

    def _admit(self, missed: list[SubExpertKey], step: int) -> None:
        """Place the hottest missed units in the table (evicting the policy's victims), unpublish
        the victims and start the copies. A victim's slot may still be read by the graph now
        running (it was launched with the old map), so the copies wait for all compute issued so
        far; the next graph no longer sees the victim (the next `before_step` sends the map)."""
        self._inc /= 0.9
        if self._inc > 1e12:  # renormalise the decayed counts now and then
            self._heat = {k: h / self._inc for k, h in self._heat.items() if h / self._inc > 1e-3}
            self._inc = 1.0
        heat = self._heat
        for key in missed:
            heat[key] = heat.get(key, 0.0) + self._inc
        free = self.cache.num_slots - self.table.num_resident
        budget = max(self.admit_units, free)
        cands = [k for k in dict.fromkeys(missed) if k not in self._pending and self.table.lookup(k) is None]
        cands.sort(key=lambda k: -heat[k])
        placed = []
        for key in cands[:budget]:
            slot = self.table.insert_prefetched(key, step, key.layer, self.cache.num_layers)
            if slot is None:
                break
            old = self._occupant.get(slot)
            if old is not None:
                if old in self._published:
                    self._unpublish(old)
                self._pending.pop(old, None)
            self._occupant[slot] = key
            self._pending[key] = slot
            placed.append((key, slot))
        if placed:
            self.fetch.copy_after_compute(placed)
            self.admitted += len(placed)

    def _publish(self, key: SubExpertKey, slot: int) -> None:
        self._published[key] = slot
        self.host_map[key.layer, key.expert, key.group] = slot
        self._map_changed = True

    def _unpublish(self, key: SubExpertKey) -> None:
        del self._published[key]
        self.host_map[key.layer, key.expert, key.group] = -1
        self._map_changed = True

    def _rebuild(self) -> None:
        """The map from the slot table, after something else (prefill, batched decode) moved units.
        Their copies were waited on by the compute that used them; `drain` covers the rest."""
        self.fetch.drain()
        self.host_map.fill_(-1)
        self._map_changed = True
        self._published.clear()
        self._pending.clear()
        self._occupant.clear()
        for key in self.table.resident_keys():
            slot = self.table.lookup(key)
            if slot is not None:
                self._publish(key, slot)
                self._occupant[slot] = key
        self.stale = False
