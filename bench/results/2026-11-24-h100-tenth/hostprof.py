"""Run 3: where the layerwise decode step's host time goes (cProfile, bf16 experts, token routing, 8 GB).

Run on the GPU box from the repo root: PYTHONPATH=$PWD python3 <this file>."""
import cProfile, pstats, time, io, torch
import edgeprism
from bench.decode import GEOMETRIES, set_routing
from edgeprism.models.checkpoint import MemoryCheckpoint
cfg = dict(GEOMETRIES["qwen3-30b-a3b"], num_hidden_layers=12)
src = MemoryCheckpoint(cfg, seed=0)
for pref in (False, True):
    eng = edgeprism.load(src, vram_gb=8, dtype="bf16", max_context=1024, prefetch=pref)
    set_routing(eng, "token")
    ids = torch.randint(0, cfg["vocab_size"], (64,), generator=torch.Generator().manual_seed(1)).tolist()
    it = eng.stream_ids(ids, max_new_tokens=1000, temperature=1.0, seed=0)
    for _ in range(24): next(it)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(64): next(it)
    torch.cuda.synchronize(); plain = (time.perf_counter() - t0) / 64 * 1e3
    pr = cProfile.Profile(); pr.enable(); t0 = time.perf_counter()
    for _ in range(64): next(it)
    torch.cuda.synchronize(); pr.disable(); prof = (time.perf_counter() - t0) / 64 * 1e3
    print(f"=== prefetch={pref} ms/token plain {plain:.2f} profiled {prof:.2f}")
    s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats("tottime").print_stats(30); print(s.getvalue()[:6000])
    s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats("cumtime").print_stats("layerwise|prefetch|cache|predictor|slot_table|policies", 30); print(s.getvalue()[:6000])
    it.close(); eng.close()
