"""The batched bench's CPU smoke run: one record per batch size plus the controller's, complete."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import batched

FIELDS = ("system", "batch", "tokens_per_s", "p50_ms", "p95_ms", "bytes_h2d_per_token", "device", "command", "date",
          "model", "layers")


def test_quick_batched_bench_writes_complete_records(tmp_path):
    assert batched.main(["--quick", "--batches", "1", "4", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["system"], r["batch"]) for r in records] == [
        ("edgeprism-batched", 1), ("edgeprism-batched", 4), ("edgeprism-batched-slo", 4)]
    for r in records:
        assert all(f in r for f in FIELDS), set(FIELDS) - set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"]
    fixed = {r["batch"]: r for r in records if r["system"] == "edgeprism-batched"}
    assert fixed[1]["mean_batch"] == 1 and fixed[4]["mean_batch"] == 4
    assert 0 < fixed[4]["bytes_h2d_per_token"] < fixed[1]["bytes_h2d_per_token"]  # shared units, tiny cache
