"""Prefetch, measured: predictor recall per layer, and whether copies really overlap compute.

    # next-layer recall of the trained default model while decoding held-out text (any device)
    python bench/prefetch.py recall [--device cuda --compare] --out bench/results/<date>-<device>/recall.json
    # a CUDA timeline (torch.profiler) of offloaded decode with prefetch on and off: copy time,
    # kernel time, and how much copy time ran under a kernel, per token
    python bench/prefetch.py timeline --geometry qwen3-30b-a3b --layers 12 --vram-gb 8 --out DIR
    # how much any predictor could gain: prefetch off, pre-gating, and a perfect (oracle) prediction,
    # interleaved in one engine, with the GPU time of copies and compute and the host's time per token
    python bench/prefetch.py ceiling --geometry qwen3-30b-a3b --layers 12 --vram-gb 8 --routing token --out F
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
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
from edgeprism.runtime.layerwise import LayerwiseDecode  # noqa: E402


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



class OracleDecode(LayerwiseDecode):
    """Bench-only: the layerwise step with its prediction switchable between off, pre-gating (the
    engine's own predictor) and an oracle that knows what the next layers will route.

    The oracle replays a recording: one decode of the same prompt and sampling seed first logs every
    layer's routing by (position, token, MoE layer); a later decode of that prompt routes the same
    way (the same tokens through the same weights), so the routing of layer j+d is known while layer
    j is served. It only rewrites the candidates the host reads (`host_cand`): sizing, the copy budget,
    the idle rule and the precision gate act on them as on a real prediction, and the predictor's
    graph still runs, so its GPU and host cost are the same in both modes. `instrument` adds CUDA
    events around each segment (its GPU time) and host clocks around each layer's service.
    """

    mode = "pregate"
    recording = False
    instrument = False

    def setup(self) -> None:
        self._own_predictor = self.predictor
        self.record: dict[tuple[int, int, int], list[int]] = {}
        self.reset_counts()

    def reset_counts(self) -> None:
        self.oracle_served = self.oracle_missing = self.route_mismatch = 0
        self.host_s = 0.0
        self._seg_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self.predictor = None if mode == "off" else self._own_predictor
        self._idle = [0] * self.M  # each variant starts with no layer idle or paused
        self.fetch._copy_precision.clear()
        self.fetch._skipped.clear()

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        self._key = (pos, token)
        return super().__call__(token, pos)

    def _serve_layer(self, j: int) -> list:
        t0 = time.perf_counter()
        held = super()._serve_layer(j)
        self.host_s += time.perf_counter() - t0
        key = (*self._key, j)
        route = self.host_route.tolist()  # layer j's routing (rewritten only at the next layer)
        if self.recording:
            self.record[key] = route
        elif key in self.record and self.record[key] != route:
            self.route_mismatch += 1
        return held

    def _prefetch(self, j: int, experts: list[int], step: int, layer: int) -> None:
        if self.mode == "oracle":
            if self.predicted is not None:
                self.predicted.synchronize()
            C = self.host_cand.shape[1]
            for d in range(1, self.lookahead + 1):
                want = self.record.get((*self._key, j + d))
                if want is None:
                    self.oracle_missing += j + d < self.M
                    continue
                own = [e for e in self.host_cand[d - 1].tolist() if e not in want]
                self.host_cand[d - 1] = torch.tensor((want + own)[:C])
                self.host_p[d - 1] = torch.linspace(1.0, 0.0, C)  # the routed experts rank first
                self.oracle_served += 1
        super()._prefetch(j, experts, step, layer)

    def _run(self, j: int, length: int) -> None:
        if not self.instrument or self.compute is None:
            super()._run(j, length)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.compute)  # after any wait for copies queued before it: the segment's own time
        super()._run(j, length)
        end.record(self.compute)
        self._seg_events.append((start, end))

    def segment_seconds(self) -> float:
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self._seg_events) / 1e3


CEILING_VARIANTS = {  # name: (prediction, copy budget on, idle rule on)
    "off": ("off", True, True),
    "pregate": ("pregate", True, True),
    "oracle": ("oracle", True, True),
    "oracle-all": ("oracle", False, False),  # every predicted missing unit copied, every layer
}


def _ceiling_decode(engine: Any, ids: list[int], args: argparse.Namespace, defaults: tuple[Any, int],
                    mode: str, budget: bool, idle: bool, instrument: bool = False) -> dict[str, Any]:
    """One decode of the recorded sequence in a variant; figures over `args.tokens` after the warm-up."""
    step, copies = engine.decode_step, engine.fetch.engine
    cuda = engine.device.type == "cuda"
    copy_unit_s, idle_after = defaults
    step.set_mode(mode)
    step.copy_unit_s = copy_unit_s if budget else None
    step.idle_after = idle_after if idle else 1 << 30
    it = engine.stream_ids(ids, max_new_tokens=args.warmup + args.tokens + 1, temperature=1.0, seed=0)
    for _ in range(args.warmup + 1):
        next(it)
    engine.reset_stats()
    step.reset_counts()
    step.instrument = instrument
    if hasattr(copies, "timed"):
        copies.timed = instrument
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.tokens):
        next(it)
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.tokens * 1e3
    it.close()
    s = engine.stats()
    rec = {"ms_per_token": ms, "hit_rate": s["hit_rate"], "bytes_h2d_per_token": s["bytes_h2d"] / args.tokens,
           "stall_ms_per_token": s["stall_s"] * 1e3 / args.tokens,
           "host_serve_ms_per_token": step.host_s * 1e3 / args.tokens,
           "route_mismatches": step.route_mismatch, "oracle_served": step.oracle_served,
           "oracle_missing": step.oracle_missing,
           **{k: s[k] for k in ("prefetch_recall", "prefetch_precision", "prefetch_units", "prefetch_paused",
                                "prefetch_idle_skips", "prefetch_bytes_used", "prefetch_bytes_wasted")}}
    if instrument and cuda:
        rec["segments_gpu_ms_per_token"] = step.segment_seconds() * 1e3 / args.tokens
        rec["copies_gpu_ms_per_token"] = copies.copy_seconds() * 1e3 / args.tokens
        copies.timed, step.instrument = False, False
    return rec


def _ceiling_format(source: MemoryCheckpoint, vocab: int, args: argparse.Namespace, dtype: str) -> list[dict[str, Any]]:
    from bench.decode import set_routing

    kw = {"cache_fraction": args.cache_fraction} if args.cache_fraction is not None else {}
    engine = edgeprism.load(source, vram_gb=args.vram_gb, device=args.device, dtype="bf16", max_context=1024,
                            prefetch=True, lookahead=args.lookahead, expert_dtype=None if dtype == "bf16" else dtype, **kw)
    try:
        set_routing(engine, args.routing)
        step = engine.decode_step
        if not isinstance(step, LayerwiseDecode):
            reason = "every expert fits the budget" if engine.experts.slot_map is not None else type(step).__name__
            print(f"{dtype}: skipped, no dynamic cache to prefetch into ({reason}); lower --cache-fraction",
                  file=sys.stderr)
            return [{"expert_dtype": dtype, "skipped": reason}]
        step.__class__ = OracleDecode
        step.setup()
        defaults = (step.copy_unit_s, step.idle_after)
        ids = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        # the recording: the sequence every later decode repeats
        step.set_mode("off")
        step.recording = True
        for _ in engine.stream_ids(ids, max_new_tokens=args.warmup + args.tokens + 1, temperature=1.0, seed=0):
            pass
        step.recording = False
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
        for r in range(args.rounds):
            order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
            for v in order:
                runs[v].append(_ceiling_decode(engine, ids, args, defaults, *CEILING_VARIANTS[v]))
        timed = {v: _ceiling_decode(engine, ids, args, defaults, *CEILING_VARIANTS[v], instrument=True)
                 for v in args.variants}
        base = statistics.median(x["ms_per_token"] for x in runs["off"]) if "off" in runs else None
        out = []
        for v in args.variants:
            ms = [x["ms_per_token"] for x in runs[v]]
            med = statistics.median(ms)
            last = runs[v][-1]
            rec = {"expert_dtype": dtype, "variant": v, "ms_per_token_median": med, "ms_per_token_runs": ms,
                   "tokens_per_s": 1e3 / med, "speedup_vs_off": base / med if base else None,
                   **{k: last[k] for k in last if k != "ms_per_token"}, "instrumented": timed[v],
                   "geometry": args.geometry, "layers": args.layers, "vram_gb": args.vram_gb, "routing": args.routing,
                   "lookahead": args.lookahead, "tokens": args.tokens, "warmup": args.warmup, "rounds": args.rounds,
                   "cache_slots": engine.cache.num_slots, "total_units": engine.plan.total_units}
            out.append(rec)
            print(json.dumps({k: rec[k] for k in ("expert_dtype", "variant", "tokens_per_s", "speedup_vs_off",
                                                  "hit_rate", "prefetch_recall", "prefetch_precision")}), file=sys.stderr)
        return out
    finally:
        engine.close()


def ceiling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Prefetch off / pre-gating / oracle in one engine per expert format, interleaved over rounds
    (figures move ±10-25% between engines and machines, so they are compared inside one engine)."""
    from bench.decode import GEOMETRIES

    cfg = dict(GEOMETRIES[args.geometry], num_hidden_layers=args.layers)
    source = MemoryCheckpoint(cfg, seed=0)
    return [rec for dtype in args.expert_dtypes for rec in _ceiling_format(source, cfg["vocab_size"], args, dtype)]


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
    c = sub.add_parser("ceiling", help="prefetch off / pre-gating / oracle prediction, interleaved in one engine")
    c.add_argument("--geometry", default="qwen3-30b-a3b")
    c.add_argument("--layers", type=int, default=12)
    c.add_argument("--vram-gb", type=float, default=8)
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--routing", default="token", choices=["model", "uniform", "token"], help="as bench/decode.py's")
    c.add_argument("--expert-dtypes", nargs="+", default=["bf16"], help="bf16, int8, int4")
    c.add_argument("--cache-fraction", type=float, default=None)
    c.add_argument("--lookahead", type=int, default=1)
    c.add_argument("--variants", nargs="+", default=list(CEILING_VARIANTS), choices=list(CEILING_VARIANTS))
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--tokens", type=int, default=64)
    c.add_argument("--warmup", type=int, default=32)
    c.add_argument("--prompt-len", type=int, default=64)
    for sp in (r, t, c):
        sp.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    command = "python bench/prefetch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: Any = {"recall": recall, "timeline": timeline, "ceiling": ceiling}[args.mode](args)
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
