"""Where a decode step's time goes: torch.profiler over a few steps (GPU), top ops by CPU and CUDA time.

    python bench/profile_decode.py --geometry olmoe-1b-7b --layers 8 [--vram-gb 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgeprism  # noqa: E402
from bench.decode import GEOMETRIES  # noqa: E402
from edgeprism.models.checkpoint import MemoryCheckpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="olmoe-1b-7b", choices=sorted(GEOMETRIES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vram-gb", type=float, default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    cfg = dict(GEOMETRIES[args.geometry], num_hidden_layers=args.layers)
    engine = edgeprism.load(MemoryCheckpoint(cfg), vram_gb=args.vram_gb, dtype="bf16", max_context=1024)
    ids = torch.randint(0, cfg["vocab_size"], (64,), generator=torch.Generator().manual_seed(1)).tolist()
    it = engine.stream_ids(ids, max_new_tokens=1000, temperature=0.0)
    for _ in range(8):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(it)
    print(f"{(time.perf_counter() - t0) / args.steps * 1e3:.2f} ms/token without profiler")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            next(it)
    avg = prof.key_averages()
    print(avg.table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(avg.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
