"""A fixed pool of unit slots on the compute device, and the copies that fill it.

Slot storage only: which unit sits where is the `SlotTable`'s job, which unit to evict is the
policy's. All units of a model have the same size, so any slot can hold any unit and the pool is
one tensor [num_slots, unit_numel] allocated once (no allocator churn on the decode path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgeprism.cache.host_store import HostStore
from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.policies import make_policy
from edgeprism.cache.slot_table import SlotTable
from edgeprism.moe.quant import DenseParts


class ExpertCache:
    """Slot pool + slot table + the host→device copies that fill slots."""

    def __init__(self, store: HostStore, num_slots: int, device: torch.device, policy: str, extra_rows: int = 0) -> None:
        self.store = store
        self.device = device
        # `extra_rows` rows past the slots are not the cache's: zero-copy decode's prefetch stages
        # predicted units there (cache/direct.py); the slot table never hands them out
        self._num_slots, self.extra_rows = num_slots, extra_rows
        self.pool = torch.zeros(num_slots + extra_rows, store.numel, dtype=store.arenas[store.layers[0]].dtype,
                                device=device)
        self.format = store.format  # how units are stored and computed (moe/quant.py)
        self.parts = self.format.parts(self.pool)
        # dense views [S, 2Ig, D], [S, D, Ig]; None for quantized formats (use format + parts)
        self.w13, self.w2 = (self.parts.w13, self.parts.w2) if isinstance(self.parts, DenseParts) else (None, None)
        self.table = SlotTable(num_slots, make_policy(policy))
        self.num_layers = max(store.layers) + 1
        self.bytes_h2d = 0
        self.copies = 0
        self.time_copies = False  # set True to time fills with CUDA events (benchmarks)
        self._copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @property
    def num_slots(self) -> int:
        return self._num_slots

    def acquire(self, keys: Sequence[SubExpertKey], step: int, layer: int) -> list[int]:
        """Pin `keys` in slots, copying in the missing ones; returns one slot per key."""
        slots, fills = self.table.acquire(keys, step, layer, self.num_layers)
        self.fill(fills)
        return slots

    def release(self, keys: Sequence[SubExpertKey]) -> None:
        self.table.release(keys)

    def fill(self, fills: Sequence[tuple[SubExpertKey, int]]) -> None:
        """Copy units into their slots, merging runs that are adjacent both in host and slot memory.

        Copies are issued on the current stream, so kernels queued after them on that stream see
        the data; from pinned memory they do not block the host (PCIe needs ≥ 4 MiB per copy to
        reach full speed, hence the merging).
        """
        if not fills:
            return
        timed = self.time_copies and self.device.type == "cuda"
        if timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for key, slot, count in coalesce(fills, self.store):
            src = self.store.units(key.layer, self.store.row(key), count)
            self.pool[slot:slot + count].copy_(src, non_blocking=self.store.pinned)
            self.count_copy(src)
        if timed:
            end.record()
            self._copy_events.append((start, end))

    def count_copy(self, src: torch.Tensor) -> None:
        self.bytes_h2d += src.numel() * src.element_size()
        self.copies += 1

    def copy_seconds(self) -> float:
        """GPU time spent in timed fills so far (synchronises; benchmarks only)."""
        torch.cuda.synchronize(self.device)
        return sum(a.elapsed_time(b) for a, b in self._copy_events) / 1e3

    def reset_copy_stats(self) -> None:
        self.bytes_h2d = self.copies = 0
        self._copy_events.clear()

    def preload_all(self) -> bool:
        """If every unit fits, place them all (no counting) and return True: the cache is then static."""
        keys = [SubExpertKey(layer, e, g) for layer in self.store.layers
                for e in range(self.store.num_experts) for g in range(self.store.groups)]
        if len(keys) > self.num_slots:
            return False
        self.fill(self.table.preload(keys))
        self.reset_copy_stats()
        return True


def coalesce(fills: Sequence[tuple[SubExpertKey, int]], store: HostStore) -> list[tuple[SubExpertKey, int, int]]:
    """Group (key, slot) fills into (first key, first slot, count) runs contiguous on both sides."""
    runs: list[tuple[SubExpertKey, int, int]] = []
    for key, slot in sorted(fills, key=lambda f: f[1]):
        if runs:
            k0, s0, n = runs[-1]
            if k0.layer == key.layer and s0 + n == slot and store.row(k0) + n == store.row(key):
                runs[-1] = (k0, s0, n + 1)
                continue
        runs.append((key, slot, 1))
    return runs
