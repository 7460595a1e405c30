"""Offloading is invisible in the outputs: any cache size, policy or sub-expert split gives the
resident run's logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

import edgeprism
from conftest import VARIANTS
from edgeprism.cache.keys import SubExpertKey

NAMES = [v.name for v in VARIANTS]
IDS = [5, 17, 99, 3, 42, 8, 77, 120, 61, 2, 33, 14]


def load_cpu(path, **kw):
    return edgeprism.load(path, device="cpu", dtype="fp32", prefill_chunk=4, **kw)


@pytest.fixture(scope="module")
def resident(checkpoints):
    out = {}
    for name, path in checkpoints.items():
        eng = load_cpu(path)
        assert eng.experts.slot_map is not None  # everything fits: static cache
        out[name] = (eng.logits(IDS), eng.generate_ids(IDS, max_new_tokens=32))
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("policy", ["lru", "lfu", "activation"])
@pytest.mark.parametrize("fraction", [0.05, 0.25, 1.0])
def test_cache_size_and_policy_do_not_change_outputs(checkpoints, resident, name, policy, fraction):
    eng = load_cpu(checkpoints[name], policy=policy, cache_fraction=fraction)
    logits, tokens = resident[name]
    assert torch.equal(eng.logits(IDS), logits)
    assert eng.generate_ids(IDS, max_new_tokens=32) == tokens
    s = eng.stats()
    if fraction < 1.0:
        assert s["misses"] > 0 and s["bytes_h2d"] > 0
        assert s["evictions"] > 0
        assert s["cache_slots"] < s["total_units"]
    eng.cache.table.check_invariants()


@pytest.mark.parametrize("name", ["mixtral-gqa", "qwen2moe-shared-tied", "olmoe"])
def test_unit_by_unit_path_matches(checkpoints, resident, name):
    # gather_limit=0 forces the one-unit-at-a-time path used for prefill and very large experts
    eng = load_cpu(checkpoints[name], cache_fraction=0.05, gather_limit=0)
    logits, tokens = resident[name]
    torch.testing.assert_close(eng.logits(IDS), logits, atol=1e-5, rtol=1e-5)
    assert eng.generate_ids(IDS, max_new_tokens=32) == tokens


@pytest.mark.parametrize("name", ["qwen3moe-headdim", "mixtral-gqa", "olmoe-clip-norm"])
@pytest.mark.parametrize("groups", [2, 4])
def test_sub_experts_recombine_to_the_expert(checkpoints, resident, name, groups):
    eng = load_cpu(checkpoints[name], groups=groups, cache_fraction=0.25)
    logits, tokens = resident[name]
    torch.testing.assert_close(eng.logits(IDS), logits, atol=1e-5, rtol=1e-5)
    assert eng.generate_ids(IDS, max_new_tokens=32) == tokens


def test_groups_must_divide_intermediate(checkpoints):
    with pytest.raises(edgeprism.errors.ConfigError, match="does not divide"):
        load_cpu(checkpoints["qwen3moe-headdim"], groups=5)


def test_stats_and_reset(checkpoints):
    eng = load_cpu(checkpoints["olmoe"], cache_fraction=0.25)
    eng.generate_ids(IDS, max_new_tokens=8)
    s = eng.stats()
    for key in ("hits", "misses", "evictions", "bytes_h2d", "tokens", "cache_slots", "cache_bytes", "resident_bytes"):
        assert key in s
    assert s["tokens"] == 8 and s["prompt_tokens"] == len(IDS)
    assert s["bytes_h2d"] >= s["misses"] * s["unit_bytes"] / 4  # coalesced copies still move every missed byte
    assert s["cache_bytes"] == s["cache_slots"] * s["unit_bytes"]
    eng.reset_stats()
    s = eng.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["bytes_h2d"], s["tokens"]) == (0, 0, 0, 0, 0)


def test_copies_are_coalesced(checkpoints):
    # a cold cache with free slots: the G=4 units of each routed expert land in adjacent slots and
    # move in one copy. One token, 3 MoE layers, top-2 -> 3 * 2 * 4 = 24 missed units in at most 6
    # copies (fewer when two routed experts are neighbours), at least one per layer.
    # (prefetch off: with it, the predicted units of layers 1 and 2 arrive as prefetches, not misses)
    eng = load_cpu(checkpoints["qwen3moe-headdim"], groups=4, cache_fraction=0.5, prefetch=False)
    eng.generate_ids(IDS[:1], max_new_tokens=1)
    s = eng.stats()
    assert s["misses"] == 24 and s["evictions"] == 0
    assert 3 <= s["copies"] <= 6
    assert s["bytes_h2d"] == 24 * s["unit_bytes"]


def test_host_store_rows_hold_the_expert_slices(checkpoints):
    from safetensors import safe_open

    from edgeprism.moe.kernels import pack_unit

    path = checkpoints["qwen3moe-headdim"]
    eng = load_cpu(path, groups=2)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        base = "model.layers.1.mlp.experts.5."
        w1, w3, w2 = (f.get_tensor(base + n + ".weight") for n in ("gate_proj", "up_proj", "down_proj"))
    gi = w1.shape[0] // 2
    for g in range(2):
        cols = slice(g * gi, (g + 1) * gi)
        assert torch.equal(eng.store.unit(SubExpertKey(1, 5, g)), pack_unit(w1[cols], w3[cols], w2[:, cols]))
