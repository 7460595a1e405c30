"""What users would run instead, rebuilt on the same weights for a side-by-side bench.

- `LruExpertOffload`: the mixtral-offloading recipe without its quantization — whole experts,
  a fixed number of cache slots per layer, LRU eviction, on-demand copies from pinned RAM, one
  launch per matrix per expert, no prediction.
- `accelerate_model`: transformers + accelerate `device_map="auto"` under the same `max_memory`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from edgeprism.api import Engine
from edgeprism.cache.host_store import HostStore
from edgeprism.moe.kernels import split_pool
from edgeprism.moe.layer import MoEBlock
from edgeprism.runtime.graphs import DecodeStep


class LruExpertOffload:
    """An `ExpertProvider`: per-layer LRU of whole experts (the store must have groups=1)."""

    def __init__(self, store: HostStore, cache_bytes: int, top_k: int, device: torch.device) -> None:
        assert store.groups == 1, "the baseline caches whole experts"
        self.store, self.device = store, device
        self.per_layer = max(top_k, cache_bytes // (len(store.layers) * store.unit_bytes))
        self.per_layer = min(self.per_layer, store.num_experts)
        dtype = store.arenas[store.layers[0]].dtype
        self.pool = torch.empty(len(store.layers) * self.per_layer, store.numel, dtype=dtype, device=device)
        self.w13, self.w2 = split_pool(self.pool, store.dim, store.group_inter)
        self.base = {layer: i * self.per_layer for i, layer in enumerate(store.layers)}
        self.lru: dict[int, OrderedDict[int, int]] = {layer: OrderedDict() for layer in store.layers}
        self.hits = self.misses = self.bytes_h2d = 0

    def _slot(self, layer: int, expert: int) -> int:
        lru = self.lru[layer]
        if expert in lru:
            lru.move_to_end(expert)
            self.hits += 1
            return lru[expert]
        self.misses += 1
        slot = self.base[layer] + len(lru) if len(lru) < self.per_layer else lru.popitem(last=False)[1]
        src = self.store.arenas[layer][expert]
        self.pool[slot].copy_(src, non_blocking=self.store.pinned)
        self.bytes_h2d += src.numel() * src.element_size()
        lru[expert] = slot
        return slot

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        gi = self.store.group_inter
        for e in torch.unique(ids).tolist():
            slot = self._slot(layer, e)
            tokens, pos = torch.nonzero(ids == e, as_tuple=True)
            xe = x[tokens]
            w13 = self.w13[slot]
            h = F.silu(F.linear(xe, w13[:gi])) * F.linear(xe, w13[gi:])
            y = F.linear(h, self.w2[slot]) * weights[tokens, pos][:, None]
            out.index_add_(0, tokens, y.to(x.dtype))
        return out

    def reset_stats(self) -> None:
        self.hits = self.misses = self.bytes_h2d = 0


def install(engine: Engine, provider: LruExpertOffload) -> None:
    """Swap the provider behind every MoE block (the seam the engine itself uses) and free the engine's pool."""
    for block in engine.model.layers:
        if isinstance(block.ffn, MoEBlock):
            block.ffn.experts = provider
    engine.cache.pool = engine.cache.w13 = engine.cache.w2 = None  # type: ignore[assignment]
    engine.decode_step = DecodeStep(engine.model, engine.device, use_graphs=False)  # eager: calls the provider
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()


def accelerate_model(cfg: dict, budget_gb: float, source_random, device_index: int = 0):  # noqa: ANN001, ANN201
    """A transformers model with random bf16 weights dispatched by accelerate under `budget_gb`."""
    import accelerate
    import transformers

    arch = cfg["architectures"][0]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        model = getattr(transformers, arch)(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(source_random(name, tuple(p.shape)))
    # to_empty leaves non-persistent buffers (RoPE inv_freq) uninitialised: rebuild that module
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()
    device_map = accelerate.infer_auto_device_map(
        model, max_memory={device_index: int(budget_gb * 2**30), "cpu": 200 * 2**30},
        no_split_module_classes=model._no_split_modules)
    return accelerate.dispatch_model(model, device_map=device_map)
