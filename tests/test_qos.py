"""The QoS layer (schedule/qos.py): the operating-points table and the controller on a simulated machine.

The simulated machine: a token is (fixed overhead ± 5% noise) + Σ over its MoE layers of the latency of
`plan(units, cost, keep, budget_s)` under a synthetic `CostModel`, with random routings (4 of 16 experts,
2 groups each, random weights and group shares) and random residency (35% resident, some in flight).
Every run replays the same tokens and noise, so runs differ only by what the controller asks for.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeprism.cache.keys import SubExpertKey
from edgeprism.errors import InputError, OutputError, ProfileError
from edgeprism.schedule import qos
from edgeprism.schedule.cost import CostModel
from edgeprism.schedule.qos import (
    OperatingPoint,
    OperatingPoints,
    QosController,
    profile,
)
from edgeprism.schedule.scheduler import RoutedUnit, plan, routed_units

LAYERS = 8
TOKENS = 200
WARMUP = 60
UNIT_BYTES = 1 << 20
COST = CostModel(unit_bytes=UNIT_BYTES, h2d_latency_s=0.0, h2d_sizes=(UNIT_BYTES,),
                 h2d_bytes_per_s=(UNIT_BYTES / 0.5e-3,), cpu_call_s=0.3e-3, cpu_bytes_per_s=UNIT_BYTES / 0.8e-3,
                 gpu_call_s=2e-5, gpu_unit_s=1e-5)  # a fetch 0.5 ms, the CPU path 0.3 ms + 0.8 ms per unit


def table(*points: tuple[float, float, float]) -> OperatingPoints:
    return OperatingPoints(tuple(OperatingPoint(*p) for p in points), 8.0, "NVIDIA H100 80GB HBM3", "bf16",
                           "2026-11-30")


TABLE = table((1.0, 1.0, 40.0), (0.98, 0.995, 36.0), (0.95, 0.985, 33.0), (0.9, 0.96, 30.0), (0.85, 0.93, 28.0),
              (0.8, 0.9, 27.0))


# ---- the simulated machine ------------------------------------------------------------------------

def make_tokens(n: int, seed: int) -> list[list[list[RoutedUnit]]]:
    """n tokens × LAYERS layers of routed units."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        token = []
        for layer in range(LAYERS):
            experts = rng.sample(range(16), 4)
            weights = [rng.random() ** 2 + 0.01 for _ in experts]
            shares = [[a, 1 - a] for a in (rng.random() for _ in experts)]
            keys = [SubExpertKey(layer, e, g) for e in experts for g in range(2)]
            resident = {k for k in keys if rng.random() < 0.35}
            inflight = {k: rng.random() * 1.5e-3 for k in keys if k not in resident and rng.random() < 0.15}
            token.append(routed_units(layer, experts, [w / sum(weights) for w in weights], 2, resident, inflight,
                                      shares))
        out.append(token)
    return out


@dataclass
class Run:
    steps: list[float]  # seconds per token
    kept: list[float]  # kept share of the token's routed mass
    floor_ok: bool  # every plan kept ≥ keep × its routed mass
    budgets: list[float | None]


def simulate(ctrl: QosController | tuple[float, float | None], tokens: list, overhead_s: float = 4e-3,
             outliers: tuple[int, ...] = (), outlier_factor: float = 10.0, report_planned: bool = True,
             moe_factor: float = 1.0) -> Run:
    """Run the tokens with a controller (or a fixed (keep, budget_s)), feeding it each step; the layers
    really take `moe_factor` × their predicted latency (a cost model that is off)."""
    rng = random.Random(1)
    run = Run([], [], True, [])
    for i, token in enumerate(tokens):
        keep, budget = ctrl.targets() if isinstance(ctrl, QosController) else ctrl
        plans = [plan(units, COST, keep, budget) for units in token]
        planned = math.fsum(p.latency_s for p in plans)
        step = overhead_s * (1 + 0.05 * rng.uniform(-1, 1)) + moe_factor * planned
        step *= outlier_factor if i in outliers else 1
        run.steps.append(step)
        run.kept.append(math.fsum(p.kept_mass for p in plans) / math.fsum(p.total_mass for p in plans))
        run.floor_ok &= all(p.kept_mass >= keep * p.total_mass * (1 - 1e-9) for p in plans)
        run.budgets.append(budget)
        if isinstance(ctrl, QosController):
            ctrl.observe(step, planned if report_planned else None)
    return run


def p95(xs: list[float]) -> float:
    return qos._percentile(sorted(xs), 0.95)


@pytest.fixture(scope="module")
def tokens() -> list:
    return make_tokens(TOKENS, seed=0)


@pytest.fixture(scope="module")
def span(tokens: list) -> tuple[float, float, Run]:
    """Mean step of the fastest plans (keep 0.5, no budget) and of the full ones (keep 1), and the fast run."""
    fast = simulate((0.5, None), tokens)
    full = simulate((1.0, None), tokens)
    assert statistics.mean(fast.steps) < 0.6 * statistics.mean(full.steps)  # room for a controller to work
    return statistics.mean(fast.steps), statistics.mean(full.steps), fast


def target_at(span: tuple[float, float, Run], frac: float) -> float:
    lo, hi, _ = span
    return lo + frac * (hi - lo)


# ---- the operating-points table --------------------------------------------------------------------

def test_table_round_trip(tmp_path):
    t = table((0.9, 0.96, 30.0), (1.0, 1.0, 40.0), (0.95, 0.985, 33.0))
    assert [p.keep for p in t.points] == [1.0, 0.95, 0.9]  # highest keep first, whatever the order given
    path = t.save(tmp_path / "sub" / "edgeprism-profile-8gb.json")
    assert OperatingPoints.load(path) == t
    assert json.loads(path.read_text())["version"] == qos.PROFILE_VERSION
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was renamed
    none_vram = OperatingPoints(t.points, None, "cpu", "int8", "2026-01-01")
    assert OperatingPoints.load(none_vram.save(tmp_path / "n.json")) == none_vram


def good_json() -> dict:
    return TABLE.to_json()


def edit(**kw: object) -> dict:
    d = good_json()
    d.update(kw)
    return d


def point_edit(**kw: object) -> dict:
    d = good_json()
    d["points"][1].update(kw)
    return d


@pytest.mark.parametrize(("content", "match"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (edit(version=99), "version 99"),
    (edit(version=None), "version None"),
    ({k: v for k, v in good_json().items() if k != "points"}, "invalid.*points"),
    (edit(points=[]), "at least one point"),
    (edit(points="many"), "invalid"),
    (point_edit(keep=1.5), r"keep=1.5: must be in \(0, 1\]"),
    (point_edit(keep=1.0), "measured twice"),
    (point_edit(quality=None), "TypeError"),
    (point_edit(ms_per_token="fast"), "ValueError"),
    (point_edit(ms_per_token=-3.0), "ms_per_token=-3.0"),
    (point_edit(quality=math.nan), "quality=nan"),
])
def test_bad_files_raise_profile_error(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ProfileError, match=match) as info:
        OperatingPoints.load(path)
    assert str(path) in str(info.value)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ProfileError, match="edgeprism profile"):
        OperatingPoints.load(tmp_path / "nope.json")


def test_save_to_an_unwritable_place(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="writable path"):
        TABLE.save(tmp_path / "file" / "p.json")  # its parent is a file


@pytest.mark.parametrize(("q", "keep"), [
    (1.0, 1.0), (0.995, 0.98), (0.99, 0.98), (0.985, 0.95), (0.97, 0.95), (0.93, 0.85), (0.9, 0.8), (0.1, 0.8),
])
def test_keep_for_quality_monotone_table(q, keep):
    assert TABLE.keep_for_quality(q) == keep


def test_keep_for_quality_unreachable_and_noisy():
    # the best measured point misses q: drop nothing
    assert table((0.98, 0.97, 30.0), (0.9, 0.9, 25.0)).keep_for_quality(0.99) == 1.0
    # a point at keep < 1 is trusted when it reaches q and it is the highest one
    assert table((0.98, 0.97, 30.0), (0.9, 0.9, 25.0)).keep_for_quality(0.95) == 0.98
    # 0.85 measured better than 0.9 (noise): 0.9 misses 0.95, so nothing below it is trusted either
    noisy = table((1.0, 1.0, 40.0), (0.95, 0.97, 33.0), (0.9, 0.94, 30.0), (0.85, 0.96, 28.0))
    assert noisy.keep_for_quality(0.95) == 0.95
    assert noisy.keep_for_quality(0.94) == 0.85
    for bad in (0.0, 1.01, math.nan):
        with pytest.raises(InputError, match="quality target"):
            TABLE.keep_for_quality(bad)


point_lists = st.lists(st.tuples(st.integers(1, 20), st.integers(1, 100)), min_size=1, max_size=6,
                       unique_by=lambda p: p[0])


@settings(max_examples=40, deadline=None)
@given(point_lists, st.integers(1, 100), st.integers(1, 100))
def test_keep_for_quality_properties(points, q1, q2):
    """A higher quality target never gives a lower keep, and every point at or above the answer reaches it."""
    t = table(*((k / 20, q / 100, 10.0) for k, q in points))
    q1, q2 = sorted((q1 / 100, q2 / 100))
    k1, k2 = t.keep_for_quality(q1), t.keep_for_quality(q2)
    assert k1 <= k2
    assert k1 == 1.0 or k1 in {p.keep for p in t.points}
    if k1 < 1.0 or any(p.keep == 1.0 and p.quality >= q1 for p in t.points):  # not the drop-nothing fallback
        assert all(p.quality >= q1 for p in t.points if p.keep >= k1)
        below = [p for p in t.points if p.keep < k1]
        assert not below or below[0].quality < q1  # and the lowest such keep


def test_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRISM_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    assert OperatingPoints.default_path(model, 8) == model / "edgeprism-profile-8gb.json"
    assert OperatingPoints.default_path(model, 7.5).name == "edgeprism-profile-7.5gb.json"
    assert OperatingPoints.default_path(model, None).name == "edgeprism-profile-fullvram.json"
    monkeypatch.setattr(qos.os, "access", lambda *args: False)  # a read-only model directory
    cached = OperatingPoints.default_path(model, 8)
    assert cached.parent == tmp_path / "cache" / "profile"
    assert cached.name.startswith("model-") and cached.name.endswith("-edgeprism-profile-8gb.json")
    other = tmp_path / "elsewhere" / "model"
    other.mkdir(parents=True)
    assert OperatingPoints.default_path(other, 8) != cached  # same name, another directory
    (model / "edgeprism-profile-8gb.json").write_text("{}")  # shipped beside the model: read there
    assert OperatingPoints.default_path(model, 8) == model / "edgeprism-profile-8gb.json"


def test_profile_measures_each_keep(caplog):
    calls = []

    def measure(keep: float) -> tuple[float, float]:
        calls.append(keep)
        return 1.0 - (1.0 - keep) ** 2, 20.0 + 20.0 * keep

    t = profile(measure, vram_gb=8.0, device="cpu", expert_dtype="bf16", date="2026-11-30")
    assert calls == list(qos.DEFAULT_KEEPS)
    assert [p.keep for p in t.points] == list(qos.DEFAULT_KEEPS)
    assert (t.points[-1].keep, t.points[-1].quality, t.points[-1].ms_per_token) == (0.8, pytest.approx(0.96), 36.0)
    assert (t.vram_gb, t.device, t.expert_dtype, t.date) == (8.0, "cpu", "bf16", "2026-11-30")
    assert "quality rises" not in caplog.text
    assert len(profile(measure, (1.0, 0.5), vram_gb=None, device="cpu", expert_dtype="bf16").date) == 10
    noisy = profile(lambda k: (1.0 if k in (1.0, 0.8) else 0.9, 10.0), (1.0, 0.9, 0.8), vram_gb=None,
                    device="cpu", expert_dtype="bf16")
    assert noisy.keep_for_quality(0.95) == 1.0 and "quality rises" in caplog.text


@pytest.mark.parametrize("keeps", [(), (1.0, 1.0), (1.0, 0.0), (1.2,)])
def test_profile_rejects_bad_keeps(keeps):
    with pytest.raises(InputError, match="keeps="):
        profile(lambda k: (1.0, 1.0), keeps, vram_gb=None, device="cpu", expert_dtype="bf16")


def test_profile_rejects_a_bad_measurement():
    with pytest.raises(InputError, match="ms_per_token=nan"):
        profile(lambda k: (1.0, math.nan), vram_gb=None, device="cpu", expert_dtype="bf16")


# ---- the controller ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "exactly one target"),
    ({"latency_ms": 50.0, "quality": 0.9}, "exactly one target"),
    ({"latency_ms": 0.0}, "latency_ms=0.0"),
    ({"latency_ms": math.inf}, "latency_ms=inf"),
    ({"quality": 1.5}, r"quality=1.5: must be in \(0, 1\]"),
    ({"quality": 0.0}, "quality=0.0"),
    ({"latency_ms": 50.0, "min_keep": 0.0}, "min_keep=0.0"),
    ({"latency_ms": 50.0, "percentile": 1.0}, "percentile=1.0"),
    ({"latency_ms": 50.0, "window": 4}, "window=4"),
])
def test_controller_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        QosController(LAYERS, **kwargs)


def test_controller_validation_of_layers_and_observations():
    for layers in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="layers="):
            QosController(layers, quality=0.9)  # type: ignore[arg-type]
    c = QosController(LAYERS, latency_ms=20.0)
    for step, planned in ((math.nan, None), (-1.0, None), (math.inf, None), (0.01, -0.001), (0.01, math.nan)):
        with pytest.raises(InputError, match="must be finite and ≥ 0"):
            c.observe(step, planned)
    assert c.tokens == 0


def test_quality_mode_never_keeps_less_than_its_floor(tokens):
    with_table = QosController(LAYERS, quality=0.96, table=TABLE)
    assert with_table.targets() == (0.9, None)  # TABLE measured 0.96 at keep 0.9
    run_t = simulate(with_table, tokens[:40])
    assert run_t.floor_ok and min(run_t.kept) >= 0.9 - 1e-9 and set(run_t.budgets) == {None}
    proxy = QosController(LAYERS, quality=0.7)
    assert proxy.targets() == (0.7, None)  # no table: the quality target is the mass floor
    run = simulate(proxy, tokens[:40])
    assert run.floor_ok and min(run.kept) >= 0.7 - 1e-9
    assert QosController(LAYERS, quality=0.999, table=TABLE).targets() == (1.0, None)  # unreachable: drop nothing
    s = with_table.summary()
    assert (s["mode"], s["target_quality"], s["keep"], s["budget_ms"], s["tokens"]) == ("quality", 0.96, 0.9, None, 40)
    assert s["p95_ms"] == pytest.approx(p95(run_t.steps) * 1e3)


@pytest.mark.parametrize(("percentile", "held"), [(0.95, p95), (0.5, statistics.median)])
def test_latency_mode_converges_to_a_reachable_target(tokens, span, percentile, held):
    target = target_at(span, 0.5)
    c = QosController(LAYERS, latency_ms=target * 1e3, percentile=percentile)
    run = simulate(c, tokens)
    after = run.steps[WARMUP:]
    assert abs(held(after) - target) <= 0.05 * target  # the held percentile sits on the target
    if percentile == 0.95:
        assert abs(p95(after) - target) <= 0.10 * target
    assert c.targets()[0] == 0.5  # the planner keeps the most mass within the budget; keep is only the floor
    s = c.summary()
    assert s["tokens"] == TOKENS and s["p95_ms"] == pytest.approx(p95(run.steps[-qos.WINDOW:]) * 1e3)
    assert s["p50_ms"] == pytest.approx(statistics.median(run.steps[-qos.WINDOW:]) * 1e3)
    assert all(qos.MIN_SHARE * target / LAYERS <= b <= qos.MAX_SHARE * target / LAYERS for b in run.budgets)


def test_latency_mode_converges_without_planned_times(tokens, span):
    target = target_at(span, 0.5)
    run = simulate(QosController(LAYERS, latency_ms=target * 1e3), tokens, report_planned=False)
    assert abs(p95(run.steps[WARMUP:]) - target) <= 0.10 * target


def test_latency_mode_converges_when_the_cost_model_is_off(tokens):
    """The layers take 3x what the planner predicts: the loop gain triples, and must stay stable."""
    lo, hi = (statistics.mean(simulate((keep, None), tokens, moe_factor=3.0).steps) for keep in (0.5, 1.0))
    target = (lo + hi) / 2
    run = simulate(QosController(LAYERS, latency_ms=target * 1e3), tokens, moe_factor=3.0)
    assert abs(p95(run.steps[WARMUP:]) - target) <= 0.10 * target


def test_a_looser_target_keeps_more_mass(tokens, span):
    fast = span[2]
    kept = []
    for frac in (0.25, 0.75):
        target = target_at(span, frac)
        run = simulate(QosController(LAYERS, latency_ms=target * 1e3), tokens)
        assert abs(p95(run.steps[WARMUP:]) - target) <= 0.10 * target
        kept.append(statistics.mean(run.kept[WARMUP:]))
    assert statistics.mean(fast.kept[WARMUP:]) < kept[0] < kept[1] <= 1.0


def test_unreachable_target_runs_the_fastest_plans_and_recovers(tokens, span):
    target = target_at(span, 0.5)
    c = QosController(LAYERS, latency_ms=target * 1e3)
    slow = simulate(c, tokens, overhead_s=12e-3)  # overhead alone takes 80% of the target
    assert statistics.median(slow.steps) > target  # the fastest plans miss it on most tokens
    floor = (0.5, qos.MIN_SHARE * target / LAYERS)
    assert c.targets()[0] == floor[0] and c.targets()[1] == pytest.approx(floor[1])  # pinned, not diverging
    assert slow.kept[WARMUP:] == span[2].kept[WARMUP:]  # exactly the fastest plans
    assert all(b is not None and math.isfinite(b) and b >= floor[1] * (1 - 1e-9) for b in slow.budgets)
    # the overhead falls back to 4 ms: the target is reachable again, and the budget must climb back
    again = simulate(c, tokens)
    assert again.budgets[10] > 100 * floor[1]  # anti-windup: off its bound within a few tokens
    assert abs(p95(again.steps[WARMUP:]) - target) <= 0.10 * target


def test_a_single_outlier_does_not_wreck_it(tokens, span):
    target = target_at(span, 0.5)
    calm = simulate(QosController(LAYERS, latency_ms=target * 1e3), tokens)
    hit = simulate(QosController(LAYERS, latency_ms=target * 1e3), tokens, outliers=(100,))
    assert hit.steps[100] > 5 * target
    huge = simulate(QosController(LAYERS, latency_ms=target * 1e3), tokens, outliers=(100,), outlier_factor=1000.0)
    assert huge.budgets == hit.budgets  # the median of three never reads the outlier: its size does not matter
    assert hit.budgets[101] == pytest.approx(calm.budgets[101], rel=0.05)
    assert abs(statistics.mean(hit.kept[101:]) - statistics.mean(calm.kept[101:])) <= 0.02
    after = hit.steps[101:]
    assert abs(p95(after) - target) <= 0.10 * target


def test_plateau_keep():
    """The highest keep within 5% of the fastest measured latency (dropping below it bought nothing)."""
    t = table((1.0, 1.0, 20.0), (0.9, 0.97, 15.0), (0.8, 0.93, 12.2), (0.7, 0.9, 11.9), (0.5, 0.8, 11.8))
    assert t.plateau_keep() == 0.8  # 12.2 ≤ 1.05 × 11.8; 15.0 is not
    assert table((1.0, 1.0, 20.0)).plateau_keep() == 1.0
    assert table((1.0, 1.0, 10.0), (0.5, 0.8, 10.2)).plateau_keep() == 1.0  # dropping never paid


def test_latency_floor_from_the_table(tokens, span):
    """With a table, latency mode's floor is its plateau keep, not 0.5: an unreachable target pins the
    plans there (the least quality loss that still runs as fast as the table says anything can)."""
    t = table((1.0, 1.0, 20.0), (0.9, 0.97, 15.0), (0.8, 0.93, 12.2), (0.5, 0.8, 11.8))
    target = target_at(span, 0.5)
    with_table = QosController(LAYERS, latency_ms=target * 1e3, table=t)
    assert with_table.targets()[0] == 0.8
    slow = simulate(with_table, tokens, overhead_s=12e-3)  # unreachable: pinned at the floor
    assert min(slow.kept[WARMUP:]) >= 0.8 - 1e-9
    plain = simulate(QosController(LAYERS, latency_ms=target * 1e3), tokens, overhead_s=12e-3)
    assert statistics.mean(slow.kept[WARMUP:]) > statistics.mean(plain.kept[WARMUP:])
    assert QosController(LAYERS, latency_ms=50.0, table=t, min_keep=0.9).targets()[0] == 0.9  # min_keep still binds


# ---- latency mode of schedule="direct": the floor is the knob --------------------------------------

def direct_machine(floor: float, rng: random.Random, layers: int = 12, misses: float = 0.7) -> float:
    """A simulated direct-decode token: 2 ms fixed, 0.2 ms per missed unit read (each layer drops its
    lowest-weighted misses within 1 − floor of its mass, as `DirectCache.drop_misses`), ±5% noise."""
    read = 0
    for _ in range(layers):
        w = sorted(rng.random() ** 2 + 0.01 for _ in range(8))
        miss = [x for x in w if rng.random() < misses]
        allow, dropped = (1.0 - floor) * sum(w), 0.0
        for x in miss:  # ascending
            if dropped + x > allow:
                break
            dropped += x
            read -= 1
        read += len(miss)
    return (2e-3 + 0.2e-3 * read) * (1.0 + 0.05 * (rng.random() - 0.5))


def run_floor(ctrl: qos.FloorController, n: int = 400, seed: int = 0) -> tuple[list[float], list[float]]:
    rng, steps, keeps = random.Random(seed), [], []
    for _ in range(n):
        keep = ctrl.targets()[0]
        step = direct_machine(keep, rng)
        ctrl.observe(step)
        steps.append(step)
        keeps.append(keep)
    return steps, keeps


def test_floor_controller_holds_a_reachable_target():
    rng = random.Random(1)
    exact = statistics.mean(direct_machine(1.0, rng) for _ in range(200))
    fastest = statistics.mean(direct_machine(0.5, rng) for _ in range(200))
    target = (exact + fastest) / 2
    steps, keeps = run_floor(qos.FloorController(latency_ms=target * 1e3))
    assert abs(p95(steps[WARMUP:]) - target) <= 0.10 * target
    assert 0.5 < statistics.mean(keeps[WARMUP:]) < 1.0


def test_floor_controller_loose_and_unreachable_targets():
    rng = random.Random(2)
    exact = max(direct_machine(1.0, rng) for _ in range(200))
    loose = qos.FloorController(latency_ms=2 * exact * 1e3)
    _, keeps = run_floor(loose)
    assert keeps[-1] == 1.0 and min(keeps) == 1.0  # never drops: the exact graphs run
    tight = qos.FloorController(latency_ms=1.0)  # 1 ms: below the 2 ms fixed cost
    _, keeps = run_floor(tight)
    assert keeps[-1] == 0.5 and tight.summary()["min_keep"] == 0.5  # pinned at the floor, not below
    t = table((1.0, 1.0, 20.0), (0.8, 0.93, 12.2), (0.5, 0.8, 11.8))
    assert qos.FloorController(latency_ms=1.0, table=t).min_keep == 0.8
    with pytest.raises(InputError):
        qos.FloorController(latency_ms=0)
