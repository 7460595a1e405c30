"""Micro-benchmarks of prefetch's host-side work per MoE layer, Qwen3-30B-A3B-like routing shape
(128 experts, top-8, 2 groups): the predictor's candidate ranking (hidden 2048, lookahead 2) and
the prefetcher's bookkeeping (settle, acquire, prefetch, release) over an 800-slot cache.

Unit weights are tiny (dim 8) so the timing is bookkeeping, not copies. CI runs these with
--benchmark-disable (one pass, as a smoke test); `python -m pytest tests/test_bench_prefetch.py
--benchmark-enable` times them.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from edgeprism.cache.host_store import HostStore
from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.vram_cache import ExpertCache
from edgeprism.models.modules import RMSNorm
from edgeprism.prefetch.predictor import NextLayerPredictor
from edgeprism.prefetch.prefetcher import InlineCopies, Prefetcher

LAYERS, EXPERTS, TOP_K, GROUPS, SLOTS = 12, 128, 8, 2, 800


class Gate(nn.Module):
    """Stands in for a MoE block: the predictor only reads its router."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, EXPERTS, bias=False)


def test_predictor_candidates(benchmark):
    torch.manual_seed(0)
    targets = [(RMSNorm(2048, 1e-6), Gate(2048)) for _ in range(LAYERS)]
    predictor = NextLayerPredictor(targets, lookahead=2, candidates=2 * TOP_K)  # type: ignore[arg-type]
    h = torch.randn(1, 2048)
    with torch.inference_mode():
        probs, ids = benchmark(predictor.candidates, h, 3)
    assert probs.shape == ids.shape == (2, 2 * TOP_K)
    assert torch.all(probs[:, :-1] >= probs[:, 1:])  # best first
    want = torch.softmax(targets[4][1].gate(targets[4][0](h)), -1).topk(2 * TOP_K).indices
    assert torch.equal(ids[0], want[0])


def test_prefetcher_layer_bookkeeping(benchmark):
    store = HostStore(range(LAYERS), EXPERTS, GROUPS, dim=8, inter=8, dtype=torch.float32, pin=False)
    fetch = Prefetcher(ExpertCache(store, SLOTS, torch.device("cpu"), "lru"), InlineCopies())
    rng = random.Random(0)
    routes = [[rng.sample(range(EXPERTS), TOP_K) for _ in range(LAYERS)] for _ in range(64)]
    units = lambda layer, experts: [SubExpertKey(layer, e, g) for e in experts for g in range(GROUPS)]  # noqa: E731
    state = {"t": 0}

    def one_token() -> None:
        t = state["t"] = state["t"] + 1
        route = routes[t % len(routes)]
        for layer in range(LAYERS):
            keys = units(layer, route[layer])
            fetch.acquire(keys, t, layer)
            if layer + 1 < LAYERS:  # predict: half right, half wrong
                guess = route[layer + 1][:TOP_K // 2] + rng.sample(range(EXPERTS), TOP_K // 2)
                fetch.prefetch(layer + 1, units(layer + 1, guess), t, layer)
            fetch.release(keys)

    benchmark(one_token)
    fetch.cache.table.check_invariants()
    s = fetch.summary()
    assert s["prefetch_units"] > 0 and 0.5 <= s["prefetch_recall"] <= 1.0
