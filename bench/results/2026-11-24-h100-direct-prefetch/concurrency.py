"""Does the staging kernel on a forked side stream run beside compute inside a captured CUDA graph?
A chain of small matmuls (main) and one staging copy of a bf16 Qwen3 expert (side), alone and together,
eager and as one graph. PYTHONPATH=$PWD python3 <this file>"""
import json
import time

import torch

from edgeprism.models import fused_triton

W = 9437184 // 4
src = torch.randint(-2**31, 2**31 - 1, (4, W), dtype=torch.int32).pin_memory()
dst = torch.zeros(4, W, dtype=torch.int32, device="cuda")
rows = torch.arange(4, device="cuda").reshape(4, 1)
layer_map = torch.full((4, 1), -1, device="cuda")
codes = torch.zeros(1, dtype=torch.long, device="cuda")
ids = torch.zeros(1, dtype=torch.long, device="cuda")
a = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
side = torch.cuda.Stream()


def main_chain(n):
    x = a
    for _ in range(n):
        x = torch.mm(x, w)
    return x


def stage():
    fused_triton.stage(ids, layer_map, rows, src, dst, codes, 0, 1)


def both(n):
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        stage()
    x = main_chain(n)
    torch.cuda.current_stream().wait_stream(side)
    return x


def timeit(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


for n in (10, 30, 60):
    rec = {"matmuls": n}
    for mode, wrap in (("eager", lambda f: f), ("graph", graphed)):
        rec[f"{mode}_main_us"] = round(timeit(wrap(lambda n=n: main_chain(n))), 1)
        rec[f"{mode}_stage_us"] = round(timeit(wrap(stage)), 1)
        rec[f"{mode}_both_us"] = round(timeit(wrap(lambda n=n: both(n))), 1)
    print(json.dumps(rec), flush=True)
