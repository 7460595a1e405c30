"""Decode tokens/s against VRAM budget, edgeprism next to what users would pick instead.

Real MoE geometries with random bf16 weights (made in memory, layer count reducible), or any local
HF checkpoint (--model DIR). One run, one machine; writes results.json (a list of records) to --out.

    python bench/decode.py --geometry qwen3-30b-a3b --layers 12 --budgets 4 8 16 --out DIR
    python bench/decode.py --quick --out DIR          # CPU smoke run (CI)

Decoding samples at temperature 1 from a fixed seed: with random weights greedy decoding falls into
repetition loops that route the same experts every step and would flatter every cache.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgeprism  # noqa: E402
from bench.baselines import LruExpertOffload, accelerate_model, install  # noqa: E402
from edgeprism.models.checkpoint import Checkpoint, MemoryCheckpoint  # noqa: E402
from edgeprism.schedule.qos import OperatingPoints  # noqa: E402

GiB = 2**30
ROOT = Path(__file__).resolve().parent.parent

GEOMETRIES: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
                          norm_topk_prob=True, rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6),
    "olmoe-1b-7b": dict(architectures=["OlmoeForCausalLM"], vocab_size=50304, hidden_size=2048, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                        intermediate_size=1024, norm_topk_prob=False, rope_theta=10000.0, max_position_embeddings=4096,
                        rms_norm_eps=1e-5),
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         intermediate_size=14336, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5),
    "qwen1.5-moe-a2.7b": dict(architectures=["Qwen2MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
                              num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                              num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                              intermediate_size=5632, norm_topk_prob=False, rope_theta=1e6,
                              max_position_embeddings=8192, rms_norm_eps=1e-6),
    "tiny": dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=512, hidden_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=32, num_experts_per_tok=4,
                 moe_intermediate_size=256, norm_topk_prob=True, max_position_embeddings=2048),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def h2d_bandwidth(unit_bytes: int, total_bytes: int, device: torch.device) -> dict[str, float]:
    """Plain pinned host→device copies: unit-sized copies and one big copy of `total_bytes`, GB/s."""
    n_units = max(1, total_bytes // unit_bytes)
    pin = device.type == "cuda"
    src = torch.empty(n_units * unit_bytes, dtype=torch.uint8, pin_memory=pin)
    dst = torch.empty_like(src, device=device)
    out = {}
    for name, step in (("unit_copies", unit_bytes), ("one_copy", src.numel())):
        best = float("inf")
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            for off in range(0, src.numel(), step):
                dst[off:off + step].copy_(src[off:off + step], non_blocking=pin)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        out[name] = src.numel() / best / 1e9
    del src, dst
    return out


def decode_run(engine: Any, prompt: list[int], tokens: int, warmup: int, reset, **gen: Any) -> dict[str, Any]:  # noqa: ANN001
    """TTFT, then per-token decode latencies after `warmup` tokens (counters reset at that point);
    `gen`: extra generation options (quality=, latency_ms=)."""
    device = engine.device
    sync(device)
    t0 = time.perf_counter()
    it = engine.stream_ids(prompt, max_new_tokens=warmup + tokens + 1, temperature=1.0, seed=0, **gen)
    next(it)
    ttft = time.perf_counter() - t0
    for _ in range(warmup):
        next(it)
    reset()
    lat, gc_s, gc_full = [], [0.0], [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:  # time spent in Python's collector while measuring
        if phase == "start":
            gc_s.append(-time.perf_counter())
        else:
            gc_s[-1] += time.perf_counter()
            gc_full[0] += info["generation"] == 2

    gc.callbacks.append(on_gc)
    try:
        for _ in range(tokens):
            t = time.perf_counter()
            next(it)
            lat.append(time.perf_counter() - t)
    finally:
        gc.callbacks.remove(on_gc)
    it.close()
    p50 = statistics.median(lat)
    excess = sum(max(0.0, t - 1.5 * p50) for t in lat)  # time in steps slower than 1.5x the median
    lat.sort()
    return {"ttft_ms": ttft * 1e3, "p50_ms": p50 * 1e3,
            "p95_ms": lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1e3,
            "tokens_per_s": len(lat) / sum(lat), "tokens": len(lat), "max_ms": lat[-1] * 1e3,
            "slow_steps": sum(t > 1.5 * p50 for t in lat), "slow_excess_ms": excess * 1e3,
            "gc_ms": sum(x for x in gc_s if x > 0) * 1e3, "gc_full": gc_full[0]}


class UniformRouting:
    """Bench-only replacement of a MoE block's `route`: k distinct experts drawn uniformly per
    token (weights from the real router). Random-weight models route with far more temporal
    locality than trained ones (their hidden states collapse onto a shared direction in deep
    layers), which flatters every cache; uniform routing is the opposite, worst case (no locality
    at all, and nothing a predictor can foresee)."""

    def __init__(self, inner: Any, num_experts: int) -> None:
        self.inner, self.num_experts = inner, num_experts

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = self.inner(x)
        ids = torch.rand(ids.shape[0], self.num_experts, device=ids.device).topk(ids.shape[1], dim=-1).indices
        return weights, ids


# routing="token": the token embeddings scaled by this, so the residual stream stays dominated by
# the current token through every layer (bench/README.md, "Routing")
TOKEN_EMBED_SCALE = 50.0


def set_routing(engine: Any, routing: str) -> None:
    """model: the random model routes itself (deep layers collapse onto a few experts: flattering);
    uniform: UniformRouting (no locality, nothing to predict: the worst case); token: the model routes
    itself with its token embeddings scaled by TOKEN_EMBED_SCALE, so every layer's router input is
    mostly the current token's embedding. Routing then changes with every token (a sampled token is
    nearly uniform over the vocabulary: hardly any locality), yet layer l's hidden state foretells
    layer l + 1's routing, as trained models' slowly-changing residual streams do (pre-gating's
    premise). How well is measured, not assumed: `prefetch_recall` (0.71 on 3 Qwen3-30B-A3B-shaped
    layers on the CPU, against 0.80 for the trained default model)."""
    from edgeprism.moe.layer import MoEBlock

    if routing == "token":
        with torch.no_grad():
            engine.model.embed.weight.mul_(TOKEN_EMBED_SCALE)
    if routing == "uniform":
        for block in engine.model.layers:
            if isinstance(block.ffn, MoEBlock):
                block.ffn.route = UniformRouting(block.ffn.route, engine.spec.num_experts)


def load_engine(source: Any, budget: float | None, args: argparse.Namespace, **kw: Any) -> Any:
    kw.setdefault("cache_fraction", args.cache_fraction)
    engine = edgeprism.load(source, vram_gb=budget, device=args.device, dtype=args.dtype,
                            max_context=args.context, expert_dtype=args.expert_dtype, **kw)
    set_routing(engine, args.routing)
    return engine


def run_edgeprism(source: Any, budget: float | None, args: argparse.Namespace, system: str,
                  gen: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    engine = load_engine(source, budget, args, policy=args.policy, **kw)
    table = None
    if (gen or {}).get("quality") is not None and getattr(args, "profile", None):
        # The synthetic checkpoint has no directory, hence no table of its own (and a random model's
        # perplexity means nothing): quality= maps to a floor through a table measured on the trained
        # default model (`edgeprism profile`), as a user would measure on theirs.
        table = OperatingPoints.load(args.profile)
        engine.operating_points = lambda: table
    load_s = time.perf_counter() - t0
    if getattr(args, "prefetch_idle_after", None) is not None and hasattr(engine.decode_step, "idle_after"):
        engine.decode_step.idle_after = args.prefetch_idle_after
    if getattr(args, "prefetch_budget", "hide") == "off" and hasattr(engine.decode_step, "copy_unit_s"):
        engine.decode_step.copy_unit_s = None  # no time budget: every predicted missing unit is copied
    if getattr(args, "prefetch_min_precision", None) is not None:
        engine.fetch.min_precision = args.prefetch_min_precision
    engine.cache.time_copies = True
    copies = engine.fetch.engine
    if hasattr(copies, "timed"):
        copies.timed = True  # time the prefetcher's copies (demand and ahead of need)
    prompt = torch.randint(0, engine.spec.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    rec = decode_run(engine, prompt, args.tokens, args.warmup, engine.reset_stats, **(gen or {}))
    s = engine.stats()
    copy_s = copies.copy_seconds() if hasattr(copies, "copy_seconds") else 0.0
    rec.update(system=system, vram_gb=budget, hit_rate=s["hit_rate"], bytes_per_token=s["bytes_h2d"] / rec["tokens"],
               h2d_gbps=(s["bytes_h2d"] / copy_s / 1e9) if copy_s else None, load_s=load_s,
               cache_slots=s["cache_slots"], total_units=s["total_units"], host_pinned=s["host_pinned"],
               policy=args.policy, expert_dtype=s["expert_dtype"], unit_bytes=s["unit_bytes"],
               cache_fraction=args.cache_fraction, prefetch=s["prefetch"],
               prefetch_recall=s["prefetch_recall"], prefetch_precision=s["prefetch_precision"],
               stall_ms_per_token=s["stall_s"] * 1e3 / rec["tokens"],
               prefetch_bytes_used_per_token=s["prefetch_bytes_used"] / rec["tokens"],
               prefetch_bytes_wasted_per_token=s["prefetch_bytes_wasted"] / rec["tokens"],
               prefetch_units=s["prefetch_units"], prefetch_paused=s["prefetch_paused"],
               prefetch_idle_skips=s["prefetch_idle_skips"],
               **({"prefetch_budget": getattr(args, "prefetch_budget", "hide"),
                   "prefetch_idle_after": getattr(engine.decode_step, "idle_after", None),
                   "prefetch_min_precision": engine.fetch.min_precision} if s["prefetch"] else {}),
               schedule=s["schedule"], zero_copy_bytes_per_token=s["zero_copy_bytes"] / rec["tokens"], **(gen or {}),
               **({"keep_floor": table.keep_for_quality(gen["quality"]), "profile": str(args.profile)} if table else {}),
               **{k: s[k] for k in SCHED_KEYS if k in s})
    if device.type == "cuda":
        rec["peak_vram_gb"] = (torch.cuda.max_memory_allocated(device) - base) / GiB
        if budget is not None:
            assert rec["peak_vram_gb"] <= budget, f"peak VRAM {rec['peak_vram_gb']:.3f} GB > budget {budget} GB"
    engine.close()
    del engine
    gc.collect()
    return rec


SCHED_KEYS = ("units_hit", "units_wait", "units_fetch", "units_cpu", "units_drop", "cpu_calls", "cpu_probes", "cpu_bytes",
              "cpu_s", "cpu_gbps", "mass_kept", "cpu_share", "cpu_share_units", "cpu_share_bytes", "cpu_share_busy_s",
              "cpu_share_gbps", "cpu_share_gpu_waits", "cpu_share_wait_s", "cpu_share_phase_s", "cpu_share_path",
              "units_admitted")
SCHED_SYSTEMS = {  # system -> (load options, generation options)
    "edgeprism-fetch": ({"schedule": "fetch"}, {}),
    "edgeprism-cpu": ({"schedule": "cpu"}, {}),
    "edgeprism-hybrid": ({"schedule": "hybrid"}, {}),  # the GPU's misses copied into the cache
    "edgeprism-hybrid-zc": ({"schedule": "hybrid", "zero_copy": True}, {}),  # ... read in place instead
    "edgeprism-hybrid-q0.95": ({"schedule": "hybrid"}, {"quality": 0.95}),
    "edgeprism-direct": ({"schedule": "direct"}, {}),  # misses read by the kernels from pinned host RAM
    "edgeprism-direct-q0.95": ({"schedule": "direct"}, {"quality": 0.95}),  # ... dropping low-weighted misses
    "edgeprism-direct-prefetch": ({"schedule": "direct", "prefetch": True}, {}),  # ... next layer staged in-graph
    "edgeprism-direct-cpu-prefetch": ({"schedule": "direct", "cpu_share": True, "prefetch": True}, {}),
    # direct, with the CPU computing a share of each layer's misses inside the graph (schedule/cpu_share.py):
    # adapted to the machine, or a fixed fraction of the misses
    "edgeprism-direct-cpu": ({"schedule": "direct", "cpu_share": True}, {}),
    "edgeprism-direct-cpu-q0.95": ({"schedule": "direct", "cpu_share": True}, {"quality": 0.95}),
    # fixed fractions, exact and dropping (the best fixed share of each compares the two with no search noise)
    **{f"edgeprism-direct-cpu{f}{q}": ({"schedule": "direct", "cpu_share": f}, gen)
       for f in (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0) for q, gen in (("", {}), ("-q0.95", {"quality": 0.95}))},
}


def run_lru_expert(source: Any, budget: float, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    engine = load_engine(source, budget, args, cache_fraction=1e-9)  # its own (minimal) pool is freed below
    plan = engine.plan
    avail = int(budget * GiB) - plan.resident - plan.kv_cache - plan.workspace  # the same expert-cache bytes
    baseline = LruExpertOffload(engine.store, avail, engine.spec.top_k, device)
    install(engine, baseline)
    set_routing(engine, args.routing)
    prompt = torch.randint(0, engine.spec.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    rec = decode_run(engine, prompt, args.tokens, args.warmup, baseline.reset_stats)
    acc = baseline.hits + baseline.misses
    rec.update(system="lru-expert", vram_gb=budget, hit_rate=baseline.hits / max(1, acc),
               bytes_per_token=baseline.bytes_h2d / rec["tokens"], h2d_gbps=None,
               cache_slots=baseline.per_layer * len(engine.store.layers))
    if device.type == "cuda":
        rec["peak_vram_gb"] = (torch.cuda.max_memory_allocated(device) - base) / GiB
    engine.close()
    del engine, baseline
    gc.collect()
    return rec


def time_hf_generate(model: Any, prompt: torch.Tensor, n: int, device: torch.device) -> tuple[float, float]:
    """transformers' generate: (seconds to the first token, seconds per further token)."""
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, do_sample=False)
        sync(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False)
        sync(device)
        total = time.perf_counter() - t0
    return first, max(1e-9, (total - first) / n)


def run_accelerate(cfg: dict[str, Any], source: MemoryCheckpoint, budget: float, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.cuda.reset_peak_memory_stats(device)
    model = accelerate_model(cfg, budget, source.get)
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    n = args.accelerate_tokens
    ttft, per_token = time_hf_generate(model, prompt, n, device)
    rec = {"system": "accelerate", "vram_gb": budget, "tokens_per_s": 1 / per_token, "p50_ms": per_token * 1e3,
           "p95_ms": None, "ttft_ms": ttft * 1e3, "hit_rate": None, "bytes_per_token": None, "h2d_gbps": None,
           "tokens": n, "peak_vram_gb": torch.cuda.max_memory_allocated(device) / GiB}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def run_transformers_resident(cfg: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """transformers' own generate fully on the GPU vs edgeprism resident, on the very same weights."""
    import transformers

    device = torch.device(args.device)
    arch = cfg["architectures"][0]
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{k: v for k, v in cfg.items() if k != "architectures"})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = getattr(transformers, arch)(config).eval()
    torch.set_default_dtype(torch.float32)
    prompt = torch.randint(0, cfg["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    n = args.tokens
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
    first, per_token = time_hf_generate(model, prompt, n, device)
    hf = {"system": "transformers", "vram_gb": None, "tokens_per_s": 1 / per_token, "p50_ms": per_token * 1e3,
          "p95_ms": None, "ttft_ms": first * 1e3, "hit_rate": None, "bytes_per_token": 0, "h2d_gbps": None, "tokens": n,
          "experts_implementation": str(getattr(model.config, "_experts_implementation", None))}
    source = MemoryCheckpoint(cfg, model.state_dict())
    engine = edgeprism.load(source, device=args.device, dtype=args.dtype, max_context=args.context)
    ids = prompt[0].tolist()
    ours = decode_run(engine, ids, n, args.warmup, engine.reset_stats)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, 32:].tolist()
    ours_greedy = engine.generate_ids(ids, max_new_tokens=16)
    ours.update(system="edgeprism-resident", vram_gb=None, hit_rate=1.0, bytes_per_token=0, h2d_gbps=None,
                greedy_match_16=sum(a == b for a, b in zip(ref, ours_greedy)))
    engine.close()
    del engine, model, source
    gc.collect()
    torch.cuda.empty_cache()
    return [hf, ours]


def budget_index(args: argparse.Namespace, budget: float) -> int:
    return args.budgets.index(budget) if len(args.latency_ms) == len(args.budgets) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="qwen3-30b-a3b", choices=sorted(GEOMETRIES))
    p.add_argument("--model", default=None, help="a local HF checkpoint instead of a random geometry")
    p.add_argument("--layers", type=int, default=None, help="use this many layers of the geometry")
    p.add_argument("--budgets", type=float, nargs="+", default=[4, 8, 16])
    p.add_argument("--systems", default="edgeprism,lru-expert,resident,pcie-bound,accelerate")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens measured per run")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--prefetch-idle-after", type=int, default=None,
                   help="predictions that copied nothing before a layer's prediction idles (runtime/layerwise.py)")
    p.add_argument("--prefetch-budget", default="hide", choices=["hide", "off"],
                   help="hide: a prefetch copies what hides behind the layers until its target (the default); off: no limit")
    p.add_argument("--prefetch-min-precision", type=float, default=None,
                   help="copy precision under which a layer's prefetches pause (prefetch/prefetcher.py)")
    p.add_argument("--lookahead", type=int, default=1, help="system edgeprism: layers its prefetch predicts ahead")
    p.add_argument("--accelerate-tokens", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--policy", default="lru")
    p.add_argument("--routing", default="model", choices=["model", "uniform", "token"],
                   help="model: the random model's own router; uniform: k distinct experts drawn per token; "
                        "token: the own router, led by the current token (set_routing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--expert-dtype", default=None, help="routed experts stored as bf16/fp16/fp32/int8/int4 (default: --dtype)")
    p.add_argument("--cache-fraction", type=float, default=None,
                   help="cap the expert cache at this share of all units (emulate a deeper model's share)")
    p.add_argument("--resident-vs-transformers", default=None, choices=sorted(GEOMETRIES),
                   help="also compare edgeprism resident with transformers' generate on this geometry (GPU)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--cpu-threads", type=int, default=None, help="threads of the CPU expert path (default CPUs − 1)")
    p.add_argument("--profile", default=str(ROOT / "bench/results/2026-11-23-cpu-profile/edgeprism-profile-0.14gb.json"),
                   help="operating-points table that maps quality= to a floor for the synthetic model "
                        "(default: the one measured on the default model); '' for none (the target as the floor)")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[10.0],
                   help="edgeprism-latency: per-token target, one per budget (or one for all)")
    p.add_argument("--out", default=None, help="folder for results.json (default bench/results/<date>-<device>)")
    args = p.parse_args(argv)
    if args.quick:
        args.geometry, args.layers, args.budgets = "tiny", None, [0.075, 0.08]
        args.tokens, args.warmup, args.prompt_len, args.context = 8, 2, 48, 128
        if args.systems == p.get_default("systems"):
            args.systems = "edgeprism,lru-expert,resident,pcie-bound"
    device = torch.device(args.device)
    date = datetime.date.today().isoformat()
    dev = device_name(device)
    out = Path(args.out or Path(__file__).parent / "results" / f"{date}-{dev.replace(' ', '_').split('(')[0].strip('_')}")
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))

    if args.model:
        source: Any = Checkpoint(args.model)
        cfg, model_name = None, str(args.model)
    else:
        cfg = dict(GEOMETRIES[args.geometry])
        if args.layers:
            cfg["num_hidden_layers"] = args.layers
        source, model_name = MemoryCheckpoint(cfg, seed=0), args.geometry
    layers = source.spec.n_layers
    systems = args.systems.split(",")
    if (args.expert_dtype or "").startswith("int") and "lru-expert" in systems:
        systems.remove("lru-expert")  # the baseline computes dense units only
    budgeted = ("edgeprism", "edgeprism-noprefetch", *SCHED_SYSTEMS, "edgeprism-latency", "edgeprism-direct-latency",
                "edgeprism-direct-cpu-latency", "lru-expert")
    plan = [(s, b) for s in budgeted if s in systems for b in args.budgets]
    plan += [("resident", None)] if "resident" in systems else []
    plan += [("accelerate", b) for b in args.budgets] if "accelerate" in systems and cfg and device.type == "cuda" else []
    records: list[dict[str, Any]] = []
    bar = tqdm(plan, desc="bench", file=sys.stderr)
    for system, budget in bar:
        bar.set_postfix_str(f"{system} {budget}")
        try:
            if system == "edgeprism":
                rec = run_edgeprism(source, budget, args, "edgeprism", prefetch=True,  # as measured: on
                                    lookahead=args.lookahead)
                rec["lookahead"] = args.lookahead
            elif system == "edgeprism-noprefetch":
                rec = run_edgeprism(source, budget, args, system, prefetch=False)
            elif system in SCHED_SYSTEMS:
                load_kw, gen = SCHED_SYSTEMS[system]
                rec = run_edgeprism(source, budget, args, system, gen=gen, cpu_threads=args.cpu_threads, **load_kw)
            elif system == "edgeprism-direct-latency":  # direct, its floor moved to hold a latency target
                gen = {"latency_ms": args.latency_ms[budget_index(args, budget)]}
                rec = run_edgeprism(source, budget, args, system, gen=gen, schedule="direct")
            elif system == "edgeprism-direct-cpu-latency":  # ... with the CPU share adapting beside it
                gen = {"latency_ms": args.latency_ms[budget_index(args, budget)]}
                rec = run_edgeprism(source, budget, args, system, gen=gen, schedule="direct", cpu_share=True,
                                    cpu_threads=args.cpu_threads)
            elif system == "edgeprism-latency":  # hybrid holding a per-token latency target
                gen = {"latency_ms": args.latency_ms[budget_index(args, budget)]}
                rec = run_edgeprism(source, budget, args, system, gen=gen, cpu_threads=args.cpu_threads, schedule="hybrid")
            elif system == "lru-expert":
                rec = run_lru_expert(source, budget, args)
            elif system == "resident":
                rec = run_edgeprism(source, None, args, "resident")
            else:
                rec = run_accelerate(cfg, source, budget, args)
        except edgeprism.errors.BudgetError as e:
            tqdm.write(f"skip {system} at {budget} GB: {e}", file=sys.stderr)
            continue
        records.append(rec)
        tqdm.write(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}), file=sys.stderr)
        (out / "partial.json").write_text(json.dumps(records, indent=1))  # survives a crash or time-out
    if "pcie-bound" in systems:
        unit = 3 * source.spec.dim * source.spec.moe_intermediate * 2
        bw = h2d_bandwidth(unit, min(1 * GiB, 64 * unit), device)
        for r in [r for r in records if r["system"] == "edgeprism" and r["bytes_per_token"]]:
            records.append({"system": "pcie-bound", "vram_gb": r["vram_gb"], "tokens_per_s": bw["unit_copies"] * 1e9 / r["bytes_per_token"],
                            "h2d_gbps": bw["unit_copies"], "h2d_one_copy_gbps": bw["one_copy"],
                            "bytes_per_token": r["bytes_per_token"], "p50_ms": None, "p95_ms": None, "ttft_ms": None,
                            "hit_rate": r["hit_rate"], "peak_vram_gb": None})
    if args.resident_vs_transformers and device.type == "cuda":
        rcfg = dict(GEOMETRIES[args.resident_vs_transformers])
        for rec in run_transformers_resident(rcfg, args):
            rec.update(model=args.resident_vs_transformers, layers=rcfg["num_hidden_layers"])
            records.append(rec)
            tqdm.write(json.dumps(rec), file=sys.stderr)
    for r in records:
        r.setdefault("model", model_name)
        r.setdefault("layers", layers)
        r.setdefault("peak_vram_gb", None)
        r.update(device=dev, command=command, date=date, torch=torch.__version__)
        r.setdefault("routing", args.routing)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    print(f"wrote {len(records)} records to {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
