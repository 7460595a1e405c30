"""Where every sub-expert lives: one (pinned) CPU arena per MoE layer, one contiguous row per unit.

Rows are ordered (expert, group), so the G units of one expert are adjacent and a run of misses on
one expert can move in one copy. Pinned memory is what lets host→device copies run at PCIe speed
(pageable copies reach 8–12 GB/s, pinned 50+); if pinning fails we fall back to pageable memory
with a warning rather than refusing to run.

The arenas are views into a few blocks whose sizes are powers of two (`plan_blocks`). torch's
pinned-memory allocator rounds every request up to the next power of two, so one pinned arena per
layer cost up to twice its size: a Qwen3-30B-A3B int4 layer (306 MiB) pinned 512 MiB, 24 GiB for 48
layers of 14.4 GiB (measured on the H100 box); its bf16 layers (1152 MiB each) would pin 2 GiB each.
Several layers to a block of 2^k bytes waste a few percent instead.
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

ARENA_ALIGN = 4096  # arenas sit a multiple of a page apart in their block (pinned blocks start on a page)
BLOCK_SPAN = 5  # block sizes tried: the smallest power of two that holds one arena, and 2x ... 16x it
MAX_BLOCK = 2**35  # no block above 32 GiB (unless one arena needs it)


def arena_stride(arena_bytes: int) -> int:
    """Bytes from one arena's start to the next one's in a block: its size rounded up to ARENA_ALIGN."""
    return -(-arena_bytes // ARENA_ALIGN) * ARENA_ALIGN


def plan_blocks(arena_bytes: int, count: int) -> list[tuple[int, int]]:
    """How to lay out `count` arenas of `arena_bytes` each (rounded up to ARENA_ALIGN) in blocks of
    power-of-two sizes: a list of (block bytes, arenas in it), in order. Each step takes the block
    that wastes the smallest fraction of itself on what is left (ties: the smaller block)."""
    stride = arena_stride(arena_bytes)
    smallest = 1 << max(0, (stride - 1).bit_length())
    plan, left = [], count
    while left:
        best = None
        for k in range(BLOCK_SPAN):
            block = smallest << k
            if k and block > MAX_BLOCK:
                break
            n = min(left, block // stride)
            waste = (block - n * stride) / block
            if best is None or waste < best[0] - 1e-12:
                best = (waste, block, n)
        plan.append((best[1], best[2]))
        left -= best[2]
    return plan

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
        self.arenas = self._alloc_arenas(self.format.row_dtype, pin)

    @property
    def total_bytes(self) -> int:
        return len(self.layers) * self.num_experts * self.groups * self.unit_bytes

    def _check_ram(self) -> None:
        available = psutil.virtual_memory().available
        if self.total_bytes > available:  # pinned blocks take a few percent more (plan_blocks); pageable exactly this
            raise HostMemoryError(
                f"the experts need {self.total_bytes / 2**30:.2f} GiB of host RAM but only "
                f"{available / 2**30:.2f} GiB is available; close other programs, use a machine with more "
                "RAM, or a quantized/smaller model.")

    def _alloc_arenas(self, dtype: torch.dtype, pin: bool) -> dict[int, torch.Tensor]:
        """One arena [rows, numel] per layer, each a view into a block of `plan_blocks`: pinned blocks
        of those power-of-two sizes where asked and possible (all or none: if pinning fails, every
        layer falls back to pageable memory), else pageable blocks of just the bytes they hold."""
        rows = self.num_experts * self.groups
        arena_bytes = rows * self.unit_bytes
        stride = arena_stride(arena_bytes)
        plan = plan_blocks(arena_bytes, len(self.layers))
        blocks = None
        if pin and torch.cuda.is_available():
            try:
                blocks = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for size, _ in plan]
                self.pinned = True
            except RuntimeError as e:
                log.warning("pinning %.2f GiB failed (%s); using pageable memory: host→device copies will be "
                            "3–5x slower", sum(size for size, _ in plan) / 2**30, e)
        if blocks is None:
            # the blocks pinned before the failure sit in torch's pinned cache once freed: give them back
            empty_pinned_cache = getattr(torch._C, "_host_emptyCache", None)
            if pin and torch.cuda.is_available() and empty_pinned_cache is not None:
                empty_pinned_cache()
            blocks = [torch.empty(n * stride, dtype=torch.uint8) for _, n in plan]
            self.pinned = False
        layers, arenas = iter(self.layers), {}
        for block, (_, n) in zip(blocks, plan, strict=True):
            for i in range(n):
                arenas[next(layers)] = block[i * stride:i * stride + arena_bytes].view(dtype).view(rows, self.numel)
        return arenas

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
