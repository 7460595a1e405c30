"""Batched decode: each sequence gets the tokens it gets alone, sequences join and leave, the
latency controller moves the batch limit, and batching shares expert units (fewer bytes per token)."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, Variant, build_checkpoint

import edgeprism
from edgeprism import errors
from edgeprism.runtime.batched import BatchedGeneration, LatencyController, p95
from edgeprism.runtime.memory import GiB, kv_cache_bytes
from edgeprism.sampling import Sampling

PROMPTS = [[5, 17, 99], [3], [42, 8, 77, 120, 61, 2, 33], [14, 9], [7, 7, 100, 1, 60]]
MAX_NEW = [6, 3, 9, 5, 1]
WINDOW = Variant("mixtral-window", "mixtral", {"hidden_size": 32, "intermediate_size": 24, "num_attention_heads": 4,
                                               "num_key_value_heads": 2, "num_local_experts": 6,
                                               "num_experts_per_tok": 2, "sliding_window": 5})
USED = {"qwen3moe-headdim", "olmoe", "mixtral-gqa", "qwen2moe-shared-tied", "mixtral-window"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Only the variants used here (conftest's fixture builds all eight)."""
    root = tmp_path_factory.mktemp("batched")
    return {v.name: build_checkpoint(v, root / v.name) for v in [*VARIANTS, WINDOW] if v.name in USED}


def load_cpu(path, **kw):
    return edgeprism.load(path, device="cpu", dtype="fp32", prefill_chunk=4, **kw)


def alone(eng, prompts=PROMPTS, max_new=MAX_NEW, **kw):
    return [eng.generate_ids(p, max_new_tokens=n, **kw) for p, n in zip(prompts, max_new)]


@pytest.mark.parametrize("name, fraction", [("qwen3moe-headdim", None), ("qwen3moe-headdim", 0.05), ("olmoe", 0.05),
                                            ("mixtral-gqa", 0.05), ("qwen2moe-shared-tied", 0.05)])
def test_greedy_batch_equals_each_sequence_alone(checkpoints, name, fraction):
    eng = load_cpu(checkpoints[name], cache_fraction=fraction)
    assert (eng.experts.slot_map is None) == (fraction is not None)  # 0.05: a dynamic cache of the minimum size
    expected = alone(eng)
    assert eng.generate_ids_batch(PROMPTS, max_new_tokens=MAX_NEW, max_batch=3) == expected
    assert [len(o) for o in expected] == MAX_NEW  # these checkpoints have no EOS: every sequence runs to its limit


@pytest.mark.parametrize("name", ["olmoe", "mixtral-gqa"])
def test_batch_steps_take_the_grouped_path(checkpoints, name, monkeypatch):
    """With room for the batch's units, a step runs each layer in one grouped call (not unit by unit),
    and still equals each sequence decoded alone."""
    from edgeprism.moe.offload import OffloadedExperts

    eng = load_cpu(checkpoints[name], cache_fraction=0.6)
    expected = alone(eng)
    batched_calls = []
    original = OffloadedExperts._gathered

    def spy(self, layer, x, ids, *args):
        batched_calls.append(ids.shape[0])
        return original(self, layer, x, ids, *args)

    monkeypatch.setattr(OffloadedExperts, "_gathered", spy)
    assert eng.generate_ids_batch(PROMPTS, max_new_tokens=MAX_NEW, max_batch=3) == expected
    assert max(batched_calls) == 3  # the steps of three sequences at once
    assert eng.experts.gather_max == 1  # prefill and single-sequence decode are unchanged afterwards
    eng.cache.table.check_invariants()


def test_sliding_window_attention_per_sequence(checkpoints):
    eng = load_cpu(checkpoints["mixtral-window"], cache_fraction=0.2)
    assert eng.spec.sliding_window == 5
    prompts, max_new = [[1, 2, 3, 4, 5, 6, 7, 8], [9], [10, 11, 12]], [10, 12, 4]
    assert eng.generate_ids_batch(prompts, max_new_tokens=max_new) == alone(eng, prompts, max_new)


def test_seeded_sampling_matches_alone(checkpoints):
    eng = load_cpu(checkpoints["olmoe"], cache_fraction=0.05)
    kw = {"temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 3}
    assert eng.generate_ids_batch(PROMPTS, max_new_tokens=MAX_NEW, **kw) == alone(eng, **kw)


def test_queued_sequences_join_as_others_finish(checkpoints):
    eng = load_cpu(checkpoints["qwen3moe-headdim"], cache_fraction=0.05)
    max_new = [3, 5, 2, 4, 1]
    run = BatchedGeneration(eng, eng._counts, max_new, Sampling(temperature=0), max_batch=2)
    result = run.run([[5], [6, 7], [8], [9, 10, 11], [12]])
    # 0,1 decode; 0 ends (3 tokens) -> 2 joins; 2 ends -> 3 joins; 1 ends, 4 joins and ends at
    # its first (prefill) token; 3 decodes alone to its 4th token
    assert result.step_batch == [2, 2, 2, 2, 1, 1]
    assert [len(o) for o in result.outputs] == max_new
    assert result.decode_tokens == sum(max_new) - len(max_new)  # each first token comes from prefill


def test_engine_counts_batched_tokens(checkpoints):
    eng = load_cpu(checkpoints["olmoe"], cache_fraction=0.05)
    eng.reset_stats()
    eng.generate_ids_batch(PROMPTS, max_new_tokens=MAX_NEW)
    s = eng.stats()
    assert s["tokens"] == sum(MAX_NEW)
    assert s["prompt_tokens"] == sum(map(len, PROMPTS))
    assert s["misses"] > 0 and s["copies"] > 0


def test_batching_shares_expert_units(checkpoints):
    """Minimum cache (no reuse across steps): a unit routed by several sequences of a step is
    copied once for all of them, so the bytes per token fall."""
    prompts, max_new = [[5], [3], [42], [14]], [16] * 4
    eng = load_cpu(checkpoints["mixtral-gqa"], cache_fraction=0.05)
    eng.reset_stats()
    alone(eng, prompts, max_new, temperature=1.0, seed=1)
    one_by_one = eng.stats()
    eng.reset_stats()
    eng.generate_ids_batch(prompts, max_new_tokens=max_new, temperature=1.0, seed=1)
    batched = eng.stats()
    assert batched["tokens"] == one_by_one["tokens"] == 64
    assert batched["bytes_h2d"] < 0.85 * one_by_one["bytes_h2d"], (batched, one_by_one)
    assert batched["copies"] < one_by_one["copies"]


# ---- the latency controller --------------------------------------------------------------

def feed(ctl, ms, batch, n):
    return [ctl.observe(ms / 1e3, batch) for _ in range(n)]


def test_p95_is_nearest_rank():
    assert p95([3, 1, 2]) == 3
    assert p95(list(range(1, 101))) == 95


def test_controller_shrinks_in_proportion_and_never_below_one():
    ctl = LatencyController(20, max_batch=8, window=4)
    assert feed(ctl, 30, 8, 3) == [8, 8, 8]  # no decision before a full window
    assert ctl.observe(0.030, 8) == 5  # floor(8 * 20 / 30)
    assert feed(ctl, 21, 5, 4)[-1] == 4  # just over: at least one less
    feed(ctl, 500, 4, 4)
    assert ctl.limit == 1
    feed(ctl, 500, 1, 8)
    assert ctl.limit == 1


def test_controller_grows_only_when_the_batch_was_full():
    ctl = LatencyController(20, max_batch=3, window=4)
    feed(ctl, 100, 3, 4)
    assert ctl.limit == 1
    assert feed(ctl, 5, 1, 4)[-1] == 2
    assert feed(ctl, 5, 1, 8)[-1] == 2  # one sequence left at limit 2: its speed says nothing about 2
    assert feed(ctl, 5, 2, 4)[-1] == 3
    assert feed(ctl, 5, 3, 8)[-1] == 3  # capped at max_batch
    assert feed(ctl, 18, 3, 8)[-1] == 3  # between 0.8 x target and the target: hold


def test_controller_ignores_steps_over_the_limit():
    ctl = LatencyController(20, max_batch=4, window=2)
    feed(ctl, 100, 4, 2)
    assert ctl.limit == 1
    assert feed(ctl, 100, 4, 10)[-1] == 1  # sequences admitted before the shrink: not judged
    assert feed(ctl, 5, 1, 2)[-1] == 2


class FakeClock:
    """Steps take 50 ms for the first `slow` steps, then 5 ms (the runner reads it twice per step)."""

    def __init__(self, slow: int) -> None:
        self.now, self.calls, self.slow = 0.0, 0, slow

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:
            self.now += 0.050 if self.calls // 2 <= self.slow else 0.005
        return self.now


def test_latency_target_moves_the_batch_limit(checkpoints):
    eng = load_cpu(checkpoints["qwen3moe-headdim"], cache_fraction=0.05)
    prompts, max_new = [[i + 1] for i in range(8)], [12] * 8
    run = BatchedGeneration(eng, eng._counts, max_new, Sampling(temperature=0), max_batch=4, latency_ms=20,
                            clock=FakeClock(slow=8))
    result = run.run(prompts)
    assert result.limits[:7] == [4] * 7 and result.limits[7] == 1  # 8 slow steps: floor(4 * 20 / 50) = 1
    assert max(result.limits[8:]) > 1  # fast steps at a full batch of 1: it grows again
    assert min(result.limits) >= 1
    assert result.outputs == eng.generate_ids_batch(prompts, max_new_tokens=max_new)  # admission order only


def test_latency_ms_runs_through_the_engine(checkpoints):
    eng = load_cpu(checkpoints["olmoe"])
    out = eng.generate_ids_batch(PROMPTS, max_new_tokens=MAX_NEW, latency_ms=1e6, max_batch=2)
    assert out == alone(eng)


# ---- budget and inputs -------------------------------------------------------------------

def test_kv_caches_that_do_not_fit_are_refused(checkpoints):
    path = checkpoints["qwen3moe-headdim"]
    probe = load_cpu(path, vram_gb=1.0, cache_fraction=0.05)
    plan, prompts = probe.plan, [[1, 2, 3, 4, 5]] * 3
    seq = kv_cache_bytes(probe.spec, 5 + 6 - 1, 4)  # fp32 caches of prompt + max_new - 1 positions
    used = plan.resident + plan.kv_cache + plan.workspace + plan.cache
    eng = load_cpu(path, vram_gb=(used + 1.5 * seq) / GiB, cache_fraction=0.05)
    with pytest.raises(errors.BudgetError, match="1 of them fit at once.*max_batch=1"):
        eng.generate_ids_batch(prompts, max_new_tokens=6, max_batch=3)
    assert eng.generate_ids_batch(prompts, max_new_tokens=6, max_batch=1) == alone(eng, prompts, [6] * 3)


@pytest.mark.parametrize("args, match", [
    (([],), "non-empty list"),
    (([1, 2],), "list of ints"),
    (([[1], []],), "empty"),
    (([[1, 10**6]],), "outside the vocabulary"),
    (([[1] * 300],), "context window"),
    (([[1]], 0), "max_new_tokens"),
    (([[1], [2]], [3]), "one\\s+positive integer per prompt"),
    (([[1]], [True]), "max_new_tokens"),
])
def test_bad_ids_inputs_raise(checkpoints, args, match):
    eng = load_cpu(checkpoints["olmoe"], max_context=256)
    with pytest.raises(errors.InputError, match=match):
        eng.generate_ids_batch(*args)


@pytest.mark.parametrize("kw, match", [
    ({"max_batch": 0}, "max_batch"),
    ({"max_batch": 2.0}, "max_batch"),
    ({"latency_ms": -1}, "latency_ms"),
    ({"latency_ms": float("nan")}, "latency_ms"),
    ({"latency_ms": True}, "latency_ms"),
    ({"temperature": -1.0}, "temperature"),
])
def test_bad_options_raise(checkpoints, kw, match):
    eng = load_cpu(checkpoints["olmoe"])
    with pytest.raises(errors.InputError, match=match):
        eng.generate_ids_batch([[1]], **kw)


def test_closed_engine_refuses(checkpoints):
    eng = load_cpu(checkpoints["olmoe"])
    eng.close()
    with pytest.raises(errors.EngineClosedError):
        eng.generate_ids_batch([[1]])


# ---- text level (the embedded default model has a tokenizer and an EOS token) -------------

@pytest.fixture(scope="module")
def text_engine():
    return edgeprism.load(device="cpu", max_context=256, cache_fraction=0.3)


def test_text_batch_equals_generate(text_engine):
    prompts, max_new = ["The meaning of the word", "Python is"], [12, 6]
    expected = [text_engine.generate(p, max_new_tokens=n, temperature=0) for p, n in zip(prompts, max_new)]
    assert text_engine.generate_batch(prompts, max_new_tokens=max_new, temperature=0) == expected
    word = expected[0].split()[1]
    cut = text_engine.generate_batch(prompts, max_new_tokens=max_new, temperature=0, stop=word)
    assert cut == [text_engine.generate(p, max_new_tokens=n, temperature=0, stop=word)
                   for p, n in zip(prompts, max_new)]
    assert word not in cut[0] and expected[0].startswith(cut[0])


def test_bad_text_inputs_raise(text_engine):
    with pytest.raises(errors.InputError, match="empty"):
        text_engine.generate_batch(["fine", ""])
    with pytest.raises(errors.InputError, match="string"):
        text_engine.generate_batch(["fine", 3])
    with pytest.raises(errors.InputError, match="stop"):
        text_engine.generate_batch(["fine"], stop=[""])
    with pytest.raises(errors.InputError, match="non-empty list"):
        text_engine.generate_batch("not a list")


def test_forward_batch_keeps_the_model_caches(checkpoints):
    """Batched decode writes only its own caches: the model's batch-1 caches are untouched."""
    eng = load_cpu(checkpoints["olmoe"])
    before = [block.attn.cache.k.clone() for block in eng.model.layers]
    own = [block.attn.cache for block in eng.model.layers]
    eng.generate_ids_batch(PROMPTS, max_new_tokens=MAX_NEW)
    assert [block.attn.cache for block in eng.model.layers] == own
    assert all(torch.equal(b, block.attn.cache.k) for b, block in zip(before, eng.model.layers))
