"""Replayed hit rates of the expert cache: global LRU vs uniform per-layer shares vs adaptive shares.

Records the units the embedded default model routes (CPU, greedy decode of held-out text), then
replays the second half of the trace through fresh slot tables: no quotas (global LRU), equal quotas
per layer, and the quotas `AdaptiveCacheConfig` fits on the first half (and, as an upper reference,
on the second half itself). Usage: python bench/adaptive_cache.py [--slots 48 64 96] [--prompts 24]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import edgeprism
from edgeprism.cache.keys import SubExpertKey
from edgeprism.cache.policies import make_policy
from edgeprism.cache.slot_table import SlotTable
from edgeprism.corpus import HELDOUT
from edgeprism.schedule.adaptive import AdaptiveCacheConfig

Trace = list[tuple[SubExpertKey, ...]]


def record(prompts: int, new_tokens: int, groups: int) -> tuple[Trace, list[int], int]:
    """Every acquire's keys while decoding `prompts` held-out paragraphs; also the MoE layers, k·G."""
    engine = edgeprism.load(device="cpu", groups=groups, cuda_graphs=False, cache_fraction=0.5)
    trace: Trace = []
    engine.cache.table.observer = lambda keys: trace.append(tuple(keys))
    paragraphs = [p for p in HELDOUT.read_text(encoding="utf-8").split("\n\n") if len(p) > 200][:prompts]
    for text in paragraphs:
        engine.generate(text[:400], max_new_tokens=new_tokens)
    spec = engine.spec
    engine.close()
    return trace, list(spec.moe_layers), spec.top_k * groups


def replay(table: SlotTable, trace: Trace, num_layers: int) -> float:
    for step, keys in enumerate(trace):
        table.acquire(keys, step, keys[0].layer, num_layers)
        table.release(keys)
    return table.hits / table.accesses


def fit(trace: Trace, layers: Sequence[int], num_slots: int, min_slots: int, top_groups: int) -> AdaptiveCacheConfig:
    adaptive = AdaptiveCacheConfig(SlotTable(num_slots, make_policy("lru")), layers, min_slots=min_slots,
                                   top_groups=top_groups)
    replay(adaptive.table, trace, max(layers) + 1)
    adaptive.update()
    return adaptive


def compare(trace: Trace, layers: list[int], num_slots: int, min_slots: int, top_groups: int) -> dict:
    half = len(trace) // 2
    train, test = trace[:half], trace[half:]
    n = max(layers) + 1

    def table(quotas: dict[int, int] | None = None, top: dict[int, int] | None = None) -> SlotTable:
        t = SlotTable(num_slots, make_policy("lru"))
        t.configure(quotas, top, top_groups if top else 0)
        return t

    fitted, oracle = fit(train, layers, num_slots, min_slots, top_groups), fit(test, layers, num_slots, min_slots, top_groups)
    split = (lambda s: s.top_slots) if top_groups else (lambda s: None)
    return {
        "slots": num_slots,
        "global_lru": round(replay(table(), test, n), 4),
        "uniform": round(replay(table(dict.fromkeys(layers, num_slots // len(layers))), test, n), 4),
        "adaptive": round(replay(table(fitted.shares.quotas, split(fitted.shares)), test, n), 4),
        "adaptive_predicted_on_train": round(fitted.shares.predicted_hit_rate, 4),
        "adaptive_fit_on_test": round(replay(table(oracle.shares.quotas, split(oracle.shares)), test, n), 4),
        "quotas": fitted.shares.quotas,
        "iterations": fitted.shares.iterations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[48, 64, 96])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--top-groups", type=int, default=0)
    args = parser.parse_args()
    trace, layers, min_slots = record(args.prompts, args.new_tokens, args.groups)
    print(json.dumps({"acquires": len(trace), "units": sum(map(len, trace))}))
    for num_slots in args.slots:
        print(json.dumps(compare(trace, layers, num_slots, min_slots, args.top_groups)))


if __name__ == "__main__":
    main()
