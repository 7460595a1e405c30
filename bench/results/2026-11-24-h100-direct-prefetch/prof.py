"""A CUDA timeline (torch.profiler, kernels inside the token graphs) of zero-copy decode with and
without prefetch: GPU time per kernel name, and how much of the staging kernel's time ran beside
other kernels. PYTHONPATH=$PWD python3 <this file> OUT.json (bf16, 12 layers, token routing, 8 GB)."""
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

import edgeprism
from bench.decode import GEOMETRIES, set_routing
from bench.prefetch import _overlap, _union
from edgeprism.models.checkpoint import MemoryCheckpoint

cfg = dict(GEOMETRIES["qwen3-30b-a3b"], num_hidden_layers=12)
src = MemoryCheckpoint(cfg, seed=0)
ids = torch.randint(0, cfg["vocab_size"], (64,), generator=torch.Generator().manual_seed(1)).tolist()
result = []
for pref in (False, True):
    eng = edgeprism.load(src, vram_gb=8, dtype="bf16", max_context=1024, schedule="direct", prefetch=pref)
    set_routing(eng, "token")
    it = eng.stream_ids(ids, max_new_tokens=1000, temperature=1.0, seed=0)
    for _ in range(48):
        next(it)
    torch.cuda.synchronize()
    n = 16
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            next(it)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    by_name, stage, other = defaultdict(float), [], []
    span = [float("inf"), 0.0]
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "kernel":
            continue
        a, b = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        span = [min(span[0], a), max(span[1], b)]
        name = e["name"][:60]
        by_name[name] += b - a
        (stage if "_stage_kernel" in name else other).append((a, b))
    su, ou = _union(stage), _union(other)
    rec = {"prefetch": pref, "kernels": len(stage) + len(other), "span_ms_per_token": (span[1] - span[0]) / n / 1e3,
           "busy_ms_per_token": sum(b - a for a, b in _union(stage + other)) / n / 1e3,
           "stage_ms_per_token": sum(b - a for a, b in su) / n / 1e3,
           "stage_beside_other_ms_per_token": _overlap(su, ou) / n / 1e3,
           "top_kernels_ms_per_token": {k: round(v / n / 1e3, 4) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]}}
    print(json.dumps(rec), flush=True)
    result.append(rec)
    it.close()
    eng.close()
Path(sys.argv[1]).write_text(json.dumps(result, indent=1))
