"""The quality/latency knobs of generation calls, wired to the hybrid scheduler, and `edgeprism profile`.

The default model's perplexity at `quality=0.95` is measured here through the decode path (the only
path where the scheduler drops anything), with a synthetic cost model shaped like the H100 box's
(CPU path 80 GB/s, PCIe ~50 GB/s: MEASURED.md) so the drop decisions do not depend on this machine.
"""

from __future__ import annotations

import json
import math

import pytest

import edgeprism
from edgeprism.cli import main
from edgeprism.corpus import token_stream
from edgeprism.errors import InputError
from edgeprism.schedule.cost import CostModel
from edgeprism.schedule.profile import decode_nll
from edgeprism.schedule.qos import OperatingPoint, OperatingPoints

PROMPT = [5, 17, 99, 3, 42, 8, 77, 120, 61, 2, 33, 14]


def h100_like(unit_bytes: int) -> CostModel:
    return CostModel(unit_bytes=unit_bytes, h2d_latency_s=14e-6, h2d_sizes=(256 << 10, 16 << 20),
                     h2d_bytes_per_s=(18.8e9, 53.7e9), cpu_call_s=60e-6, cpu_bytes_per_s=80e9,
                     gpu_call_s=15e-6, gpu_unit_s=1e-6)


@pytest.fixture(scope="module")
def default_hybrid():
    probe = edgeprism.load(device="cpu", dtype="fp32", cache_fraction=0.3, groups=4)
    unit_bytes = probe.stats()["unit_bytes"]
    probe.close()
    eng = edgeprism.load(device="cpu", dtype="fp32", cache_fraction=0.3, groups=4, schedule="hybrid", max_context=512,
                         cost=h100_like(unit_bytes))
    yield eng
    eng.close()


def test_knobs_need_the_hybrid_schedule(checkpoints):
    eng = edgeprism.load(checkpoints["olmoe"], device="cpu", dtype="fp32", cache_fraction=0.3)
    with pytest.raises(InputError, match="schedule='hybrid'"):
        eng.generate_ids(PROMPT, max_new_tokens=2, quality=0.9)
    with pytest.raises(InputError, match="schedule='hybrid'"):
        eng.stream_ids(PROMPT, max_new_tokens=2, latency_ms=5.0)
    eng.close()


def test_bad_targets_are_refused_before_generating(default_hybrid):
    for kw in ({"quality": 0.0}, {"quality": 1.5}, {"latency_ms": -1.0}, {"quality": 0.9, "latency_ms": 10.0}):
        with pytest.raises(InputError):
            default_hybrid.generate_ids(PROMPT, max_new_tokens=2, **kw)
    assert default_hybrid.sched.keep == 1.0


def test_quality_floor_holds_and_ends_with_the_call(default_hybrid):
    eng = default_hybrid
    eng.reset_stats()
    eng.generate_ids(PROMPT, max_new_tokens=24, quality=0.8)  # no table: 0.8 is the kept-mass floor
    s = eng.stats()
    assert s["units_drop"] > 0 and 0.8 - 1e-9 <= s["mass_kept"] < 1.0
    eng.reset_stats()
    eng.generate_ids(PROMPT, max_new_tokens=8)  # a plain call drops nothing
    s = eng.stats()
    assert s["units_drop"] == 0 and s["mass_kept"] == pytest.approx(1.0)


def test_latency_target_trades_mass_for_time(default_hybrid):
    eng = default_hybrid
    eng.reset_stats()
    eng.generate_ids(PROMPT, max_new_tokens=24, latency_ms=1e-3)  # unreachable: the fastest plans
    s = eng.stats()
    assert s["units_drop"] > 0 and s["mass_kept"] >= 0.5 - 1e-9  # min_keep


def test_operating_points_table_sets_the_floor(default_hybrid, tmp_path, monkeypatch):
    table = OperatingPoints((OperatingPoint(1.0, 1.0, 2.0), OperatingPoint(0.9, 0.97, 1.8),
                             OperatingPoint(0.7, 0.9, 1.5)), None, "cpu", "fp32", "2026-11-23")
    path = tmp_path / "table.json"
    table.save(path)
    monkeypatch.setattr(OperatingPoints, "default_path", staticmethod(lambda model_dir, vram_gb: path))
    assert default_hybrid.operating_points() == table
    qos = default_hybrid._qos(0.95, None)
    assert qos.targets() == (0.9, None)  # the lowest measured keep with quality ≥ 0.95


def test_default_model_perplexity_at_quality_095(default_hybrid):
    """The dropping operating point of the scheduler issue: ≤ 5% perplexity increase at quality=0.95
    (4 sub-experts per expert, a cache of 30% of them: measured +-0.2% keeping 0.987 of the mass)."""
    eng = default_hybrid
    ids = token_stream(eng.tokenizer, 200, 0)
    nll_ref, _, _ = decode_nll(eng, ids, 1.0)
    nll_q, _, kept = decode_nll(eng, ids, 0.95)
    increase = math.exp(nll_q - nll_ref) - 1
    print(f"default model, decode path, 199 tokens: ppl {math.exp(nll_ref):.3f} -> {math.exp(nll_q):.3f} "
          f"(+{increase:.2%}) keeping {kept:.3f} of routed mass")
    assert kept < 1.0  # something was dropped
    assert increase <= 0.05


def test_profile_cli_writes_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEPRISM_CACHE_DIR", str(tmp_path / "cache"))  # cost model measured here, once
    out = tmp_path / "profile.json"
    assert main(["profile", "--device", "cpu", "--vram-gb", "0.14", "--tokens", "24", "--keeps", "1", "0.8",
                 "--out", str(out)]) == 0
    table = OperatingPoints.load(out)
    assert [p.keep for p in table.points] == [1.0, 0.8] and table.device == "cpu"
    assert all(p.ms_per_token > 0 and p.quality > 0 for p in table.points)
    assert "wrote" in capsys.readouterr().out
    assert json.loads(out.read_text())["points"]
    assert main(["profile", "--device", "cpu", "--tokens", "24", "--out", str(out)]) == 2  # everything resident
    default = str(edgeprism.api.DEFAULT_MODEL)
    assert main(["profile", default, "--model", str(tmp_path), "--device", "cpu"]) == 2  # two models given
    assert main(["profile", default, "--device", "cpu", "--vram-gb", "0.14", "--tokens", "16", "--keeps", "1",
                 "--out", str(out)]) == 0  # the checkpoint as a positional argument, as `info` takes it
