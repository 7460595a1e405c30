"""Where zero-copy decode's token time goes: wall time per token against the GPU time of its graph
(CUDA events around every graph replay) and the host time of the cache upkeep between tokens.

PYTHONPATH=$PWD python3 <this file> OUT.jsonl: 12 Qwen3-30B-A3B-shaped layers, token routing, 8 GB,
bf16 and int4 experts, prefetch off and on (the shipped defaults)."""
import json
import sys
import time

import torch

import edgeprism
from bench.decode import GEOMETRIES, set_routing
from edgeprism.models.checkpoint import MemoryCheckpoint

out = sys.argv[1]
cfg = dict(GEOMETRIES["qwen3-30b-a3b"], num_hidden_layers=12)
src = MemoryCheckpoint(cfg, seed=0)
ids = torch.randint(0, cfg["vocab_size"], (64,), generator=torch.Generator().manual_seed(1)).tolist()
marks: list = []
replay = torch.cuda.CUDAGraph.replay


def timed_replay(self):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    replay(self)
    b.record()
    marks.append((a, b))


torch.cuda.CUDAGraph.replay = timed_replay
for dtype in ("bf16", "int4"):
    for pref in (False, True, False, True):
        kw = dict(expert_dtype="int4", cache_fraction=0.299) if dtype == "int4" else {}
        eng = edgeprism.load(src, vram_gb=8, dtype="bf16", max_context=1024, schedule="direct", prefetch=pref, **kw)
        set_routing(eng, "token")
        d = eng.experts.direct
        host = {"before_step": 0.0, "after_step": 0.0, "read_routing": 0.0}
        for name in host:
            fn = getattr(d, name)

            def wrapped(*a, fn=fn, name=name, host=host):
                t = time.perf_counter()
                r = fn(*a)
                host[name] += time.perf_counter() - t
                return r

            setattr(d, name, wrapped)
        it = eng.stream_ids(ids, max_new_tokens=1000, temperature=1.0, seed=0)
        for _ in range(48):
            next(it)
        torch.cuda.synchronize()
        marks.clear()
        for k in host:
            host[k] = 0.0
        n = 128
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n * 1e3
        gpu = sum(a.elapsed_time(b) for a, b in marks) / n
        rec = {"dtype": dtype, "prefetch": pref, "wall_ms": round(wall, 3), "graph_gpu_ms": round(gpu, 3),
               "replays_per_token": len(marks) / n, **{f"host_{k}_ms": round(v * 1e3 / n, 3) for k, v in host.items()},
               "admitted_per_token": d.admitted / max(1, n)}
        print(json.dumps(rec), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        it.close()
        eng.close()
