"""The one owner of the host→device copy stream and of every event between it and compute.

Copies issued on the compute stream serialise with kernels; on their own stream they overlap them
almost completely (measured 98% on the H100 box). Moving copies off the compute stream creates three
cross-stream hazards, and each is closed by an event (a `Ticket`) that the `CopyEngine` provides:

1. read-after-write: compute reads a slot only after the copy that filled it. `acquire` makes the
   compute stream wait on the slot's pending ticket (a device-side wait; the host never blocks).
2. write-after-read: a copy overwrites a slot only after the compute that last read it. `release`
   records a mark of the compute stream's progress (`engine.mark()`) for the released slots; a
   later copy into one of them first waits for that slot's mark (per slot, so a copy never waits
   for compute that reads other slots: prefill streams units double-buffered).
3. write-after-write: a copy into a slot is ordered after an earlier pending copy into the same
   slot (a slot reused before its prefetch landed): the earlier ticket is passed as `after`.

A wrong prediction costs bandwidth, never correctness: a prefetched unit is an ordinary unpinned
cache entry, and a unit the current layer uses is pinned, so no prefetch can evict it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.vram_cache import ExpertCache, coalesce
from edgeprism.schedule.cost import CostModel
from edgeprism.schedule.scheduler import Residency

Ticket = Any  # an engine's handle on one issued copy (a CUDA event, or None once complete)


class CopyEngine(Protocol):
    """Asynchronous host→device copies and their ordering against the compute stream."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Sequence[Ticket], reads: Sequence[Any]) -> Ticket:
        """Start dst.copy_(src) after the `after` copies and the `reads` marks; return its ticket."""
        ...

    def mark(self) -> Any:
        """A mark of all compute issued so far (for `copy(reads=...)`)."""
        ...

    def wait(self, tickets: Sequence[Ticket]) -> None:
        """Compute issued from now on runs only after these copies (the host does not block)."""
        ...

    def stall_seconds(self) -> float:
        """Compute-stream time spent waiting in `wait` so far (0 where it cannot be measured)."""
        ...

    def reset_stall(self) -> None:
        ...

    def begin_step(self) -> Any:
        """A decode step starts: the compute stream may be looked up once and kept until `end_step`;
        returns it (None where there is none), for the step's own event records."""
        ...

    def end_step(self) -> None:
        ...

    def issuing(self) -> AbstractContextManager[Any]:
        """Around a batch of `copy` calls (one switch to the copy stream for all of them)."""
        ...


class InlineCopies:
    """CPU (or no overlap wanted): every copy completes before `copy` returns; nothing to order."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Sequence[Ticket], reads: Sequence[Any]) -> Ticket:
        dst.copy_(src)
        return None

    def mark(self) -> Any:
        return None

    def wait(self, tickets: Sequence[Ticket]) -> None:
        pass

    def stall_seconds(self) -> float:
        return 0.0

    def reset_stall(self) -> None:
        pass

    def begin_step(self) -> Any:
        return None

    def end_step(self) -> None:
        pass

    def issuing(self) -> AbstractContextManager[Any]:
        return nullcontext()


class CudaCopies:
    """Copies on a dedicated `h2d` stream; tickets are CUDA events recorded after each copy.

    `wait` brackets the compute stream's event waits with timing events, so the time the compute
    stream sat idle for copies is measured on the GPU (resolved lazily, never blocking the host).

    Host cost matters here: the layerwise decode step calls into this class several times per MoE
    layer, and the host is that step's critical path (bench/results/2026-11-24-h100-tenth/). Looking
    up the current stream (`torch.cuda.current_stream`) and entering a stream context each go through
    several Python-level device lookups, so a decode step looks the compute stream up once
    (`begin_step` … `end_step`) and a batch of copies switches to the copy stream once (`issuing`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.h2d = torch.cuda.Stream(device)  # the copy stream
        self.timed = False  # benchmarks: time every copy with CUDA events (achieved H2D bandwidth)
        self._copy_marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall = 0.0
        self._compute: torch.cuda.Stream | None = None  # the step's compute stream, between begin/end_step
        self._on_h2d = False  # inside `issuing`: the copy stream is current

    def begin_step(self) -> torch.cuda.Stream:
        self._compute = torch.cuda.current_stream(self.device)
        return self._compute

    def end_step(self) -> None:
        self._compute = None

    def compute(self) -> torch.cuda.Stream:
        """The compute stream: the one kept for the running step, else the current one."""
        return self._compute if self._compute is not None else torch.cuda.current_stream(self.device)

    @contextmanager
    def issuing(self) -> Iterator[None]:
        if self._on_h2d:
            yield
            return
        with torch.cuda.stream(self.h2d):
            self._on_h2d = True
            try:
                yield
            finally:
                self._on_h2d = False

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Sequence[Ticket], reads: Sequence[Any]) -> Ticket:
        with self.issuing():
            for mark in reads:
                if mark is not None:
                    self.h2d.wait_event(mark)  # hazard 2: the slot's last reader has finished
            # hazard 3 needs no wait here: `after` tickets were recorded on this same stream, and a
            # stream runs its work in issue order
            if self.timed:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.h2d)
            dst.copy_(src, non_blocking=True)
            if self.timed:
                end = torch.cuda.Event(enable_timing=True)
                end.record(self.h2d)
                self._copy_marks.append((start, end))
            done = torch.cuda.Event()
            done.record(self.h2d)
        return done

    def mark(self) -> Any:
        event = torch.cuda.Event()
        event.record(self.compute())
        return event

    def wait(self, tickets: Sequence[Ticket]) -> None:
        if not tickets:
            return
        compute = self.compute()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        for ticket in tickets:
            compute.wait_event(ticket)  # hazard 1: the copy into this slot has landed
        end.record(compute)
        self._stall_marks.append((start, end))
        if len(self._stall_marks) > 4096:
            self._resolve(block=False)

    def stall_seconds(self) -> float:
        self._resolve(block=True)
        return self._stall

    def reset_stall(self) -> None:
        self._resolve(block=True)
        self._stall = 0.0
        self._copy_marks.clear()

    def copy_seconds(self) -> float:
        """GPU time of the timed copies so far (synchronises; benchmarks only)."""
        torch.cuda.synchronize(self.device)
        return sum(a.elapsed_time(b) for a, b in self._copy_marks) / 1e3

    def _resolve(self, block: bool) -> None:
        pending = []
        for start, end in self._stall_marks:
            if block:
                end.synchronize()
            if end.query():
                self._stall += start.elapsed_time(end) / 1e3
            else:
                pending.append((start, end))
        self._stall_marks = pending


@dataclass
class PrefetchStats:
    """What prediction and prefetching achieved; per-layer lists are indexed by layer."""

    predicted: list[int]  # predicted units (resident or not) for each target layer
    routed: list[int]  # routed units at layers that had a prediction
    correct: list[int]  # predicted units that were routed
    bytes_used: int = 0  # prefetched bytes that their target layer used
    bytes_wasted: int = 0  # prefetched bytes their target layer did not use
    units_prefetched: int = 0
    predictions_skipped: int = 0  # target layers whose prefetch paused (copy precision too low)

    @classmethod
    def empty(cls, num_layers: int) -> "PrefetchStats":
        return cls([0] * num_layers, [0] * num_layers, [0] * num_layers)


class Prefetcher:
    """Fetches units into the expert cache on demand (`acquire`) or ahead of need (`prefetch`).

    Every copy into the slot pool goes through here, so the slot → pending-copy map is complete.
    """

    def __init__(self, cache: ExpertCache, engine: CopyEngine, min_precision: float = 0.5,
                 probe_every: int = 16) -> None:
        self.cache, self.engine = cache, engine
        # Copying a wrong unit costs what copying a right one saves (the copy engine is the
        # bottleneck when offloading), so prefetching pays only while more than `min_precision` of
        # the units it copies are used. Each layer's copy precision is tracked as an EMA; below
        # the bar the layer's prefetches pause, except a probe every `probe_every` predictions
        # (copying only the best-ranked predicted unit) that keeps the estimate fresh.
        self.min_precision, self.probe_every = min_precision, probe_every
        self._copy_precision: dict[int, float] = {}
        self._skipped: dict[int, int] = {}
        self.table, self.store = cache.table, cache.store
        self.num_layers = cache.num_layers
        self._pending: dict[int, Ticket] = {}  # slot -> ticket of the last copy into it not yet waited on
        self._read: dict[int, Any] = {}  # slot -> mark of the last compute that read it
        self._predicted: dict[int, set[SubExpertKey]] = {}  # target layer -> predicted units
        self._inflight: dict[int, set[SubExpertKey]] = {}  # target layer -> units placed by prefetch
        self.stats = PrefetchStats.empty(self.num_layers)
        # A host-side model of the copy engine for the scheduler (`residency`): copies run one after
        # another, each taking `copy_cost.h2d_seconds(bytes)`; None (CPU, inline copies) = instant.
        self.copy_cost: CostModel | None = None
        self._busy_until = 0.0  # perf_counter time when the last issued copy is predicted to land
        self._ready_at: dict[int, float] = {}  # slot -> predicted landing time of its last copy

    # ----- what the scheduler sees -----

    def residency(self, key: SubExpertKey, now: float) -> tuple[Residency, float]:
        """Where `key` is: resident, in flight (with seconds until it is predicted to land), or missing."""
        slot = self.table.lookup(key)
        if slot is None:
            return Residency.MISSING, 0.0
        ready = self._ready_at.get(slot, 0.0) - now
        return (Residency.INFLIGHT, ready) if ready > 0 else (Residency.RESIDENT, 0.0)

    def copy_free_s(self, now: float) -> float:
        """Seconds until the copies issued so far are predicted to have landed."""
        return max(0.0, self._busy_until - now)

    # ----- demand path -----

    def acquire(self, keys: Sequence[SubExpertKey], step: int, layer: int) -> list[int]:
        """Pin `keys` in slots (copying the missing ones) and make compute wait for their copies."""
        self.settle(layer, keys)
        slots, fills = self.table.acquire(keys, step, layer, self.num_layers)
        self._issue(fills)
        self.engine.wait(self._take_tickets(slots))
        return slots

    def release(self, keys: Sequence[SubExpertKey]) -> None:
        """Unpin after the compute reading these slots has been issued (not necessarily run)."""
        self.table.release(keys)
        mark = self.engine.mark()
        for key in keys:
            slot = self.table.lookup(key)
            if slot is not None:
                self._read[slot] = mark

    def drain(self) -> None:
        """Make compute wait for every pending copy (before work that bypasses `acquire`)."""
        self.engine.wait(self._take_tickets(list(self._pending)))

    # ----- ahead of need -----

    def prefetch(self, layer: int, keys: Iterable[SubExpertKey], step: int, current_layer: int,
                 predicted: Iterable[SubExpertKey] | None = None) -> int:
        """Start copying `keys` (all of target `layer`) into free or evictable slots; returns the
        number of copies started. Resident keys cost nothing; if every slot is pinned, the rest
        are skipped (a prefetch is a hint). `predicted` (default `keys`) is the prediction scored by
        the recall/precision stats, when the copies were cut to fewer units than were predicted."""
        keys = list(dict.fromkeys(keys))
        self._predicted.setdefault(layer, set()).update(keys if predicted is None else predicted)
        worth = self._worth_copying(layer)
        if worth is False:
            return 0
        if worth is None:  # a probe: the best-ranked unit only
            keys = keys[:1]
        fills = []
        for key in keys:
            slot = self.table.insert_prefetched(key, step, current_layer, self.num_layers)
            if slot is not None:
                fills.append((key, slot))
                self._inflight.setdefault(layer, set()).add(key)
        self._issue(fills)
        self.stats.units_prefetched += len(fills)
        return len(fills)

    def admit(self, keys: Iterable[SubExpertKey], step: int, current_layer: int) -> int:
        """Copy units computed elsewhere (the CPU path) into the cache for later tokens: unpinned,
        never waited on, evicting like a miss would; the number of copies started."""
        fills = []
        for key in keys:
            slot = self.table.insert_prefetched(key, step, current_layer, self.num_layers)
            if slot is not None:
                fills.append((key, slot))
        self._issue(fills)
        return len(fills)

    def copy_after_compute(self, fills: Sequence[tuple[SubExpertKey, int]]) -> None:
        """Copy units the caller already placed in the table (zero-copy decode's admissions) into
        their slots, each copy after all compute issued so far (which may still read the slots'
        previous units) and after earlier copies into the same slots. Nothing waits for them:
        `landed` says when a slot's copy is done."""
        mark = self.engine.mark()
        for _, slot in fills:
            self._read[slot] = mark
        self._issue(fills)

    def landed(self, slot: int) -> bool:
        """Whether the last copy issued into `slot` has completed (never blocks)."""
        ticket = self._pending.get(slot)
        return ticket is None or bool(ticket.query())

    # ----- internals -----

    def _worth_copying(self, layer: int) -> bool | None:
        """True: copy the prediction; False: pause; None: probe with the best-ranked unit."""
        if self._copy_precision.get(layer, 1.0) >= self.min_precision:
            return True
        self._skipped[layer] = self._skipped.get(layer, 0) + 1
        if self._skipped[layer] >= self.probe_every:
            self._skipped[layer] = 0
            return None
        self.stats.predictions_skipped += 1
        return False

    def settle(self, layer: int, keys: Sequence[SubExpertKey]) -> None:
        """Score the prediction made for `layer` against what it routes, and drop stale prefetches.
        `acquire` calls it; a scheduler calls it first with every routed unit (some go to the CPU or
        nowhere), and the second call is a no-op.

        A prefetched unit its layer did not use is stale: it is discarded from the cache (its slot
        freed), so it cannot push out a unit that was actually used.
        """
        predicted = self._predicted.pop(layer, None)
        placed = self._inflight.pop(layer, set())
        if predicted is None:
            return
        routed = set(keys)
        s = self.stats
        s.predicted[layer] += len(predicted)
        s.routed[layer] += len(routed)
        s.correct[layer] += len(predicted & routed)
        used = placed & routed
        if placed:
            hit = len(used) / len(placed)
            self._copy_precision[layer] = 0.7 * self._copy_precision.get(layer, hit) + 0.3 * hit
        s.bytes_used += len(used) * self.store.unit_bytes
        s.bytes_wasted += len(placed - used) * self.store.unit_bytes
        for key in placed - used:
            self.table.discard(key)

    def begin_step(self) -> Any:
        """A decode step starts (its engine may keep the compute stream until `end_step`); the stream
        kept, or None (then events record on the current stream)."""
        return self.engine.begin_step()

    def end_step(self) -> None:
        self.engine.end_step()

    def _issue(self, fills: Sequence[tuple[SubExpertKey, int]]) -> None:
        if not fills:
            return
        with self.engine.issuing():
            self._issue_on_copy_stream(fills)

    def _issue_on_copy_stream(self, fills: Sequence[tuple[SubExpertKey, int]]) -> None:
        for key, slot, count in coalesce(fills, self.store):
            after = [self._pending[s] for s in range(slot, slot + count) if s in self._pending]
            reads = list({id(m): m for s in range(slot, slot + count) if (m := self._read.pop(s, None)) is not None}.values())
            src = self.store.units(key.layer, self.store.row(key), count)
            ticket = self.engine.copy(self.cache.pool[slot:slot + count], src, after, reads)
            for s in range(slot, slot + count):
                self._pending[s] = ticket
            self.cache.count_copy(src)
            if self.copy_cost is not None:
                now = time.perf_counter()
                self._busy_until = max(now, self._busy_until) + self.copy_cost.h2d_seconds(src.numel() * src.element_size())
                for s in range(slot, slot + count):
                    self._ready_at[s] = self._busy_until

    def _take_tickets(self, slots: Iterable[int]) -> list[Ticket]:
        tickets: dict[int, Ticket] = {}
        for slot in set(slots):
            ticket = self._pending.pop(slot, None)
            if ticket is not None:
                tickets[id(ticket)] = ticket
        # a ticket shared with slots not waited on stays pending there (waiting twice is harmless)
        return list(tickets.values())

    def summary(self) -> dict[str, Any]:
        s = self.stats
        routed, predicted, correct = sum(s.routed), sum(s.predicted), sum(s.correct)
        layers = [i for i in range(self.num_layers) if s.routed[i]]
        return {
            "prefetch_recall": correct / routed if routed else None,
            "prefetch_precision": correct / predicted if predicted else None,
            "prefetch_recall_per_layer": {i: s.correct[i] / s.routed[i] for i in layers},
            "prefetch_precision_per_layer": {i: s.correct[i] / max(1, s.predicted[i]) for i in layers},
            "prefetch_units": s.units_prefetched, "prefetch_paused": s.predictions_skipped,
            "prefetch_bytes_used": s.bytes_used, "prefetch_bytes_wasted": s.bytes_wasted,
            "stall_s": self.engine.stall_seconds(),
        }

    def reset_stats(self) -> None:
        self.stats = PrefetchStats.empty(self.num_layers)
        self.engine.reset_stall()
