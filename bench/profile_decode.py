"""Where a decode step's time goes: torch.profiler over a few steps (GPU), top ops by CPU and CUDA time,
and a per-step kernel summary (how many kernels a token launches, their summed GPU time against the
step's wall time: the difference is launch gaps and idle time).

    python bench/profile_decode.py --geometry olmoe-1b-7b --layers 8 [--vram-gb 8] [--schedule direct]
    python bench/profile_decode.py --geometry qwen3-30b-a3b --layers 12 --schedule direct --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgeprism  # noqa: E402
from bench.decode import GEOMETRIES  # noqa: E402
from edgeprism.models.checkpoint import MemoryCheckpoint  # noqa: E402


def kernel_summary(prof: torch.profiler.profile, steps: int, layers: int, wall_ms: float, rows: int) -> dict:
    """Kernels per token and per layer, their summed GPU time, and the heaviest kernels by name."""
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            rec = by_name[ev.name]
            rec[0] += 1
            rec[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    n = sum(r[0] for r in by_name.values())
    gpu_us = sum(r[1] for r in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:rows]
    return {"wall_ms_per_token": wall_ms, "kernels_per_token": n / steps, "kernels_per_layer": n / steps / layers,
            "kernel_ms_per_token": gpu_us / steps / 1e3, "kernel_us_per_layer": gpu_us / steps / layers,
            "top": [{"name": k[:90], "per_token": c / steps, "us_per_token": t / steps} for k, (c, t) in top]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="olmoe-1b-7b", choices=sorted(GEOMETRIES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vram-gb", type=float, default=None)
    p.add_argument("--schedule", default="fetch")
    p.add_argument("--expert-dtype", default=None)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--tables", action="store_true", help="also print torch.profiler's op tables")
    p.add_argument("--json", default=None, help="write the kernel summary here")
    args = p.parse_args()
    cfg = dict(GEOMETRIES[args.geometry], num_hidden_layers=args.layers)
    engine = edgeprism.load(MemoryCheckpoint(cfg), vram_gb=args.vram_gb, dtype="bf16", max_context=1024,
                            schedule=args.schedule, expert_dtype=args.expert_dtype, cuda_graphs=not args.no_graphs)
    ids = torch.randint(0, cfg["vocab_size"], (64,), generator=torch.Generator().manual_seed(1)).tolist()
    it = engine.stream_ids(ids, max_new_tokens=1000, temperature=0.0)
    for _ in range(16):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(it)
    wall = (time.perf_counter() - t0) / args.steps * 1e3
    print(f"{wall:.2f} ms/token without profiler")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            next(it)
    summary = kernel_summary(prof, args.steps, args.layers, wall, args.rows)
    summary.update(geometry=args.geometry, layers=args.layers, vram_gb=args.vram_gb, schedule=args.schedule,
                   expert_dtype=args.expert_dtype, graphs=not args.no_graphs, device=torch.cuda.get_device_name()
                   if torch.cuda.is_available() else "cpu", command=" ".join(sys.argv))
    print(json.dumps({k: v for k, v in summary.items() if k != "top"}, indent=1))
    for row in summary["top"]:
        print(f"{row['per_token']:7.1f}/tok {row['us_per_token']:9.1f} us/tok  {row['name']}")
    if args.tables:
        avg = prof.key_averages()
        print(avg.table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        print(avg.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
