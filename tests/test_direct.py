"""Zero-copy decode (`load(schedule="direct")`): one-token steps read uncached units from the host
arena inside the grouped kernel, through a device-side map kept by `DirectCache`, and the cache
admits hot misses between tokens. Where a unit is read from must never change what is computed:
the decode logits and greedy tokens equal the fetch path's on every family, cache size and unit
format, and the map never points at a slot that holds another unit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS
from test_misses import PROMPT, decode_logits, load_cpu, synthetic_cost

import edgeprism
from edgeprism.cache.keys import SubExpertKey
from edgeprism.errors import ConfigError
from edgeprism.moe.kernels import swiglu_unit
from edgeprism.moe.quant import make_format
from edgeprism.runtime.direct import DirectDecode

NAMES = [v.name for v in VARIANTS]


def check_map(eng) -> None:
    """Every published map entry names the slot the table holds the unit in; nothing else is mapped."""
    d = eng.experts.direct
    eng.cache.table.check_invariants()
    mapped = (d.host_map >= 0).nonzero().tolist()
    for layer, e, g in mapped:
        key = SubExpertKey(layer, e, g)
        assert eng.cache.table.lookup(key) == int(d.host_map[layer, e, g]), key
    assert len(mapped) == len(d._published)


@pytest.fixture(scope="module")
def fetched(checkpoints):
    out = {}
    for name, path in checkpoints.items():
        eng = load_cpu(path)
        out[name] = (decode_logits(eng), eng.generate_ids(PROMPT, max_new_tokens=12))
        eng.close()
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fraction", [0.25, 0.6])
def test_direct_matches_the_fetch_path(checkpoints, fetched, name, fraction):
    ref_logits, ref_tokens = fetched[name]
    eng = load_cpu(checkpoints[name], schedule="direct", cache_fraction=fraction)
    assert isinstance(eng.decode_step, DirectDecode) and eng.experts.direct is not None
    torch.testing.assert_close(decode_logits(eng), ref_logits, rtol=1e-5, atol=1e-5)
    assert eng.generate_ids(PROMPT, max_new_tokens=12) == ref_tokens
    check_map(eng)
    s = eng.stats()
    d = eng.experts.direct
    assert s["schedule"] == "direct" and d.misses > 0 and s["zero_copy_bytes"] == d.misses * s["unit_bytes"]
    assert s["hits"] >= d.hits and s["units_admitted"] == d.admitted > 0  # misses admitted between tokens
    eng.close()


def test_direct_with_groups_and_quantized_units(checkpoints):
    """Sub-expert units (G = 2) and int8 units: the same tokens as the fetch path with the same format."""
    path = checkpoints["qwen3moe-headdim"]
    for kw in (dict(groups=2), dict(expert_dtype="int8", quant_cache=False)):
        ref = load_cpu(path, **kw)
        want = ref.generate_ids(PROMPT, max_new_tokens=16)
        ref.close()
        eng = load_cpu(path, schedule="direct", **kw)
        assert eng.generate_ids(PROMPT, max_new_tokens=16) == want, kw
        check_map(eng)
        eng.close()


def test_prefill_between_decodes_rebuilds_the_map(checkpoints, fetched):
    """Prefill moves units through the acquire path; the next direct step must not trust the old map."""
    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=0.25)
    d = eng.experts.direct
    first = eng.generate_ids(PROMPT, max_new_tokens=6)
    eng.generate_ids(list(reversed(PROMPT)) * 2, max_new_tokens=4)  # a different prompt moves units
    assert d.stale is False  # its decode steps rebuilt the map after the prefill
    check_map(eng)
    assert eng.generate_ids(PROMPT, max_new_tokens=6) == first
    check_map(eng)
    eng.close()


def test_admission_is_bounded_and_unpublishes_victims(checkpoints):
    """Once the cache is full, at most `admit_units` units are admitted per token, and an evicted
    unit leaves the map in the same step."""
    eng = load_cpu(checkpoints["mixtral-gqa"], schedule="direct", cache_fraction=0.25)
    d = eng.experts.direct
    eng.generate_ids(PROMPT, max_new_tokens=4)
    assert eng.cache.table.num_resident == eng.cache.num_slots  # prefill filled the cache
    before = d.admitted
    steps = 8
    eng.generate_ids(PROMPT[:3], max_new_tokens=steps)
    # the first step after prefill logs no routing yet; each later one admits ≤ admit_units
    assert 0 < d.admitted - before <= steps * d.admit_units
    check_map(eng)
    eng.close()


def test_direct_config_errors(checkpoints):
    with pytest.raises(ConfigError, match="pin_memory"):
        load_cpu(checkpoints["olmoe"], schedule="direct", pin_memory=False)
    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=1.0)  # everything resident
    assert eng.experts.direct is None and eng.stats()["schedule"] == "fetch"
    eng.close()


@pytest.mark.parametrize("name", ["bf16", "int8", "int4"])
def test_grouped_direct_reads_host_rows(name):
    """Assignments with slot -1 read their host row; the result is bit-identical to `grouped` with
    those units copied into the pool, and a unit of weight 0 contributes nothing."""
    D, Ig, R = 128, 128, 6
    fmt = make_format(name, D, Ig, torch.float32)
    g = torch.Generator().manual_seed(0)
    rows_data = torch.stack([fmt.pack(torch.randn(Ig, D, generator=g) * 0.05, torch.randn(Ig, D, generator=g) * 0.05,
                                      torch.randn(D, Ig, generator=g) * 0.05) for _ in range(R)])
    pool = rows_data[[2, 0, 5, 1]].clone()  # slot s holds host row [2, 0, 5, 1][s]
    x = torch.randn(2, D, generator=g)
    slots = torch.tensor([1, -1, 3, -1, 0])
    rows = torch.tensor([0, 4, 1, 3, 2])
    tokens = torch.tensor([0, 0, 1, 1, 1])
    w = torch.tensor([0.5, 0.25, 0.0, 0.75, 1.0])
    got = fmt.grouped_direct(x, fmt.parts(pool), fmt.parts(rows_data), slots, rows, tokens, w)
    full = torch.cat([pool, rows_data[[4, 3]]])  # the two host units copied into slots 4 and 5
    want = fmt.grouped(x, fmt.parts(full), torch.tensor([1, 4, 3, 5, 0]), tokens, w)
    assert torch.equal(got, want)
    ref = torch.zeros_like(x)
    for a, row in enumerate(rows.tolist()):
        w13, w2 = fmt.dequantize(fmt.parts(rows_data), torch.tensor([row]))
        ref[tokens[a]] += swiglu_unit(x[tokens[a]][None], w13[0], w2[0])[0] * w[a]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mixtral-gqa", "qwen2moe-shared-tied", "olmoe"])
def test_hybrid_reads_its_gpu_misses_in_place(checkpoints, fetched, name):
    """With zero_copy=True the misses a hybrid plan gives the GPU are read from the host
    arena in their own graph, not copied: same logits as the fetch path, and fewer bytes copied
    than with zero_copy=False."""
    ref_logits, ref_tokens = fetched[name]
    stats = {}
    for zero_copy in (True, False):
        probe = load_cpu(checkpoints[name])
        unit_bytes = probe.stats()["unit_bytes"]
        probe.close()
        eng = load_cpu(checkpoints[name], schedule="hybrid", cost=synthetic_cost(unit_bytes), zero_copy=zero_copy)
        assert (eng.decode_step.host_parts is not None) == zero_copy
        torch.testing.assert_close(decode_logits(eng), ref_logits, rtol=1e-4, atol=1e-4)
        assert eng.generate_ids(PROMPT, max_new_tokens=12) == ref_tokens
        stats[zero_copy] = eng.stats()
        eng.cache.table.check_invariants()
        eng.close()
    on, off = stats[True], stats[False]
    assert on["units_fetch"] > 0 and on["units_cpu"] > 0
    assert on["zero_copy_bytes"] == on["units_fetch"] * on["unit_bytes"] and off["zero_copy_bytes"] == 0
    assert on["bytes_h2d"] < off["bytes_h2d"]


def test_drop_misses_keeps_the_floor_and_never_drops_a_hit():
    """The in-graph quality floor: the lowest-weighted misses go first, while the dropped mass stays
    within (1 − floor) of the routed mass; cached units (slot ≥ 0) always stay; floor 1 drops nothing."""
    from types import SimpleNamespace

    from edgeprism.cache.direct import DirectCache

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        A = 1 + trial % 12
        w = torch.rand(A, generator=g) + 0.01
        slots = torch.where(torch.rand(A, generator=g) < 0.5, torch.arange(A), torch.full((A,), -1))
        floor = float(torch.rand((), generator=g)) if trial % 5 else 1.0
        d = SimpleNamespace(floor=torch.tensor(floor), layer_stats=torch.zeros(1, 3))
        kept = DirectCache.drop_misses(d, 0, slots, w)
        drop = kept == 0
        assert not (drop & (slots >= 0)).any()
        assert kept[~drop].equal(w[~drop])
        assert float(w[drop].sum()) <= (1 - floor) * float(w.sum()) + 1e-6
        # greedy: the next miss by weight would have broken the floor
        left = sorted(float(x) for x in w[(slots < 0) & ~drop])
        if left:
            assert float(w[drop].sum()) + left[0] > (1 - floor) * float(w.sum()) - 1e-6
        assert d.layer_stats[0].tolist() == pytest.approx([float(drop.sum()), float(kept.sum()), float(w.sum())])
        if floor == 1.0:
            assert not drop.any()


def test_quality_and_latency_with_direct_drop_misses_for_the_call_only(checkpoints, fetched):
    """generate(quality=) on schedule="direct": the lossy graphs drop misses at the floor (no table:
    quality is the mass floor), the stats count them, and the next exact call is the fetch path's
    again; generate(latency_ms=) moves the floor from measured step times (`qos.FloorController`)."""
    eng = load_cpu(checkpoints["mixtral-gqa"], schedule="direct", cache_fraction=0.25)
    out = eng.generate_ids(PROMPT, max_new_tokens=16, quality=0.7)
    s = eng.stats()
    assert len(out) == 16 and s["units_drop"] > 0 and s["units_dropped"] >= s["units_drop"]
    assert s["mass_kept"] >= 0.7 - 1e-6
    d = eng.experts.direct  # a dropped miss is not read: zero-copy bytes count the misses the kernels read
    assert s["zero_copy_bytes"] == (d.misses - d.dropped) * s["unit_bytes"]
    assert eng.experts.direct.lossy is False and (True, False) in eng.decode_step._steps
    assert eng.generate_ids(PROMPT, max_new_tokens=12) == fetched["mixtral-gqa"][1]
    eng.reset_stats()  # latency mode: an unreachable target lowers the floor to its minimum (0.5)
    assert len(eng.generate_ids(PROMPT, max_new_tokens=16, latency_ms=1e-3)) == 16
    s = eng.stats()
    assert s["units_drop"] > 0 and s["mass_kept"] >= 0.5 - 1e-6
    with pytest.raises(edgeprism.errors.InputError, match="at most one"):
        eng.generate_ids(PROMPT, max_new_tokens=2, latency_ms=50, quality=0.9)
    eng.close()


def test_batched_and_gated_calls_on_a_direct_engine(checkpoints):
    """Calls that leave the one-token graph path — batched decode (T > 1 per step, then T = 1 when one
    sequence is left) and the static gate (keep < 1, eager) — give the fetch engine's tokens, and the
    map is consistent afterwards."""
    path = checkpoints["qwen2moe-shared-tied"]
    prompts = [PROMPT, PROMPT[::-1], PROMPT[3:]]
    want = {}
    for sched in ("fetch", "direct"):
        eng = load_cpu(path, schedule=sched)
        want[sched] = (eng.generate_ids_batch(prompts, max_new_tokens=[6, 9, 12], max_batch=2),
                       eng.generate_ids(PROMPT, max_new_tokens=10, keep=0.6),
                       eng.generate_ids(PROMPT, max_new_tokens=10))
        if sched == "direct":
            check_map(eng)
        eng.close()
    assert want["direct"] == want["fetch"]


@pytest.mark.parametrize("lazy", [False, True])
def test_admissions_that_land_late_are_never_read_early(checkpoints, fetched, lazy):
    """Admission copies on a fake copy engine that lands them late and out of order (or only when
    waited on): a unit enters the map only once its copy has landed, so the slot a graph reads
    always holds its unit — the tokens stay the fetch path's, and nothing pending is mapped."""
    from test_prefetch import FakeCopies

    name = "qwen3moe-nonorm-sharded"
    eng = load_cpu(checkpoints[name], schedule="direct", cache_fraction=0.25)
    fake = FakeCopies(seed=3, lazy=lazy)
    eng.fetch.engine = fake
    d = eng.experts.direct
    seen_pending = 0

    def after_step(step, inner=d.after_step):
        nonlocal seen_pending
        inner(step)
        for key, slot in d._pending.items():  # in flight: not in the map, whatever the table says
            seen_pending += 1
            assert d.host_map[key.layer, key.expert, key.group] == -1 and eng.cache.table.lookup(key) == slot

    admitted, copies = set(), []

    def copy_after_compute(fills, inner=eng.fetch.copy_after_compute):
        admitted.update(key for key, _ in fills)
        copies.extend(fills)
        inner(fills)

    d.after_step = after_step
    eng.fetch.copy_after_compute = copy_after_compute
    assert eng.generate_ids(PROMPT, max_new_tokens=12) == fetched[name][1]
    assert seen_pending > 0 and d.admitted == len(copies) > 0
    if lazy:  # nothing lands unless waited on, and nothing waits on admissions: none was ever mapped
        assert not admitted & set(d._published)
    else:
        assert admitted & set(d._published)  # landed ones were published
    check_map(eng)
    eng.close()


def test_flags_must_be_booleans(checkpoints):
    for flag in ("zero_copy", "prefetch", "pin_memory", "quant_cache"):
        with pytest.raises(ConfigError, match=flag):
            load_cpu(checkpoints["olmoe"], **{flag: "yes"})


# ----- prefetch inside the graph (cache/direct.py: enable_prefetch) -----


@pytest.mark.parametrize("name", NAMES)
def test_direct_prefetch_changes_nothing_computed(checkpoints, fetched, name):
    """Staged units are exact copies of their host rows: logits and tokens equal the fetch path's,
    and the staging rows are never handed to the cache."""
    ref_logits, ref_tokens = fetched[name]
    eng = load_cpu(checkpoints[name], schedule="direct", cache_fraction=0.7, prefetch=True)
    d = eng.experts.direct
    torch.testing.assert_close(decode_logits(eng), ref_logits, rtol=1e-5, atol=1e-5)
    eng.reset_stats()
    assert eng.generate_ids(PROMPT, max_new_tokens=12) == ref_tokens
    check_map(eng)
    if len(eng.spec.moe_layers) < 2:  # nothing ahead to predict: no staging rows taken from the cache
        assert not d.prefetching and eng.cache.extra_rows == 0 and not eng.stats()["prefetch"]
        eng.close()
        return
    assert d.prefetching and eng.cache.extra_rows == 2 * min(2, eng.spec.top_k)  # 2 experts predicted, G = 1
    assert d.budget == 1  # one expert's units staged per layer
    assert all(slot < eng.cache.num_slots for slot in d.host_map[d.host_map >= 0].tolist())
    s = eng.stats()
    assert s["prefetch"] and s["prefetch_recall"] is not None and 0 <= s["prefetch_recall"] <= 1
    assert s["prefetch_units"] > 0  # some predicted units were missing and got staged
    assert s["prefetch_bytes_used"] + s["prefetch_bytes_wasted"] == s["prefetch_units"] * s["unit_bytes"]
    assert s["prefetch_bytes_used"] == d.staged_used * s["unit_bytes"]
    # staged units are misses to the cache, but the kernels did not read them from host RAM
    assert s["zero_copy_bytes"] == (d.misses - d.staged_used) * s["unit_bytes"]
    eng.close()


def test_direct_prefetch_with_groups_and_int8(checkpoints):
    """Sub-expert units (G = 2) and int8 units keep the fetch path's tokens with prefetch on; staged
    units serve some routed units (counted as used)."""
    path = checkpoints["qwen3moe-headdim"]
    for kw in (dict(groups=2), dict(expert_dtype="int8", quant_cache=False)):
        ref = load_cpu(path, cache_fraction=0.5, **kw)
        want = ref.generate_ids(PROMPT, max_new_tokens=16)
        ref.close()
        eng = load_cpu(path, schedule="direct", prefetch=True, cache_fraction=0.5, **kw)
        assert eng.experts.direct.prefetching, kw
        assert eng.generate_ids(PROMPT, max_new_tokens=16) == want, kw
        assert eng.experts.direct.staged_used > 0, kw
        check_map(eng)
        eng.close()


def test_direct_prefetch_lookup_reads_staged_rows(checkpoints):
    """The lookup gives an unmapped unit its staging row only where the staged code matches; a
    mapped unit keeps its cache slot even when also staged."""
    eng = load_cpu(checkpoints["qwen3moe-headdim"], schedule="direct", prefetch=True, predict_experts=4,
                   cache_fraction=0.7)
    d = eng.experts.direct
    layer = eng.spec.moe_layers[1]
    assert eng.spec.top_k == 2 and d.codes.shape[1] == 4
    base = d._base[layer]
    d.before_step()
    d.dev_map[layer].fill_(-1)
    d.dev_map[layer, 5, 0] = 3
    d.codes[layer].fill_(-1)
    d.codes[layer, 2] = 7  # expert 7 (G = 1) staged at index 2
    d.codes[layer, 0] = 5  # expert 5 staged too, but it is mapped
    slots, rows = d.lookup(layer, torch.tensor([[7, 5]]))
    assert slots.tolist() == [base + 2, 3]
    assert rows.tolist() == d.rows[torch.tensor([7, 5])].reshape(-1).tolist()
    assert d.hit_log[layer].tolist() == [False, True]  # a staged unit stays a miss to the cache
    slots, _ = d.lookup(layer, torch.tensor([[6, 7]]))
    assert slots.tolist() == [-1, base + 2]
    assert d.route_log[layer].tolist() == [6, 7]
    eng.close()


def test_direct_prefetch_folds_the_norms_into_the_predictor(checkpoints):
    """The in-graph predictor ranks the next layer's experts as its own router would on the state
    normed by its own norm: x · (w_next / w_cur) through the next gate."""
    eng = load_cpu(checkpoints["qwen3moe-headdim"], schedule="direct", prefetch=True, cache_fraction=0.5)
    d = eng.experts.direct
    moe = eng.spec.moe_layers
    cur, nxt = eng.model.layers[moe[0]], eng.model.layers[moe[1]]
    with torch.no_grad():
        cur.ffn_norm.weight.uniform_(0.5, 1.5)
        nxt.ffn_norm.weight.uniform_(0.5, 1.5)
    eng._direct_prefetch()
    h = torch.randn(1, eng.spec.dim)
    with torch.no_grad():
        want = nxt.ffn.gate(nxt.ffn_norm(h))
        got = cur.ffn_norm(h) @ d._predict_w[moe[0]]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    eng.close()


def test_direct_prefetch_staging_rows_come_out_of_the_budget(checkpoints):
    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=0.5)
    plain = eng.cache.num_slots
    eng.close()
    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=0.5, prefetch=True)
    spec = eng.spec
    predictors = (len(spec.moe_layers) - 1) * spec.dim * spec.num_experts * 4  # fp32 [D, E] per layer pair
    reserved = -(-predictors // eng.plan.unit_bytes)  # slots given up for them
    assert eng.cache.extra_rows > 0 and eng.cache.num_slots + eng.cache.extra_rows + reserved == plain
    assert eng.cache.pool.shape[0] == plain - reserved
    assert sum(w.numel() * w.element_size() for w in eng.experts.direct._predict_w.values()) == predictors
    eng.close()
    # units too large to gather: no direct path, so nothing is taken from the cache for prefetch
    eng = load_cpu(checkpoints["olmoe"], schedule="direct", cache_fraction=0.5, prefetch=True, gather_limit=1)
    assert eng.experts.direct is None and eng.cache.extra_rows == 0 and eng.cache.num_slots == plain
    eng.close()


def test_direct_prefetch_staging_budget_and_bad_knobs(checkpoints, monkeypatch):
    """EDGEPRISM_STAGE_BUDGET caps the units staged per layer (the best-ranked the cache lacks);
    malformed knobs raise ConfigError before anything is allocated."""
    path = checkpoints["qwen3moe-headdim"]
    ref = load_cpu(path, cache_fraction=0.5)
    want = ref.generate_ids(PROMPT, max_new_tokens=12)
    ref.close()
    for budget, after in (("0", "experts"), ("2", "lookup")):
        monkeypatch.setenv("EDGEPRISM_STAGE_BUDGET", budget)
        monkeypatch.setenv("EDGEPRISM_STAGE_AFTER", after)
        eng = load_cpu(path, schedule="direct", cache_fraction=0.5, prefetch=True, predict_experts=2)
        d = eng.experts.direct
        assert d.budget == int(budget) and d.after_experts == (after == "experts")
        assert eng.generate_ids(PROMPT, max_new_tokens=12) == want
        staged = (d.codes >= 0).sum(1)
        assert int(staged.max()) <= int(budget)
        assert (d.staged_used > 0) == (budget != "0")
        eng.close()
    for name, value in (("EDGEPRISM_STAGE_BUDGET", "two"), ("EDGEPRISM_STAGE_AFTER", "later")):
        monkeypatch.setenv("EDGEPRISM_STAGE_BUDGET", "1")
        monkeypatch.setenv("EDGEPRISM_STAGE_AFTER", "experts")
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=name):
            load_cpu(path, schedule="direct", cache_fraction=0.5, prefetch=True)


def test_direct_prefetch_two_layers_ahead(checkpoints, fetched, monkeypatch):
    """lookahead=2: each layer stages the MoE layer two ahead (three sets of staging rows, one event
    per target): the fetch path's tokens, and staged units read."""
    monkeypatch.setenv("EDGEPRISM_STAGE_BUDGET", "64")  # every predicted unit the cache lacks
    name = "olmoe"
    eng = load_cpu(checkpoints[name], schedule="direct", cache_fraction=0.75, prefetch=True, lookahead=2,
                   predict_experts=2)
    d, moe = eng.experts.direct, eng.spec.moe_layers
    assert len(moe) >= 3 and d.prefetching and d.lookahead == 2
    assert eng.cache.extra_rows == 3 * 2 * eng.config.groups
    assert d._next == {moe[i]: moe[i + 2] for i in range(len(moe) - 2)}
    assert len({d._base[t] for t in d._next.values()}) == min(3, len(d._next))  # sets by MoE-layer index
    assert eng.generate_ids(PROMPT, max_new_tokens=12) == fetched[name][1]
    assert d.staged_used > 0
    eng.close()
