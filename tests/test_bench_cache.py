"""Micro-benchmark of the cache bookkeeping on the decode path: acquire + release per layer.

Qwen3-MoE-like shape: 48 layers, 128 experts, top-8 routing, 2 sub-expert groups per expert, an
800-slot cache. CI runs it with --benchmark-disable (one pass, as a smoke test); run
`python -m pytest tests/test_bench_cache.py` to time it.
"""

from __future__ import annotations

import random

import pytest

from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.policies import POLICY_NAMES, make_policy
from edgeprism.cache.slot_table import SlotTable

NUM_LAYERS = 48
NUM_EXPERTS = 128
TOP_K = 8
NUM_GROUPS = 2
NUM_SLOTS = 800
NUM_TOKENS = 12

Trace = list[list[list[SubExpertKey]]]  # [token][layer] -> units routed


def route_one(rng: random.Random, popularity: list[float]) -> list[int]:
    """TOP_K distinct experts drawn by popularity (a skewed, Zipf-like router)."""
    chosen: set[int] = set()
    while len(chosen) < TOP_K:
        chosen.update(rng.choices(range(NUM_EXPERTS), weights=popularity, k=TOP_K - len(chosen)))
    return sorted(chosen)


def make_trace(seed: int = 0) -> Trace:
    rng = random.Random(seed)
    popularity = [[0.0] * NUM_EXPERTS for _ in range(NUM_LAYERS)]
    for layer in range(NUM_LAYERS):
        ranks = list(range(NUM_EXPERTS))
        rng.shuffle(ranks)
        popularity[layer] = [1.0 / (1 + rank) for rank in ranks]
    return [
        [
            [SubExpertKey(layer, e, g) for e in route_one(rng, popularity[layer]) for g in range(NUM_GROUPS)]
            for layer in range(NUM_LAYERS)
        ]
        for _ in range(NUM_TOKENS)
    ]


def decode(table: SlotTable, trace: Trace) -> None:
    for step, layers in enumerate(trace):
        for layer, keys in enumerate(layers):
            table.acquire(keys, step, layer, NUM_LAYERS)
            table.release(keys)


TRACE = make_trace()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_bench_acquire_release(benchmark, policy: str) -> None:
    def fresh_table() -> tuple[tuple[SlotTable, Trace], dict]:
        return (SlotTable(NUM_SLOTS, make_policy(policy)), TRACE), {}

    tables: list[SlotTable] = []

    def run(table: SlotTable, trace: Trace) -> None:
        decode(table, trace)
        tables.append(table)

    benchmark.pedantic(run, setup=fresh_table, rounds=3)
    table = tables[-1]
    table.check_invariants()
    assert table.accesses == NUM_TOKENS * NUM_LAYERS * TOP_K * NUM_GROUPS
    benchmark.extra_info["hit_rate"] = round(table.hits / table.accesses, 3)
    benchmark.extra_info["evictions_per_token"] = table.evictions / NUM_TOKENS
