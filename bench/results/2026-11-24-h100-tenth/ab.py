"""Run 5: decode ms/token with prefetch off and on (twice each), 12 Qwen3-30B-A3B-shaped layers, token routing, 8 GB.

PYTHONPATH=$PWD python3 <this file> [int4]; run 5 also ran it with the previous commit's package first on the path."""
import sys, time, json, torch
import edgeprism
from bench.decode import GEOMETRIES, set_routing
from edgeprism.models.checkpoint import MemoryCheckpoint
dtype = sys.argv[1] if len(sys.argv) > 1 else None
cfg = dict(GEOMETRIES["qwen3-30b-a3b"], num_hidden_layers=12)
src = MemoryCheckpoint(cfg, seed=0)
for pref in (False, True, False, True):
    kw = dict(expert_dtype="int4", cache_fraction=0.299) if dtype == "int4" else {}
    eng = edgeprism.load(src, vram_gb=8, dtype="bf16", max_context=1024, prefetch=pref, **kw)
    set_routing(eng, "token")
    ids = torch.randint(0, cfg["vocab_size"], (64,), generator=torch.Generator().manual_seed(1)).tolist()
    it = eng.stream_ids(ids, max_new_tokens=1000, temperature=1.0, seed=0)
    for _ in range(32): next(it)
    eng.reset_stats()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(192): next(it)
    torch.cuda.synchronize(); ms = (time.perf_counter() - t0) / 192 * 1e3
    s = eng.stats()
    print(json.dumps({"code": sys.path[0] if sys.path[0].endswith("_old") else "new", "dtype": dtype or "bf16", "prefetch": pref, "ms_per_token": round(ms, 3),
                      "hit_rate": round(s["hit_rate"], 3), "stall_ms": round(s["stall_s"] * 1e3 / 192, 3), "recall": s["prefetch_recall"],
                      "units": s["prefetch_units"], "paused": s["prefetch_paused"], "idle": s["prefetch_idle_skips"]}), flush=True)
    it.close(); eng.close()
