"""Prefetch, measured: predictor recall per layer, and whether copies really overlap compute.

    # next-layer recall of the trained default model while decoding held-out text (any device)
    python bench/prefetch.py recall [--device cuda --compare] --out bench/results/<date>-<device>/recall.json
    # a CUDA timeline (torch.profiler) of offloaded decode with prefetch on and off: copy time,
    # kernel time, and how much copy time ran under a kernel, per token
    python bench/prefetch.py timeline --geometry qwen3-30b-a3b --layers 12 --vram-gb 8 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgeprism  # noqa: E402
from edgeprism.corpus import HELDOUT, token_stream  # noqa: E402
from edgeprism.models.checkpoint import MemoryCheckpoint  # noqa: E402


def recall(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode held-out prompts with a small cache, prefetch on then off; the prefetcher scores
    every prediction. Decode time excludes prefill (timed per token after the first)."""
    out = []
    for prefetch in (True, False) if args.compare else (True,):
        engine = edgeprism.load(None, device=args.device, cache_fraction=args.cache_fraction,
                                lookahead=args.lookahead, prefetch=prefetch)
        stream = token_stream(engine.tokenizer, args.prompts * 64, eos_id=0, path=HELDOUT)
        decode_s, decoded = 0.0, 0
        for i in range(args.prompts):
            it = engine.stream_ids(stream[i * 64:i * 64 + 32], max_new_tokens=args.tokens, temperature=0.0)
            next(it)  # prefill
            t0 = time.perf_counter()
            n = sum(1 for _ in it)
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            decode_s, decoded = decode_s + time.perf_counter() - t0, decoded + n
        s = engine.stats()
        out.append({"model": "default", "device": args.device, "cache_fraction": args.cache_fraction,
                    "prefetch": prefetch, "lookahead": args.lookahead, "prompts": args.prompts,
                    "tokens_per_prompt": args.tokens, "top_k": engine.spec.top_k,
                    "num_experts": engine.spec.num_experts, "random_recall": engine.spec.top_k / engine.spec.num_experts,
                    "decode_tokens_per_s": decoded / decode_s, "hit_rate": s["hit_rate"],
                    "bytes_h2d_per_token": s["bytes_h2d"] / max(1, s["tokens"]),
                    "stall_ms_per_token": s["stall_s"] * 1e3 / max(1, s["tokens"]),
                    **{k: v for k, v in s.items() if k.startswith("prefetch_")}})
        engine.close()
    return out


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def timeline_summary(trace_path: Path) -> dict[str, float]:
    """Copy (HtoD memcpy) and kernel busy time from a chrome trace, and their overlap (µs)."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    copies, kernels = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", ""):
            copies.append(span)
        elif e.get("cat") == "kernel":
            kernels.append(span)
    cu, ku = _union(copies), _union(kernels)
    copy_us, kernel_us = sum(b - a for a, b in cu), sum(b - a for a, b in ku)
    both = _overlap(cu, ku)
    return {"copy_us": copy_us, "kernel_us": kernel_us, "overlap_us": both,
            "copy_under_kernel_share": both / copy_us if copy_us else 0.0}


def timeline(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.decode import GEOMETRIES, set_routing

    cfg = dict(GEOMETRIES[args.geometry], num_hidden_layers=args.layers)
    source = MemoryCheckpoint(cfg, seed=0)
    out = []
    for prefetch in (True, False):
        engine = edgeprism.load(source, vram_gb=args.vram_gb, dtype="bf16", max_context=1024, prefetch=prefetch,
                                expert_dtype=args.expert_dtype, cache_fraction=args.cache_fraction)
        set_routing(engine, args.routing)
        ids = torch.randint(0, cfg["vocab_size"], (64,), generator=torch.Generator().manual_seed(1)).tolist()
        it = engine.stream_ids(ids, max_new_tokens=1000, temperature=1.0, seed=0)
        for _ in range(args.warmup):
            next(it)
        engine.reset_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        torch.cuda.synchronize()
        plain_ms = (time.perf_counter() - t0) / args.steps * 1e3
        stats = engine.stats()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                next(it)
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            summary = timeline_summary(path)
        it.close()
        rec = {"prefetch": prefetch, "ms_per_token": plain_ms, "tokens_per_s": 1e3 / plain_ms,
               **{k: v / args.steps / 1e3 for k, v in summary.items() if k.endswith("_us")},
               "copy_under_kernel_share": summary["copy_under_kernel_share"],
               "stall_ms_per_token": stats["stall_s"] * 1e3 / args.steps, "hit_rate": stats["hit_rate"],
               "prefetch_recall": stats["prefetch_recall"], "prefetch_precision": stats["prefetch_precision"],
               "bytes_per_token": stats["bytes_h2d"] / args.steps}
        rec = {k.replace("_us", "_ms_per_token") if k.endswith("_us") else k: v for k, v in rec.items()}
        out.append(rec)
        print(json.dumps(rec), file=sys.stderr)
        engine.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("recall")
    r.add_argument("--device", default="cpu")
    r.add_argument("--cache-fraction", type=float, default=0.3)
    r.add_argument("--lookahead", type=int, default=1)
    r.add_argument("--prompts", type=int, default=16)
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--compare", action="store_true", help="also run with prefetch off")
    t = sub.add_parser("timeline")
    t.add_argument("--geometry", default="qwen3-30b-a3b")
    t.add_argument("--layers", type=int, default=12)
    t.add_argument("--vram-gb", type=float, default=8)
    t.add_argument("--steps", type=int, default=16)
    t.add_argument("--warmup", type=int, default=8)
    t.add_argument("--routing", default="model", choices=["model", "uniform", "token"], help="as bench/decode.py's")
    t.add_argument("--expert-dtype", default=None)
    t.add_argument("--cache-fraction", type=float, default=None)
    for sp in (r, t):
        sp.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    command = "python bench/prefetch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: Any = recall(args) if args.mode == "recall" else timeline(args)
    meta = {"command": command, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    doc = {"meta": meta, "results": result}
    text = json.dumps(doc, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
