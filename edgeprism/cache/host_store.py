"""Where every sub-expert lives: one (pinned) CPU arena per MoE layer, one contiguous row per unit.

Rows are ordered (expert, group), so the G units of one expert are adjacent and a run of misses on
one expert can move in one copy. Pinned memory is what lets host→device copies run at PCIe speed
(pageable copies reach 8–12 GB/s, pinned 50+); if pinning fails we fall back to pageable memory
with a warning rather than refusing to run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import psutil
import torch

from edgeprism.cache.keys import SubExpertKey
from edgeprism.errors import HostMemoryError
from edgeprism.moe.quant import DenseFormat, Parts, UnitFormat

log = logging.getLogger(__name__)

# (layer, expert) -> (w1 [I, D], w3 [I, D], w2 [D, I]) in any dtype
ExpertReader = Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class HostStore:
    """All expert units of a model in CPU RAM, filled straight from the checkpoint."""

    def __init__(self, layers: Sequence[int], num_experts: int, groups: int, dim: int, inter: int,
                 dtype: torch.dtype, pin: bool, fmt: UnitFormat | None = None,
                 pack_device: torch.device | None = None) -> None:
        # fmt: how a unit is stored (default: dense in `dtype`); quantized formats are packed on
        # `pack_device` when given (a GPU quantizes a model's experts far faster than the CPU)
        self.layers, self.num_experts, self.groups = list(layers), num_experts, groups
        self.dim, self.group_inter = dim, inter // groups
        self.format = fmt or DenseFormat(dim, self.group_inter, dtype, dtype)
        self.pack_device = pack_device if self.format.quantized else None
        self.numel = self.format.row_numel
        self.unit_bytes = self.format.unit_bytes
        self.pinned = False
        self._check_ram()
        self.arenas = {layer: self._alloc(self.format.row_dtype, pin) for layer in self.layers}

    @property
    def total_bytes(self) -> int:
        return len(self.layers) * self.num_experts * self.groups * self.unit_bytes

    def _check_ram(self) -> None:
        available = psutil.virtual_memory().available
        if self.total_bytes > available:
            raise HostMemoryError(
                f"the experts need {self.total_bytes / 2**30:.2f} GiB of host RAM but only "
                f"{available / 2**30:.2f} GiB is available; close other programs, use a machine with more "
                "RAM, or a quantized/smaller model.")

    def _alloc(self, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        shape = (self.num_experts * self.groups, self.numel)
        if pin and torch.cuda.is_available():
            try:
                arena = torch.empty(shape, dtype=dtype, pin_memory=True)
                self.pinned = True
                return arena
            except RuntimeError as e:
                log.warning("pinning %.2f GiB failed (%s); using pageable memory: host→device copies will be "
                            "3–5x slower", self.unit_bytes * shape[0] / 2**30, e)
        self.pinned = False
        return torch.empty(shape, dtype=dtype)

    def row(self, key: SubExpertKey) -> int:
        return key.expert * self.groups + key.group

    def unit(self, key: SubExpertKey) -> torch.Tensor:
        """The unit's flat row [numel] (a view into the arena)."""
        return self.arenas[key.layer][self.row(key)]

    def parts(self, layer: int) -> Parts:
        """The format's views (`moe/quant.Parts`) of a layer's arena: what a kernel reads in place."""
        return self.format.parts(self.arenas[layer])

    def units(self, layer: int, first_row: int, count: int) -> torch.Tensor:
        """`count` adjacent rows [count, numel] starting at `first_row` (for coalesced copies)."""
        return self.arenas[layer][first_row:first_row + count]

    def fill(self, read: ExpertReader, perms: dict[tuple[int, int], torch.Tensor] | None = None,
             progress: Callable[[int], None] | None = None) -> None:
        """Fill every unit from `read`; `perms[(layer, expert)]` reorders neurons before grouping."""
        for layer in self.layers:
            for expert in range(self.num_experts):
                w1, w3, w2 = read(layer, expert)
                perm = perms.get((layer, expert)) if perms else None
                self.fill_expert(layer, expert, w1, w3, w2, perm)
                if progress is not None:
                    progress(self.groups * self.unit_bytes)
        if self.pack_device is not None and self.pack_device.type == "cuda":
            torch.cuda.empty_cache()  # hand the quantizer's scratch back before the cache is allocated

    def fill_expert(self, layer: int, expert: int, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                    perm: torch.Tensor | None = None) -> None:
        # w1, w3: [I, D]; w2: [D, I]; perm: [I] neuron order (group g = perm[g*Ig:(g+1)*Ig])
        arena = self.arenas[layer]
        gi = self.group_inter
        if perm is not None:
            w1, w3, w2 = w1[perm], w3[perm], w2[:, perm]
        if self.pack_device is not None:
            w1, w3, w2 = (w.to(self.pack_device) for w in (w1, w3, w2))
        for g in range(self.groups):
            cols = slice(g * gi, (g + 1) * gi)
            arena[expert * self.groups + g].copy_(self.format.pack(w1[cols], w3[cols], w2[:, cols]))
