"""Zero-copy decode with and without in-graph prefetch, 12 Qwen3-30B-A3B-shaped layers, token routing, 8 GB.

PYTHONPATH=$PWD python3 <this file> OUT.jsonl [bf16|int4] [config ...]; a config is `off` or
`[oracle:]<after>:<budget>[:<predict>[:<lookahead>]]` (after = experts|lookup: where the staging copy forks; budget =
units staged per layer, `all` = every predicted unit the cache lacks; predict = experts predicted, default
top_k = 8, as these runs had it; the engine's direct default is now 2). `oracle:` replaces the prediction by the routing a first decode of the same prompt recorded (the
next layer's routed experts, in order), fed to the graph through a device-side token counter: the
ceiling of any predictor on this mechanism."""
import json
import os
import sys
import time

import torch

import edgeprism
from bench.decode import GEOMETRIES, set_routing
from edgeprism.models.checkpoint import MemoryCheckpoint

out, dtype, configs = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = dict(GEOMETRIES["qwen3-30b-a3b"], num_hidden_layers=12)
src = MemoryCheckpoint(cfg, seed=0)
ids = torch.randint(0, cfg["vocab_size"], (64,), generator=torch.Generator().manual_seed(1)).tolist()


def install_oracle(d, tokens):
    """Stage from a table [tokens, L, k] (device, filled later: graphs keep its address) instead of
    the predictor: token t, layer nxt. Installed before any graph is captured."""
    first = min(d._next)
    L, k = d.route_log.shape
    d._oracle_table = torch.zeros(tokens, L, k, dtype=torch.long, device=d.device)
    d._oracle_step = torch.full((1,), -1, dtype=torch.long, device=d.device)
    d._oracle_row = torch.zeros(1, L, k, dtype=torch.long, device=d.device)

    def stage_next(layer, x):
        nxt = d._next.get(layer)
        if nxt is None:
            return
        if layer == first:
            d._oracle_step.add_(1)  # on the compute stream, before the fork
        d._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(d._side):
            torch.index_select(d._oracle_table, 0, d._oracle_step, out=d._oracle_row)
            d._top_i.copy_(d._oracle_row[0, nxt][None, :d.top])
            ids = d._top_i.reshape(-1)
            d.pred_log[nxt].copy_(ids)
            d._stage(nxt, ids)
            d._staged[nxt].record(d._side)  # as DirectCache.stage_next: the target's lookup waits on it
        d._forked.add(nxt)

    d.stage_next = stage_next


def record_routes(eng, n):
    """The routing of the first n decode tokens of the measured prompt: [n, L, k] on the device."""
    d, logs = eng.experts.direct, []
    orig = d.read_routing

    def read_routing():
        logs.append(d.route_log.clone())
        orig()

    d.read_routing = read_routing
    it = eng.stream_ids(ids, max_new_tokens=n + 1, temperature=1.0, seed=0)
    for _ in it:
        pass
    d.read_routing = orig
    return torch.stack(logs)


for conf in configs:
    kw = dict(expert_dtype="int4", cache_fraction=0.299) if dtype == "int4" else {}
    pref = conf != "off"
    oracle = conf.startswith("oracle:")
    if pref:
        after, budget, *rest = conf.split(":")[1:] if oracle else conf.split(":")
        os.environ["EDGEPRISM_STAGE_AFTER"] = after
        os.environ["EDGEPRISM_STAGE_BUDGET"] = "1000000" if budget == "all" else budget  # clamped to the prediction
        kw["predict_experts"] = int(rest[0]) if rest else cfg["num_experts_per_tok"]
        kw["lookahead"] = int(rest[1]) if len(rest) > 1 else 1
    eng = edgeprism.load(src, vram_gb=8, dtype="bf16", max_context=1024, schedule="direct", prefetch=pref, **kw)
    set_routing(eng, "token")
    if oracle:
        d = eng.experts.direct
        install_oracle(d, 256)
        routes = record_routes(eng, 200)
        d._oracle_table[:routes.shape[0]].copy_(routes)
        d._oracle_step.fill_(-1)
    it = eng.stream_ids(ids, max_new_tokens=1000, temperature=1.0, seed=0)
    for _ in range(48):
        next(it)
    eng.reset_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(128):
        next(it)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 128 * 1e3
    s = eng.stats()
    d = eng.experts.direct
    rec = {"dtype": dtype, "config": conf, "ms_per_token": round(ms, 3), "tokens_per_s": round(1e3 / ms, 1),
           "hit_rate": round(s["hit_rate"], 3), "recall": s["prefetch_recall"], "staged_units": s["prefetch_units"],
           "staged_used": d.staged_used, "used_mb_per_token": s["prefetch_bytes_used"] / 128 / 1e6,
           "wasted_mb_per_token": s["prefetch_bytes_wasted"] / 128 / 1e6,
           "read_in_kernel_mb_per_token": (d.misses - d.staged_used) * s["unit_bytes"] / 128 / 1e6,
           "cache_slots": s["cache_slots"], "commit": os.environ.get("COMMIT")}
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    it.close()
    eng.close()
