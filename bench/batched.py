"""Batched decode: tokens/s, per-token step latency and expert bytes per token against batch size.

B sequences decoded together share every expert unit they route to in a step, so bytes copied per
token fall while a step's time grows. One engine per run (a bench geometry with random weights, as
in bench/decode.py), the same prompts' lengths at every batch size; `--latency-ms` also runs the
continuous-batching controller over a queue of 2 x max(batches) prompts.

    python bench/batched.py --geometry qwen3-30b-a3b --layers 12 --budget 8 --batches 1 2 4 8 --out DIR
    python bench/batched.py --geometry qwen3-30b-a3b --layers 12 --budget 8 --latency-ms 150 --out DIR
    python bench/batched.py --quick --out DIR          # CPU smoke run (CI)

Times cover decode steps only (prefill excluded); a step's wall time, sampling included, is the
latency every sequence in it sees for one token. Sampling at temperature 1 from a fixed seed, as
bench/decode.py does (greedy random-weight models loop on the same experts).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode import GEOMETRIES, device_name, load_engine, sync
from edgeprism.errors import BudgetError
from edgeprism.models.checkpoint import MemoryCheckpoint
from edgeprism.runtime.batched import BatchedGeneration, BatchResult, p95
from edgeprism.sampling import Sampling

GiB = 2**30


def prompts_for(n: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def run_batch(engine: Any, counts: dict[str, int], prompts: list[list[int]], tokens: int, max_batch: int,
              latency_ms: float | None = None) -> BatchResult:
    # counts: this bench's token counters, shared by every run on the engine (the cache policy's clock)
    sampling = Sampling(temperature=1.0, seed=0)
    run = BatchedGeneration(engine, counts, [tokens + 1] * len(prompts), sampling, max_batch=max_batch,
                            latency_ms=latency_ms)
    return run.run(prompts)


def summary(result: BatchResult) -> dict[str, Any]:
    steps, n = result.step_seconds, result.decode_tokens
    return {"tokens_per_s": n / sum(steps), "p50_ms": statistics.median(steps) * 1e3, "p95_ms": p95(steps) * 1e3,
            "bytes_h2d_per_token": result.decode_bytes_h2d / n, "steps": len(steps), "decode_tokens": n,
            "mean_batch": n / len(steps)}


def measure(engine: Any, counts: dict[str, int], prompts: list[list[int]], args: argparse.Namespace,
            max_batch: int, latency_ms: float | None = None) -> dict[str, Any]:
    """Warm up on the same prompts (kernels, cache contents), then one measured run."""
    device = engine.device
    run_batch(engine, counts, prompts[:max_batch], args.warmup, max_batch)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    rec = summary(run_batch(engine, counts, prompts, args.tokens, max_batch, latency_ms))
    rec["wall_s"] = time.perf_counter() - t0  # prefill included
    if device.type == "cuda":
        rec["peak_vram_gb"] = torch.cuda.max_memory_allocated(device) / GiB
    return rec


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="qwen3-30b-a3b", choices=sorted(GEOMETRIES))
    p.add_argument("--layers", type=int, default=None, help="use this many layers of the geometry")
    p.add_argument("--budget", type=float, default=None, help="vram_gb of the engine (default: what is free)")
    p.add_argument("--cache-fraction", type=float, default=None,
                   help="cap the expert cache at this share of all units (emulate a deeper model's share)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--latency-ms", type=float, default=None, help="also run the latency controller at this target")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens measured per sequence")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--routing", default="model", choices=["model", "uniform"],
                   help="model: the random model's own router; uniform: k distinct experts drawn per token")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--expert-dtype", default=None, help="routed experts stored as bf16/fp16/fp32/int8/int4")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--out", default=None, help="folder for results.json (default bench/results/<date>-<device>-batched)")
    args = p.parse_args(argv)
    if args.quick:
        args.geometry, args.layers, args.budget, args.cache_fraction = "tiny", None, None, 0.1
        args.tokens, args.warmup, args.prompt_len, args.context, args.dtype = 6, 2, 8, 64, "fp32"
        args.latency_ms = args.latency_ms or 1e3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    date, dev = datetime.date.today().isoformat(), device_name(device)
    out = Path(args.out or Path(__file__).parent / "results" / f"{date}-{dev.replace(' ', '_').split('(')[0].strip('_')}-batched")
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    cfg = dict(GEOMETRIES[args.geometry])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    engine = load_engine(MemoryCheckpoint(cfg, seed=0), args.budget, args)
    counts = {"tokens": 0, "prompt_tokens": 0, "forward_tokens": 0}
    prompts = prompts_for(2 * max(args.batches), args.prompt_len, engine.spec.vocab_size)
    runs = [("edgeprism-batched", b, None) for b in args.batches]
    runs += [("edgeprism-batched-slo", None, args.latency_ms)] if args.latency_ms else []
    records = []
    for system, batch, latency in runs:
        if batch is None:  # the controller may grow to the largest batch that ran (the KV budget refuses more)
            fitted = [r["batch"] for r in records if r["system"] == "edgeprism-batched"]
            if not fitted:
                print("skip the latency run: no fixed batch fitted the budget", file=sys.stderr)
                continue
            batch = max(fitted)
        n = batch if latency is None else len(prompts)  # fixed batch: exactly `batch` sequences throughout
        try:
            rec = {"system": system, "batch": batch, "latency_ms": latency,
                   **measure(engine, counts, prompts[:n], args, batch, latency)}
        except BudgetError as e:
            print(f"skip batch {batch}: {e}", file=sys.stderr)
            continue
        records.append(rec)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}), file=sys.stderr)
    s = engine.stats()
    for r in records:
        r.update(model=args.geometry, layers=engine.spec.n_layers, vram_gb=args.budget, cache_fraction=args.cache_fraction,
                 cache_slots=s["cache_slots"], total_units=s["total_units"], expert_dtype=s["expert_dtype"],
                 routing=args.routing, prompt_len=args.prompt_len, device=dev, command=command, date=date,
                 torch=torch.__version__)
    engine.close()
    gc.collect()
    (out / "results.json").write_text(json.dumps(records, indent=1))
    print(f"wrote {len(records)} records to {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
