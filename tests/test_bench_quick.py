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
