"""The CPU expert path's effective read bandwidth, Qwen3-30B-A3B units (D 2048, Ig 768), batch 1.

    python3 bench/cpu_experts.py --out FILE [--threads N [N ...]] [--arena-gb 4] [--iters 20]

One decode layer = 8 units computed by `schedule.cpu_experts.CpuExperts` in one call, for bf16 and
fp32 rows (and, with `--dtypes int8 int4`, quantized rows: `moe/quant.py`, computed for a bf16 model;
"torch" then means the format's own `cpu_grouped`) and each implementation (`native` C kernel, `torch` strided bmm over runs of rows, `unit`
one mv per unit), with the 8 units either adjacent rows (one expert's groups, or the planner's
key-ordered CPU units) or scattered. Rows are rotated over an arena of `--arena-gb` so the weights come
from DRAM, not the last-level cache. "GB/s" = bytes of the units' stored rows (weights, plus scales for
quantized rows) ÷ time per call; next to it
a plain read of the same arena by torch (`sum` over 64 MiB blocks, same threads) as the machine's
reachable read bandwidth. Each record also carries the max error against `moe/kernels.grouped_swiglu`.
Last, per dtype, the scheduler's `CostModel` as `schedule.cost.calibrate` measures it here (PCIe by
copy size on a GPU; the CPU path's fixed and per-unit cost), unless `--no-calibrate`.
Issue 8's target on the H100 box: ≥ 60 GB/s at batch 1.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeprism.moe.kernels import grouped_swiglu
from edgeprism.moe.quant import UnitFormat, make_format
from edgeprism.schedule import native
from edgeprism.schedule.cost import calibrate
from edgeprism.schedule.cpu_experts import CpuExperts, default_threads

D, IG, UNITS = 2048, 768, 8


def row_sets(rows_total: int, iters: int, layout: str, gen: torch.Generator) -> list[list[int]]:
    """`iters` sets of UNITS rows spread over the whole arena (so every call reads cold memory)."""
    step = max(UNITS, rows_total // iters)
    out = []
    for i in range(iters):
        first = (i * step) % (rows_total - UNITS)
        if layout == "adjacent":
            out.append(list(range(first, first + UNITS)))
        else:
            out.append(sorted(torch.randperm(rows_total, generator=gen)[:UNITS].tolist()))
    return out


def read_bandwidth(arena: torch.Tensor, iters: int) -> float:
    """torch's plain read rate over the arena (sum of 64 MiB blocks), bytes/s."""
    flat = arena.view(-1) if arena.is_floating_point() else arena.view(torch.int64).view(-1)  # bytes: int64 sums as fast
    block = (64 << 20) // flat.element_size()
    blocks = [flat[i:i + block] for i in range(0, flat.numel() - block + 1, block)][:max(iters, 4)]
    blocks[0].sum()
    t0 = time.perf_counter()
    for b in blocks:
        b.sum()
    return len(blocks) * block * flat.element_size() / (time.perf_counter() - t0)


def unit_format(name: str) -> UnitFormat:
    """Dense rows in their own dtype; quantized rows of a bf16 model."""
    dense = {"bf16": torch.bfloat16, "fp32": torch.float32}
    return make_format(None, D, IG, dense[name]) if name in dense else make_format(name, D, IG, torch.bfloat16)


def make_arena(fmt: UnitFormat, rows: int) -> torch.Tensor:
    """[rows, row_numel] of random units, filled in slices (no fp32 temporary of the whole arena)."""
    arena = torch.empty(rows, fmt.row_numel, dtype=fmt.row_dtype)
    for i in range(0, rows, 64):
        if not fmt.quantized:
            arena[i:i + 64].normal_(0, 0.02)
            continue
        arena[i:i + 64].random_(0, 256)  # any bytes are valid weights; scales (and minimums) must be finite
        p = fmt.parts(arena[i:i + 64])
        for t in (p.s13, p.s2):
            t.uniform_(1e-4, 2e-3)
        for t in (p.m13, p.m2):
            if t is not None:
                t.uniform_(-0.02, -0.01)
    return arena


def bench(name: str, impl: str, layout: str, arena: torch.Tensor, threads: int, iters: int) -> dict[str, Any]:
    fmt = unit_format(name)
    path = CpuExperts(fmt, threads, impl)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, D, generator=gen).to(fmt.compute_dtype)
    w = torch.rand(UNITS, generator=gen)
    sets = row_sets(arena.shape[0], iters, layout, gen)
    w13, w2 = (t.float() for t in fmt.dequantize(fmt.parts(arena), torch.tensor(sets[0])))
    ref = grouped_swiglu(x.float(), w13, w2, torch.arange(UNITS), torch.zeros(UNITS, dtype=torch.long), w)
    err = (path(x, arena, sets[0], w).float() - ref.float()).abs().max().item()
    times = []
    for rows in sets[1:]:
        t0 = time.perf_counter()
        path(x, arena, rows, w)
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    nbytes = UNITS * fmt.unit_bytes
    return {"dtype": name, "impl": path.impl, "layout": layout, "threads": threads,
            "units": UNITS, "unit_bytes": fmt.unit_bytes, "ms_median": med * 1e3, "ms_min": times[0] * 1e3,
            "gb_s_median": nbytes / med / 1e9, "gb_s_best": nbytes / times[0] / 1e9,
            "max_abs_err_vs_grouped_swiglu": err, "ref_max_abs": ref.abs().max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="CPU threads, one run each (default: CPUs - 1)")
    p.add_argument("--arena-gb", type=float, default=4.0, help="bytes of rows to rotate over, per dtype")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "int8", "int4"])
    p.add_argument("--impls", nargs="+", default=["native", "torch", "unit"])
    p.add_argument("--no-calibrate", action="store_true", help="skip recording schedule.cost.calibrate's model")
    args = p.parse_args()
    thread_counts = args.threads or [default_threads()]
    records: list[dict[str, Any]] = []
    for name in args.dtypes:
        fmt = unit_format(name)
        arena = make_arena(fmt, max(4 * UNITS, int(args.arena_gb * 1e9 / fmt.unit_bytes)))
        for threads in thread_counts:
            done: set[tuple[str, str]] = set()
            torch.set_num_threads(threads)
            stream = read_bandwidth(arena, args.iters)
            for impl, layout in itertools.product(args.impls, ("adjacent", "scattered")):
                if impl == "native" and native.load() is None:
                    continue
                if (CpuExperts(fmt, threads, impl).impl, layout) in done:
                    continue  # quantized rows: "torch" and "unit" are both the format's own path
                rec = bench(name, impl, layout, arena, threads, args.iters)
                done.add((rec["impl"], layout))
                rec["torch_read_gb_s"] = stream / 1e9
                records.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
        if not args.no_calibrate:  # the scheduler's cost model of these units on this machine
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = calibrate(fmt, [arena], device, threads=thread_counts[0])
            records.append({"dtype": name, "cost_model": model.to_json(),
                            "copy_unit_s": model.copy_unit_s, "cpu_unit_s": model.cpu_unit_s})
            print(json.dumps(records[-1]), file=sys.stderr, flush=True)
        del arena
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "host": platform.node(),
            "torch": torch.__version__, "threads": thread_counts, "cpus": os.cpu_count(), "arena_gb": args.arena_gb,
            "iters": args.iters,
            "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1))


if __name__ == "__main__":
    main()
