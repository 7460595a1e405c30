"""Per-call time of the native CPU expert kernel by unit count — what the CPU share of direct decode
pays per layer (schedule/cpu_share.py). Qwen3-30B-A3B units, rows rotated over `--arena-gb` of
(optionally pinned) host RAM; with `--pcie` a CUDA stream copies host→device all the while, as
direct decode's kernels read host RAM while the CPU computes.

    python3 bench/cpu_share_probe.py --out FILE [--dtypes bf16 int4] [--units 1 2 4 8] [--threads 14]
        [--pin] [--pcie] [--weights random|quantized]

`--weights quantized` packs int4 rows from normal weights (as a model load does) instead of random
bytes with synthetic scales.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cpu_experts import D, IG, make_arena, unit_format  # noqa: E402
from edgeprism.schedule.cpu_experts import CpuExperts, default_threads  # noqa: E402


def quantized_arena(fmt, rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    base = torch.stack([fmt.pack(*(torch.randn(*shape, generator=gen) * 0.02 for shape in ((IG, D), (IG, D), (D, IG))))
                        for _ in range(16)])
    return base.repeat((rows + 15) // 16, 1)[:rows].contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "int4"])
    p.add_argument("--units", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--threads", type=int, nargs="+", default=None)
    p.add_argument("--arena-gb", type=float, default=2.0)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--pin", action="store_true")
    p.add_argument("--pcie", action="store_true")
    p.add_argument("--weights", choices=["random", "quantized"], default="random")
    args = p.parse_args()
    stop = threading.Event()
    if args.pcie:
        src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device="cuda")
        stream = torch.cuda.Stream()

        def pump() -> None:
            with torch.cuda.stream(stream):
                while not stop.is_set():
                    dst.copy_(src, non_blocking=True)
                    stream.synchronize()

        threading.Thread(target=pump, daemon=True).start()
    records = []
    gen = torch.Generator().manual_seed(1)
    for name in args.dtypes:
        fmt = unit_format(name)
        rows = int(args.arena_gb * 2**30 // fmt.unit_bytes)
        arena = quantized_arena(fmt, rows) if args.weights == "quantized" and fmt.quantized else make_arena(fmt, rows)
        if args.pin:
            arena = arena.pin_memory()
        x = torch.randn(1, D, generator=gen).to(fmt.compute_dtype)
        for threads in args.threads or [max(1, default_threads() - 1)]:
            path = CpuExperts(fmt, threads, "native")
            for n in args.units:
                w = torch.rand(n, generator=gen)
                times = []
                for _ in range(args.iters):
                    sel = sorted(torch.randperm(rows, generator=gen)[:n].tolist())
                    t0 = time.perf_counter()
                    path(x, arena, sel, w)
                    times.append(time.perf_counter() - t0)
                    time.sleep(0.0003)  # a decode layer's gap between calls
                times.sort()
                med = times[len(times) // 2]
                rec = {"dtype": name, "units": n, "threads": threads, "pin": args.pin, "pcie": args.pcie,
                       "weights": args.weights, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                       "ms_median": med * 1e3, "ms_min": times[0] * 1e3,
                       "gb_s_median": n * fmt.unit_bytes / med / 1e9}
                print(json.dumps(rec), flush=True)
                records.append(rec)
    stop.set()
    Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
