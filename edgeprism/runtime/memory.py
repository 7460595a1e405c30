"""VRAM budget accounting: how `vram_gb` splits into resident weights, KV cache, workspace and
expert cache, and how much the device has free when no budget is given.

`vram_gb` is everything the engine may allocate on the device. The resident part (attention,
embeddings, norms, routers, shared experts and dense layers) must fit; whatever remains after the
KV cache and a workspace reserve becomes expert-cache slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from edgeprism.config import ModelSpec
from edgeprism.errors import BudgetError

log = logging.getLogger(__name__)

GiB = 2**30
FREE_MARGIN_BYTES = 1 * GiB  # left for other programs and the CUDA context when vram_gb=None
WORKSPACE_SLACK = 64 * 2**20


def resident_params(spec: ModelSpec) -> int:
    """Parameters that always stay on the device (everything but routed experts)."""
    D, hd = spec.dim, spec.head_dim
    q, kv = spec.n_heads * hd, spec.n_kv_heads * hd
    attn = D * q + 2 * D * kv + q * D + 2 * D  # projections + the two layer norms
    attn += (q + 2 * kv) if spec.qkv_bias else 0
    attn += {"head": 2 * hd, "full": q + kv}.get(spec.qk_norm, 0)
    moe = spec.num_experts * D + (3 * D * spec.shared_intermediate + D if spec.shared_intermediate else 0)
    dense = 3 * D * spec.dense_intermediate
    layers = sum(attn + (moe if sparse else dense) for sparse in spec.sparse_layers)
    head = 0 if spec.tie_embeddings else spec.vocab_size * D
    return spec.vocab_size * D + head + D + layers


def kv_cache_bytes(spec: ModelSpec, max_context: int, elem: int) -> int:
    return 2 * spec.n_layers * spec.n_kv_heads * max_context * spec.head_dim * elem


def workspace_bytes(spec: ModelSpec, max_context: int, chunk: int, elem: int, gather: int) -> int:
    """A conservative reserve for activations of one prefill chunk plus the decode gather buffer."""
    inter = max(spec.moe_intermediate, spec.dense_intermediate, spec.shared_intermediate)
    acts = chunk * (12 * spec.dim + 4 * inter) * max(elem, 4)
    scores = 2 * spec.n_heads * chunk * max_context * 4  # attention probabilities if materialised
    logits = chunk * spec.vocab_size * (elem + 4) * 2
    rope = 2 * max_context * spec.head_dim * 4
    return acts + scores + logits + rope + gather + WORKSPACE_SLACK


@dataclass(frozen=True)
class BudgetPlan:
    """The split of one budget; every figure in bytes."""

    total: int | None
    resident: int
    kv_cache: int
    workspace: int
    cache: int
    unit_bytes: int
    num_slots: int
    total_units: int
    min_slots: int

    @property
    def cache_share(self) -> float:
        return min(1.0, self.num_slots / self.total_units)

    def describe(self) -> str:
        total = "unlimited" if self.total is None else f"{self.total / GiB:.2f} GiB"
        return (f"budget {total}: resident weights {self.resident / GiB:.3f} GiB, KV cache {self.kv_cache / GiB:.3f} GiB, "
                f"workspace {self.workspace / GiB:.3f} GiB, expert cache {self.cache / GiB:.3f} GiB = "
                f"{self.num_slots} slots of {self.unit_bytes / 2**20:.2f} MiB "
                f"({100 * self.cache_share:.1f}% of {self.total_units} expert units)")


def plan_budget(spec: ModelSpec, *, elem: int, groups: int, max_context: int, chunk: int, gather_limit: int,
                vram_bytes: int | None, cache_fraction: float | None = None, unit_bytes: int | None = None) -> BudgetPlan:
    """Split `vram_bytes` (None = no limit) into its parts; raise BudgetError if the resident part does not fit.

    `unit_bytes`: bytes of one stored unit when experts are quantized (moe/quant.py); default: the
    unit in `elem`-byte weights. Slots are counted in stored units; the gather reserve stays in the
    compute dtype (the torch path dequantizes a decode step's units).
    """
    resident = resident_params(spec) * elem
    kv = kv_cache_bytes(spec, max_context, elem)
    dense_unit = 3 * spec.dim * (spec.moe_intermediate // groups) * elem
    unit = unit_bytes or dense_unit
    gather = min(gather_limit, spec.top_k * groups * dense_unit)  # one decode step gathers its k·G units
    work = workspace_bytes(spec, max_context, chunk, elem, 2 * gather)
    total_units = len(spec.moe_layers) * spec.num_experts * groups
    min_slots = spec.top_k * groups  # one decode step of one layer must fit at once
    if vram_bytes is None:
        cache = total_units * unit
    else:
        cache = vram_bytes - resident - kv - work
        needed = resident + kv + work + min_slots * unit
        if cache < min_slots * unit:
            raise BudgetError(
                f"vram_gb={vram_bytes / GiB:.3f} is too small: this model needs at least {needed / GiB:.3f} GB "
                f"(resident weights {resident / GiB:.3f}, KV cache for {max_context} tokens {kv / GiB:.3f}, "
                f"workspace {work / GiB:.3f}, {min_slots} expert slots {min_slots * unit / GiB:.3f}); "
                "raise vram_gb or lower max_context.")
    slots = min(total_units, cache // unit)
    if cache_fraction is not None:
        slots = min(slots, max(min_slots, round(cache_fraction * total_units)))
    return BudgetPlan(vram_bytes, resident, kv, work, slots * unit, unit, slots, total_units, min_slots)


def free_device_bytes(device: torch.device) -> int | None:
    """What the device has free minus a margin; None on CPU (no limit)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        free = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free
    except Exception as e:  # pynvml missing or NVML unavailable (containers): ask CUDA instead
        log.debug("NVML unavailable (%s); using torch.cuda.mem_get_info", e)
        free = torch.cuda.mem_get_info(device)[0]
    return max(0, free - FREE_MARGIN_BYTES)
