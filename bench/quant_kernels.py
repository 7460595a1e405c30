"""Quantized experts: kernel bandwidth on cached units, CPU per-layer cost, and a decode sweep.

    python bench/quant_kernels.py kernels --out DIR            # GPU (CPU part runs anywhere)
    python bench/quant_kernels.py tune --out DIR               # launch shapes of the Triton kernels
    python bench/quant_kernels.py decode --layers 12 --out DIR # bench/decode.py per expert dtype

`kernels`: Qwen3-30B-A3B units (D 2048, Ig 768) in a slot pool far larger than L2; one decode layer
(8 routed units, slots drawn at random per call) through each format's grouped path, eager and
inside a CUDA graph. "GB/s" = stored bytes of the 8 units ÷ time, next to the card's own
device-to-device copy bandwidth (read + write) and a pinned host→device copy of one unit. Also the
CPU one-call-per-layer path (`UnitFormat.cpu_grouped`) on host rows rotated over ≥ 1 GB.

`decode`: bench/decode.py at each budget for bf16/int8/int4, with the expert cache capped at the
share of units the full 48-layer model would get under that budget (`--cache-fraction`), so a
12-layer run sees the 48-layer model's cache pressure; tokens/s × layers / 48 estimates 48 layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import decode
from edgeprism.config import ModelSpec
from edgeprism.moe.quant import UnitFormat, make_format, triton_ready
from edgeprism.runtime.memory import GiB, plan_budget

D, IG, TOP_K = 2048, 768, 8
FORMATS = ("bf16", "int8", "int4", "int4-g64")


def cuda_time(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call (CUDA events, after warm-up)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def time_layer(fn: Callable[[], object], slots: torch.Tensor, draws: torch.Tensor, iters: int) -> tuple[float, float]:
    """Seconds per call of `fn`, eager and replayed as a CUDA graph; `slots` gets a new draw before
    every call, as a decode step would (so weights come from HBM, not L2)."""
    i = itertools.count()

    def eager() -> None:
        slots.copy_(draws[next(i) % len(draws)])
        fn()

    t_eager = cuda_time(eager, iters)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay() -> None:
        slots.copy_(draws[next(i) % len(draws)])
        graph.replay()

    return t_eager, cuda_time(replay, iters)


def filled_pool(fmt: UnitFormat, slots: int, device: str) -> torch.Tensor:
    """`slots` rows: a few distinct packed units tiled (distinct memory, realistic values)."""
    g = torch.Generator(device=device).manual_seed(0)
    distinct = torch.stack([fmt.pack(torch.randn(IG, D, generator=g, device=device) * 0.02,
                                     torch.randn(IG, D, generator=g, device=device) * 0.02,
                                     torch.randn(D, IG, generator=g, device=device) * 0.02) for _ in range(4)])
    return distinct.repeat(slots // 4, 1)


def decode_layer(fmt: UnitFormat) -> tuple[torch.Tensor, ...]:
    """x [1, D], pool parts of ≥ 2 GB of units, slots [8], tokens [8], weights [8], 64 slot draws."""
    dev = "cuda"
    slots_n = max(64, (2 * GiB // fmt.unit_bytes) // 4 * 4)
    draws = torch.stack([torch.randperm(slots_n, device=dev)[:TOP_K] for _ in range(64)])  # [64, 8]
    return (torch.randn(1, D, device=dev, dtype=torch.bfloat16), fmt.parts(filled_pool(fmt, slots_n, dev)),
            draws[0].clone(), torch.zeros(TOP_K, dtype=torch.long, device=dev),
            torch.rand(TOP_K, device=dev, dtype=torch.bfloat16), draws)


def gpu_kernels(iters: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for name in FORMATS:
        fmt = make_format(name, D, IG, torch.bfloat16)
        x, parts, slots, tokens, w, draws = decode_layer(fmt)
        paths = {"grouped": functools.partial(fmt.grouped, x, parts, slots, tokens, w)}
        if fmt.quantized:  # the torch dequantize-then-matmul path CPU and CI run
            paths["torch-reference"] = functools.partial(UnitFormat.grouped, fmt, x, parts, slots, tokens, w)
        for path, fn in paths.items():
            eager, graphed = time_layer(fn, slots, draws, iters)
            moved = TOP_K * fmt.unit_bytes
            rec = {"part": "gpu-kernel", "format": name, "path": path, "unit_bytes": fmt.unit_bytes,
                   "us_per_layer_eager": eager * 1e6, "gbps_eager": moved / eager / 1e9,
                   "us_per_layer_graph": graphed * 1e6, "gbps_graph": moved / graphed / 1e9,
                   "triton": triton_ready() and fmt.quantized and path == "grouped"}
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr)
        del parts, paths
        torch.cuda.empty_cache()
    src = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    d2d = cuda_time(lambda: dst.copy_(src), 20)
    records.append({"part": "gpu-copy", "d2d_copy_gbps_read_plus_write": 2 * GiB / d2d / 1e9,
                    "d2d_copy_gbps_read": GiB / d2d / 1e9})
    print(json.dumps(records[-1]), file=sys.stderr)
    return records


def tune(iters: int) -> list[dict[str, Any]]:
    """Launch shapes of the Triton kernels on Qwen3-30B-A3B units: each kernel's options varied with
    the other kernel at its default, timed as a CUDA graph replay (as decode runs it)."""
    from edgeprism.moe import quant_triton as qt

    options = {"int8": {"n13": [8, 16, 32], "k13": [128, 256, 512], "warps13": [4, 8],
                        "n2": [16, 32, 64], "k2": [128, 256], "warps2": [4, 8]},
               "int4": {"n13": [16, 32, 64], "k13": [1, 2, 4], "warps13": [4, 8],
                        "n2": [16, 32, 64], "k2": [1, 2], "warps2": [4, 8]}}
    records: list[dict[str, Any]] = []
    for name, opts in options.items():
        fmt = make_format(name, D, IG, torch.bfloat16)
        x, parts, slots, tokens, w, draws = decode_layer(fmt)
        base = qt.INT4_BLOCKS if name == "int4" else qt.INT8_BLOCKS
        gs = getattr(fmt, "group_size", 0)
        configs = [base] + [dataclasses.replace(base, **{key: v}) for key, values in opts.items() for v in values
                            if getattr(base, key) != v]
        for blocks in configs:
            fn = functools.partial(qt.grouped, x, parts, slots, tokens, w, int4=name == "int4", group_size=gs,
                                   blocks=blocks)
            t = time_layer(fn, slots, draws, iters)[1]
            rec = {"part": "tune", "format": name, "blocks": dataclasses.asdict(blocks), "us_per_layer_graph": t * 1e6,
                   "gbps_graph": TOP_K * fmt.unit_bytes / t / 1e9}
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr)
        del parts
        torch.cuda.empty_cache()
    return records


def cpu_layers(iters: int) -> list[dict[str, Any]]:
    """The CPU one-call-per-layer path on host rows; rows rotate over ≥ 1 GB so they come from DRAM."""
    records = []
    threads = torch.get_num_threads()
    x = torch.randn(1, D, dtype=torch.bfloat16)
    w = torch.rand(TOP_K, dtype=torch.bfloat16)
    tokens = torch.zeros(TOP_K, dtype=torch.long)
    for name in ("bf16", "int8", "int4"):
        fmt = make_format(name, D, IG, torch.bfloat16)
        n = max(16, (GiB // fmt.unit_bytes) // 4 * 4)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        arena = filled_pool(fmt, 4, dev).cpu().repeat(n // 4, 1)
        parts = fmt.parts(arena)
        fmt.cpu_grouped(x, parts, torch.arange(TOP_K), tokens, w)
        t0 = time.perf_counter()
        for i in range(iters):
            rows = torch.arange(TOP_K) + (i * TOP_K) % (n - TOP_K)
            fmt.cpu_grouped(x, parts, rows, tokens, w)
        per = (time.perf_counter() - t0) / iters
        rec = {"part": "cpu-layer", "format": name, "threads": threads, "ms_per_layer": per * 1e3,
               "gbps": TOP_K * fmt.unit_bytes / per / 1e9, "ms_per_token_48_layers": 48 * per * 1e3}
        records.append(rec)
        print(json.dumps(rec), file=sys.stderr)
        del arena, parts
    return records


def cache_share(layers: int, vram_gb: float, expert_dtype: str, context: int) -> float:
    """The share of all units the Qwen3-30B-A3B model with `layers` layers caches under `vram_gb`."""
    cfg = dict(decode.GEOMETRIES["qwen3-30b-a3b"], num_hidden_layers=layers)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        spec = ModelSpec.from_json(Path(d) / "config.json")
    fmt = make_format(expert_dtype, D, IG, torch.bfloat16)
    plan = plan_budget(spec, elem=2, groups=1, max_context=context, chunk=256, gather_limit=256 * 2**20,
                       vram_bytes=int(vram_gb * GiB), unit_bytes=fmt.unit_bytes)
    return plan.cache_share


def loop_estimate(rec: dict[str, Any], layers: int, target: int = 48) -> float | None:
    """tokens/s of a `target`-layer model from a `layers`-layer CPU-share run: the share's loop spans
    the layers (its busy plus waiting seconds), the rest of a token (lm_head, sampling, the host's
    loop) does not grow with layers, so time(target) = loop · target / layers + the rest. None for a
    run without the CPU share. Plain tokens/s · layers / target charges the rest target/layers times."""
    loop = (rec.get("cpu_share_busy_s") or 0.0) + (rec.get("cpu_share_wait_s") or 0.0)
    if not loop or not rec.get("tokens_per_s"):
        return None
    per_token, loop_per_token = 1.0 / rec["tokens_per_s"], loop / rec["tokens"]
    rest = max(0.0, per_token - loop_per_token)
    return 1.0 / (loop_per_token * target / layers + rest)


def decode_sweep(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    records = []
    for expert_dtype in args.expert_dtypes:
        for budget in args.budgets:
            share = cache_share(48, budget, expert_dtype, args.context)
            sub = out / f"decode-{expert_dtype}-{budget:g}"
            argv = ["--geometry", "qwen3-30b-a3b", "--layers", str(args.layers), "--budgets", str(budget),
                    "--systems", args.systems, "--expert-dtype", expert_dtype, "--cache-fraction", f"{share:.4f}",
                    "--routing", args.routing, "--prompt-len", str(args.prompt_len), "--tokens", str(args.tokens),
                    "--context", str(args.context), "--out", str(sub)]
            argv += ["--warmup", str(args.warmup)]
            if args.cpu_threads:
                argv += ["--cpu-threads", str(args.cpu_threads)]
            decode.main(argv)
            for rec in json.loads((sub / "results.json").read_text()):
                rec.update(part="decode", cache_share_48_layers=share,
                           tokens_per_s_48_layers_est=rec["tokens_per_s"] * args.layers / 48,
                           tokens_per_s_48_layers_loop=loop_estimate(rec, args.layers))
                records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["kernels", "tune", "decode"])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--budgets", type=float, nargs="+", default=[4, 8])
    p.add_argument("--expert-dtypes", nargs="+", default=["bf16", "int8", "int4"])
    p.add_argument("--routing", default="uniform", choices=["model", "uniform"])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--systems", default="edgeprism", help="decode: bench/decode.py systems, comma-separated")
    p.add_argument("--cpu-threads", type=int, default=None, help="decode: threads of the CPU expert path")
    p.add_argument("--warmup", type=int, default=8, help="decode: tokens before the measured ones")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "tune":
        records = tune(args.iters)
    elif args.what == "kernels":
        records = gpu_kernels(args.iters) if torch.cuda.is_available() else []
        records += cpu_layers(max(5, args.iters // 20))
    else:
        records = decode_sweep(args, out)
    dev = decode.device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    for r in records:
        r.update(device=dev, torch=torch.__version__, date=datetime.date.today().isoformat(), command=command)
    (out / f"{args.what}.json").write_text(json.dumps(records, indent=1))
    print(f"wrote {len(records)} records to {out / (args.what + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
