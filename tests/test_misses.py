"""The decode-time miss scheduler (`load(schedule=...)`): the CPU path and the planner change where a
unit is computed, not what: every mode gives the fetch path's logits within fp32 tolerance, on every
family, with a cache far smaller than the experts. Dropping (a quality floor) is the one exception,
and it keeps the routed mass it promises.

The cost models here are synthetic (the CI machine's would make every run differ): one that makes
the CPU path cheap, so the planner sends misses both ways.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS

import edgeprism
from edgeprism.cache.keys import SubExpertKey
from edgeprism.errors import ConfigError
from edgeprism.schedule.cost import CostModel

NAMES = [v.name for v in VARIANTS]
PROMPT = [5, 17, 99, 3, 42, 8, 77, 120, 61, 2, 33, 14]
FED = [7, 64, 21, 90, 11, 3, 58, 36, 101, 12]  # tokens fed one by one after the prompt


def synthetic_cost(unit_bytes: int, cpu_gbps: float = 2.0, pcie_gbps: float = 1.0) -> CostModel:
    return CostModel(unit_bytes=unit_bytes, h2d_latency_s=1e-5, h2d_sizes=(4096, 1 << 20),
                     h2d_bytes_per_s=(pcie_gbps * 1e9, pcie_gbps * 1e9), cpu_call_s=1e-5,
                     cpu_bytes_per_s=cpu_gbps * 1e9, gpu_call_s=1e-5, gpu_unit_s=1e-6)


def load_cpu(path, **kw):
    kw.setdefault("cache_fraction", 0.25)
    return edgeprism.load(path, device="cpu", dtype="fp32", prefill_chunk=4, **kw)


def decode_logits(eng) -> torch.Tensor:
    """Logits [len(FED), V] of the decode step (the scheduled path) after a prefilled prompt."""
    with eng._lock, torch.inference_mode():
        eng._run(PROMPT, 0, last_only=True)
        out = [eng._run([t], len(PROMPT) + i, last_only=True).float().clone() for i, t in enumerate(FED)]
    return torch.stack(out)


@pytest.fixture(scope="module")
def fetched(checkpoints):
    """The fetch path (no scheduler): decode logits, greedy tokens and the unit size per variant."""
    out = {}
    for name, path in checkpoints.items():
        eng = load_cpu(path)
        out[name] = (decode_logits(eng), eng.generate_ids(PROMPT, max_new_tokens=12), eng.stats()["unit_bytes"])
        eng.close()
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["cpu", "hybrid"])
def test_modes_match_the_fetch_path(checkpoints, fetched, name, mode):
    ref_logits, ref_tokens, unit_bytes = fetched[name]
    eng = load_cpu(checkpoints[name], schedule=mode, cost=synthetic_cost(unit_bytes))
    logits = decode_logits(eng)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert eng.generate_ids(PROMPT, max_new_tokens=12) == ref_tokens
    s = eng.stats()
    assert s["schedule"] == mode and s["units_drop"] == 0 and s["mass_kept"] == pytest.approx(1.0)
    assert s["units_cpu"] > 0 and s["cpu_calls"] > 0 and s["cpu_bytes"] == s["units_cpu"] * unit_bytes
    assert s["misses"] >= s["units_cpu"] and s["hit_rate"] < 1  # CPU units count as misses
    if mode == "cpu":
        assert s["units_fetch"] == 0  # misses never cross to the device on demand
    else:
        assert s["units_fetch"] + s["units_admitted"] > 0  # some misses crossed to the device
    eng.close()


def test_hybrid_follows_the_cost_model(checkpoints, fetched):
    """A CPU 1000x slower than the copy: the planner fetches everything, as the fetch path does."""
    unit_bytes = fetched["olmoe"][2]
    eng = load_cpu(checkpoints["olmoe"], schedule="hybrid", cost=synthetic_cost(unit_bytes, cpu_gbps=0.001))
    torch.testing.assert_close(decode_logits(eng), fetched["olmoe"][0], rtol=1e-4, atol=1e-4)
    s = eng.stats()
    assert s["units_cpu"] == 0 and s["units_fetch"] > 0 and s["cpu_gbps"] is None
    eng.close()


def test_quality_floor_drops_misses_and_keeps_the_mass(checkpoints, fetched):
    unit_bytes = fetched["mixtral-gqa"][2] // 4  # dense units: a quarter of the expert each
    eng = load_cpu(checkpoints["mixtral-gqa"], schedule="hybrid", cost=synthetic_cost(unit_bytes), groups=4)
    eng.sched.keep = 0.8
    logits = decode_logits(eng)
    s = eng.stats()
    assert s["units_drop"] > 0 and s["units_dropped"] == s["units_drop"]  # counted as dropped (keep = 1)
    assert s["mass_kept"] >= 0.8 - 1e-9
    assert torch.isfinite(logits).all()
    eng.close()


def test_schedule_is_checked(checkpoints):
    with pytest.raises(ConfigError, match="schedule"):
        load_cpu(checkpoints["olmoe"], schedule="gpu")
    with pytest.raises(ConfigError, match="cpu_threads"):
        load_cpu(checkpoints["olmoe"], schedule="cpu", cpu_threads=0)
    with pytest.raises(ConfigError, match="cost model"):
        load_cpu(checkpoints["olmoe"], schedule="hybrid", cost=synthetic_cost(12))


def test_resident_experts_need_no_scheduler(checkpoints):
    eng = load_cpu(checkpoints["olmoe"], schedule="hybrid", cache_fraction=1.0, cost=synthetic_cost(1))
    assert eng.sched is None and eng.stats()["schedule"] == "fetch"
    eng.close()


def test_adaptive_cache_shares_change_residency_not_outputs(checkpoints, fetched, monkeypatch):
    import edgeprism.api as api

    monkeypatch.setattr(api, "ADAPT_EVERY", 4)
    eng = load_cpu(checkpoints["olmoe"], adaptive_cache=True)
    assert eng.generate_ids(PROMPT, max_new_tokens=12) == fetched["olmoe"][1]
    summary = eng.stats()["adaptive_cache"]
    assert summary["quotas"] is not None
    assert sum(summary["quotas"].values()) <= eng.cache.num_slots
    assert min(summary["quotas"].values()) >= 1
    eng.cache.table.check_invariants()
    eng.close()
    assert load_cpu(checkpoints["olmoe"], adaptive_cache=True, cache_fraction=1.0).adaptive is None  # all resident


def test_hot_path_decides_as_the_planner():
    """`plain_plan` (no `Plan` built, and what `plan` itself uses here) picks what the general candidate
    search (`fetch_cases` + `nofetch_cases` + `_choose`) picks, with its timing, on random layers;
    and `plan`'s actions follow from it."""
    import random

    from edgeprism.cache.keys import SubExpertKey
    from edgeprism.schedule.scheduler import (
        Action,
        Residency,
        RoutedUnit,
        _choose,
        _drop_order,
        _Layer,
        plain_plan,
        plan,
    )

    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(1, 12)
        cost = CostModel(unit_bytes=rng.choice([1 << 16, 1 << 20, 9 << 20]), h2d_latency_s=rng.uniform(0, 3e-5),
                         h2d_sizes=(4096, 16 << 20), h2d_bytes_per_s=(rng.uniform(5e9, 30e9), rng.uniform(30e9, 60e9)),
                         cpu_call_s=rng.uniform(0, 2e-4), cpu_bytes_per_s=rng.uniform(5e9, 120e9),
                         gpu_call_s=1e-5, gpu_unit_s=1e-6)
        units = [RoutedUnit(SubExpertKey(1, e, 0), rng.random(), rng.choice([Residency.MISSING, Residency.RESIDENT]))
                 for e in rng.sample(range(64), n)]
        missing = sorted(u.key for u in units if u.residency is Residency.MISSING)
        if not missing:
            continue
        free = rng.choice([0.0, rng.uniform(0, 1e-3)])
        want = plan(units, cost, copy_free_s=free)
        fetched, copy_s, cpu_s, latency = plain_plan(len(missing), free, cost.copy_unit_s, cost.cpu_call_s,
                                                     cost.cpu_unit_s, cost.gpu_seconds(n))
        total = sum(u.score for u in units)
        ctx = _Layer(cost.copy_unit_s, cost.cpu_call_s, cost.cpu_unit_s, free, total, False, n, total, True,
                     cost.gpu_seconds(n), None)
        pool = sorted((u for u in units if u.residency is Residency.MISSING), key=_drop_order)
        general, _ = _choose([*ctx.fetch_cases(pool, []), *ctx.nofetch_cases(pool, [])], None)
        assert fetched == general.fetched and general.drops == 0
        assert (latency, copy_s, cpu_s) == pytest.approx((general.latency, general.copy_s, general.cpu_s))
        got = {k: Action.FETCH if fetched > 0 and i < fetched else Action.CPU for i, k in enumerate(missing)}
        assert {k: a for k, a in want.actions if a is not Action.HIT} == got
        assert latency == pytest.approx(want.latency_s) and cpu_s == pytest.approx(want.cpu_s)
        assert copy_s == pytest.approx(want.copy_s)


def test_hybrid_admits_cpu_units_in_idle_copy_time(checkpoints, fetched):
    """A CPU 100x faster than the copy: every miss runs on the CPU, and the copy engine's idle time
    under the CPU call brings the best of them into the cache for later tokens; `cpu` mode never does."""
    unit_bytes = fetched["olmoe"][2]
    cost = synthetic_cost(unit_bytes, cpu_gbps=100.0, pcie_gbps=1.0)
    hybrid = load_cpu(checkpoints["olmoe"], schedule="hybrid", cost=cost)
    torch.testing.assert_close(decode_logits(hybrid), fetched["olmoe"][0], rtol=1e-4, atol=1e-4)
    s = hybrid.stats()
    assert s["units_fetch"] == 0 and s["units_cpu"] > 0 and s["units_admitted"] > 0
    hybrid.cache.table.check_invariants()
    cpu = load_cpu(checkpoints["olmoe"], schedule="cpu", cost=cost)
    decode_logits(cpu)
    assert cpu.stats()["units_admitted"] == 0
    assert s["units_hit"] > cpu.stats()["units_hit"]  # admitted units became hits


def test_a_failing_cpu_path_leaves_no_unit_pinned(checkpoints, fetched):
    unit_bytes = fetched["olmoe"][2]
    eng = load_cpu(checkpoints["olmoe"], schedule="cpu", cost=synthetic_cost(unit_bytes))

    def broken(*args):
        raise RuntimeError("the CPU path failed")

    eng.sched.cpu = broken
    with pytest.raises(RuntimeError, match="CPU path failed"):
        eng.generate_ids(PROMPT, max_new_tokens=4)
    assert not eng.cache.table._pins  # every pin of the failed step was released
    eng.cache.table.check_invariants()


def test_measured_cpu_rate_reprices_the_plan():
    """Hybrid: CPU calls slower than calibrated (host memory shared with the copy engine) lower the
    planner's CPU rate, within bounds, so fewer misses go to the CPU; the other modes never reprice."""
    from types import SimpleNamespace

    from edgeprism.schedule import misses
    from edgeprism.schedule.scheduler import plain_plan

    unit = 1 << 20
    cost = synthetic_cost(unit, cpu_gbps=4.0, pcie_gbps=2.0)

    def sched(mode):
        return misses.MissScheduler(mode, cost, cpu=None, store=SimpleNamespace(unit_bytes=unit), fetch=None)

    def fetched(s):
        c, a, b = s._prices
        return plain_plan(8, 0.0, c, a, b, 0.0)[0]

    hy = sched("hybrid")
    before = fetched(hy)
    for _ in range(100):  # measured 1 GB/s: a quarter of the calibrated rate (one size: overhead kept)
        hy.observe_cpu(4 * unit, cost.cpu_call_s + 4 * unit / 1e9)
    assert hy.cost.cpu_bytes_per_s == pytest.approx(1e9, rel=1e-3) and hy.calibrated is cost
    assert hy._prices[2] == pytest.approx(unit / 1e9, rel=1e-3)
    assert fetched(hy) > before  # the slower CPU gets fewer of the 8 misses
    for _ in range(200):  # absurd measurements are clamped to the bounds
        hy.observe_cpu(unit, 1e3)
    assert hy.cost.cpu_bytes_per_s == pytest.approx(misses.CPU_RATE_BOUNDS[0] * cost.cpu_bytes_per_s, rel=1e-3)
    fit = sched("hybrid")
    for i in range(300):  # calls of 1..4 units at 0.5 ms overhead + 2 GB/s: the fit finds both
        n = 1 + i % 4
        fit.observe_cpu(n * unit, 5e-4 + n * unit / 2e9)
    assert fit.cost.cpu_call_s == pytest.approx(5e-4, rel=1e-2)
    assert fit.cost.cpu_bytes_per_s == pytest.approx(2e9, rel=1e-2)
    assert fit._prices == (fit.cost.copy_unit_s, fit.cost.cpu_call_s, fit.cost.cpu_unit_s)
    cpu = sched("cpu")
    cpu.observe_cpu(4 * unit, 10.0)
    assert cpu.cost is cost
    given = misses.MissScheduler("hybrid", cost, cpu=None, store=SimpleNamespace(unit_bytes=unit), fetch=None,
                                 learn=False)  # load(cost=...): the caller's prices are kept
    given.observe_cpu(4 * unit, 10.0)
    assert given.cost is cost and given._prices == (cost.copy_unit_s, cost.cpu_call_s, cost.cpu_unit_s)


def test_decode_reprices_from_its_own_cpu_calls(checkpoints, fetched):
    """A measured (not given) cost model learns from the CPU calls decode makes: the done-callback
    of each call feeds the fit, and outputs stay the fetch path's."""
    unit_bytes = fetched["olmoe"][2]
    eng = load_cpu(checkpoints["olmoe"], schedule="hybrid", cost=synthetic_cost(unit_bytes))
    assert eng.sched.learn is False  # given prices are kept
    eng.sched.learn = True  # as for a calibrated model (load without cost=)
    torch.testing.assert_close(decode_logits(eng), fetched["olmoe"][0], rtol=1e-4, atol=1e-4)
    eng.sched.close()  # joins the worker: every done-callback has run
    assert eng.stats()["cpu_calls"] > 0
    assert eng.sched.cost is not eng.sched.calibrated
    assert eng.sched.cost.cpu_bytes_per_s != eng.sched.calibrated.cpu_bytes_per_s
    eng.close()


def test_a_priced_out_cpu_is_probed_again(checkpoints, fetched):
    """A CPU priced out by the fit (the planner fetches every miss) still gets one fetched miss every
    PROBE_EVERY layers, so its price is re-measured: when the CPU is in fact fast, the fit follows and
    the planner sends it misses again. Outputs stay the fetch path's; a given cost model is not probed."""
    from edgeprism.schedule import misses

    unit_bytes = fetched["olmoe"][2]
    eng = load_cpu(checkpoints["olmoe"], schedule="hybrid", cost=synthetic_cost(unit_bytes, cpu_gbps=0.001))
    torch.testing.assert_close(decode_logits(eng), fetched["olmoe"][0], rtol=1e-4, atol=1e-4)
    assert eng.stats()["cpu_probes"] == 0 and eng.stats()["units_cpu"] == 0  # given prices: no exploration
    eng.close()

    eng = load_cpu(checkpoints["olmoe"], schedule="hybrid", cost=synthetic_cost(unit_bytes, cpu_gbps=0.001))
    eng.sched.learn = True  # as for a measured cost model
    s = eng.sched
    fetched_layers = 0
    keys = [SubExpertKey(1, e, 0) for e in (3, 5)]
    for _ in range(3 * misses.PROBE_EVERY):  # a synthetic layer: two misses, both fetched at this CPU price
        for key in keys:
            eng.fetch.table.discard(key)
        acts = s.decide(keys, [0.7, 0.3])
        fetched_layers += 1
        if misses.Action.CPU in acts:
            assert acts == [misses.Action.FETCH, misses.Action.CPU]  # the lower-weighted miss is the probe
            assert fetched_layers == misses.PROBE_EVERY
            fetched_layers = 0
    assert s.stats.cpu_probes == 3
    calibrated = s.cost.cpu_bytes_per_s
    for _ in range(50):  # the probes measure a CPU 50x faster than priced: the fit moves up (to its bound)
        s.observe_cpu(unit_bytes, s.cost.cpu_call_s + unit_bytes / (50 * calibrated))
    assert s.cost.cpu_bytes_per_s > calibrated
    eng.close()
