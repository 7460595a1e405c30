"""The decode bench's CPU smoke run: every record carries the fields the results format promises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import decode  # noqa: E402

FIELDS = ("system", "model", "layers", "vram_gb", "tokens_per_s", "p50_ms", "p95_ms", "ttft_ms", "hit_rate",
          "bytes_per_token", "peak_vram_gb", "h2d_gbps", "device", "command")


def test_quick_bench_writes_complete_records(tmp_path):
    assert decode.main(["--quick", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    systems = {r["system"] for r in records}
    assert {"edgeprism", "lru-expert", "resident", "pcie-bound"} <= systems
    for r in records:
        assert all(f in r for f in FIELDS), set(FIELDS) - set(r)
        assert r["tokens_per_s"] > 0
    ours = [r for r in records if r["system"] == "edgeprism"]
    assert all(0 <= r["hit_rate"] <= 1 for r in ours)
    assert any(r["bytes_per_token"] > 0 for r in ours)  # the quick budgets are below the experts' size


def test_token_routing_is_predictable_where_uniform_routing_is_not(tmp_path):
    """routing="token" (the model's own routers, led by the current token's scaled embedding): the
    next-layer predictor foresees it; uniform routing it cannot. Measured on the tiny geometry: recall
    0.99 against 0.09."""
    recall = {}
    for routing in ("token", "uniform"):
        out = tmp_path / routing
        assert decode.main(["--geometry", "tiny", "--budgets", "0.08", "--cache-fraction", "0.3", "--tokens", "24",
                            "--warmup", "4", "--prompt-len", "32", "--context", "128", "--routing", routing,
                            "--systems", "edgeprism", "--device", "cpu", "--out", str(out)]) == 0
        (rec,) = json.loads((out / "results.json").read_text())
        assert rec["routing"] == routing and rec["prefetch"] and rec["lookahead"] == 1
        recall[routing] = rec["prefetch_recall"]
    assert recall["token"] > 0.8 and recall["uniform"] < 0.4, recall


def test_the_48_layer_estimate_scales_the_cpu_shares_loop_only():
    """quant_kernels.loop_estimate: 12 layers whose CPU-share loop took 3 ms of a 4 ms token → 48
    layers take 4 · 3 + 1 = 13 ms (tokens/s ÷ 4 would say 16 ms); no CPU share, no estimate."""
    from bench.quant_kernels import loop_estimate

    rec = {"tokens_per_s": 250.0, "tokens": 100, "cpu_share_busy_s": 0.2, "cpu_share_wait_s": 0.1}
    assert abs(loop_estimate(rec, 12) - 1 / 0.013) < 1e-6
    assert abs(loop_estimate(rec, 48) - 250.0) < 1e-6  # at its own layer count: what was measured
    assert loop_estimate({"tokens_per_s": 250.0, "tokens": 100}, 12) is None


def test_prefetch_ceiling_oracle_replays_the_recorded_routing(tmp_path):
    """bench/prefetch.py ceiling: the oracle predicts exactly what the next layer routes (the replayed
    decode routes as the recording did), while pre-gating and off run beside it in one engine."""
    from bench import prefetch

    out = tmp_path / "ceiling.json"
    assert prefetch.main(["ceiling", "--geometry", "tiny", "--layers", "4", "--device", "cpu", "--cache-fraction",
                          "0.3", "--rounds", "1", "--tokens", "6", "--warmup", "3", "--prompt-len", "8",
                          "--out", str(out)]) == 0
    recs = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(recs) == {"off", "pregate", "oracle", "oracle-all"}
    for r in recs.values():
        assert r["route_mismatches"] == 0 and r["tokens_per_s"] > 0
    for v in ("oracle", "oracle-all"):
        assert recs[v]["prefetch_recall"] == 1.0 and recs[v]["oracle_served"] > 0 and recs[v]["oracle_missing"] == 0
    assert recs["off"]["prefetch_recall"] is None and recs["off"]["prefetch_units"] == 0
    assert recs["pregate"]["prefetch_recall"] is not None and recs["pregate"]["oracle_served"] == 0
