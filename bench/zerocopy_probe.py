"""Probe: GPU kernels reading expert units straight from pinned host RAM (zero-copy over PCIe).

    python bench/zerocopy_probe.py --out DIR
Times the grouped decode kernels (bf16 / int8 / int4, Qwen3-30B-A3B units, 8 per layer) reading
their weights from the VRAM pool vs from a pinned host arena, and a plain streaming read kernel,
against cudaMemcpy host→device of the same bytes.
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeprism.moe.quant import make_format  # noqa: E402


@triton.jit
def _stream(src, out, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        off = i + tl.arange(0, BLOCK)
        acc += tl.load(src + off, mask=off < n, other=0)
    tl.store(out + pid * BLOCK + tl.arange(0, BLOCK), acc)


def timed(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters / 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arena-gb", type=float, default=2.0)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tune-int4", action="store_true", help="only time int4 launch shapes on host rows")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tune_int4:
        (args.out / "tune_int4_host.json").write_text(json.dumps(tune_int4_host(), indent=1))
        return
    dev = torch.device("cuda")
    rec = []
    # plain streaming read of 1 GiB, pinned host vs device
    n = 2**30 // 4
    host = torch.ones(n, dtype=torch.int32, pin_memory=True)
    devbuf = torch.ones(n, dtype=torch.int32, device=dev)
    for progs in (264, 1056, 4224):
        for block in (1024, 4096):
            out = torch.empty(progs * block, dtype=torch.int32, device=dev)
            for name, src in (("host", host), ("device", devbuf)):
                s = timed(lambda src=src, out=out: _stream[(progs,)](src, out, n, BLOCK=block), 5)
                rec.append(dict(kind="stream", src=name, programs=progs, block=block, gb_s=n * 4 / s / 1e9))
                print(rec[-1], flush=True)
    dst = torch.empty_like(devbuf)
    s = timed(lambda: dst.copy_(host, non_blocking=True), 5)
    rec.append(dict(kind="memcpy_h2d", gb_s=n * 4 / s / 1e9))
    print(rec[-1], flush=True)
    host = devbuf = dst = None
    D, Ig = 2048, 768
    g = torch.Generator().manual_seed(0)
    for name in ("bf16", "int8", "int4"):
        fmt = make_format(name, D, Ig, torch.bfloat16)
        rows = int(args.arena_gb * 2**30 // fmt.unit_bytes)
        w1 = torch.randn(Ig, D, device=dev) * 0.02
        w3 = torch.randn(Ig, D, device=dev) * 0.02
        w2 = torch.randn(D, Ig, device=dev) * 0.02
        row = fmt.pack(w1, w3, w2).cpu()
        arena = torch.empty(rows, fmt.row_numel, dtype=fmt.row_dtype, pin_memory=True)
        arena[:] = row
        pool = torch.empty(64, fmt.row_numel, dtype=fmt.row_dtype, device=dev)
        pool[:] = row.to(dev)
        hp, dp = fmt.parts(arena), fmt.parts(pool)
        x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
        tokens = torch.zeros(8, dtype=torch.long, device=dev)
        w = torch.full((8,), 0.125, device=dev, dtype=torch.bfloat16)
        pick = torch.randperm(rows, generator=g)[:8].to(dev)
        dslots = torch.arange(8, device=dev)
        y_dev = fmt.grouped(x, dp, dslots, tokens, w)
        y_host = fmt.grouped(x, hp, pick, tokens, w)
        err = (y_dev.float() - y_host.float()).abs().max().item()
        for label, parts, slots in (("device", dp, dslots), ("host", hp, pick)):
            def step(parts=parts, slots=slots):
                fmt.grouped(x, parts, slots, tokens, w)
            # rotate host rows so reads are not served from any cache
            if label == "host":
                picks = [torch.randperm(rows, generator=g)[:8].to(dev) for _ in range(args.iters)]
                it = iter(range(10**9))

                def step(parts=parts):  # noqa: F811
                    fmt.grouped(x, parts, picks[next(it) % len(picks)], tokens, w)
            s = timed(step, args.iters)
            rec.append(dict(kind="grouped", format=name, src=label, us_per_layer=s * 1e6,
                            gb_s=8 * fmt.unit_bytes / s / 1e9, unit_bytes=fmt.unit_bytes, max_abs_diff=err))
            print(rec[-1], flush=True)
        src = arena[:8].contiguous() if False else arena[100:108]
        dst = torch.empty(8, fmt.row_numel, dtype=fmt.row_dtype, device=dev)
        s = timed(lambda: dst.copy_(src, non_blocking=True), args.iters)
        rec.append(dict(kind="memcpy_8_units", format=name, us=s * 1e6, gb_s=8 * fmt.unit_bytes / s / 1e9))
        print(rec[-1], flush=True)
        del arena, pool
    (args.out / "zerocopy_probe.json").write_text(json.dumps(rec, indent=1))




def tune_int4_host(iters: int = 30) -> list[dict]:
    """int4 launch shapes for units read from pinned host RAM (PCIe wants longer contiguous reads)."""
    from edgeprism.moe import quant_triton as qt

    dev = torch.device("cuda")
    D, Ig = 2048, 768
    fmt = make_format("int4", D, Ig, torch.bfloat16)
    row = fmt.pack(*(torch.randn(*s, device=dev) * 0.02 for s in ((Ig, D), (Ig, D), (D, Ig)))).cpu()
    rows = int(2 * 2**30 // fmt.unit_bytes)
    arena = torch.empty(rows, fmt.row_numel, dtype=torch.uint8, pin_memory=True)
    arena[:] = row
    hp = fmt.parts(arena)
    pool = torch.empty(8, fmt.row_numel, dtype=torch.uint8, device=dev)
    dp = fmt.parts(pool)
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    tokens = torch.zeros(8, dtype=torch.long, device=dev)
    w = torch.full((8,), 0.125, device=dev, dtype=torch.bfloat16)
    slots = torch.full((8,), -1, dtype=torch.long, device=dev)
    g = torch.Generator().manual_seed(0)
    picks = [torch.randperm(rows, generator=g)[:8].to(dev) for _ in range(iters)]
    rec = []
    for n13 in (8, 16, 32):
        for k13 in (1, 2, 4):
            for warps in (4, 8):
                for n2, k2 in ((32, 1), (16, 2), (32, 2), (64, 1)):
                    b = qt.Blocks(n13=n13, n2=n2, k13=k13, k2=k2, warps13=warps)
                    it = iter(range(10**9))
                    try:
                        s = timed(lambda b=b, it=it: qt.grouped(x, dp, slots, tokens, w, int4=True, group_size=fmt.group_size,
                                                                blocks=b, host=hp, rows=picks[next(it) % iters]), iters)
                    except Exception as e:  # noqa: BLE001 - a shape Triton cannot compile
                        print("skip", b, e)
                        continue
                    rec.append(dict(kind="tune_int4_host", n13=n13, k13=k13, warps13=warps, n2=n2, k2=k2,
                                    us_per_layer=s * 1e6, gb_s=8 * fmt.unit_bytes / s / 1e9))
    rec.sort(key=lambda r: r["us_per_layer"])
    for r in rec[:8]:
        print(r, flush=True)
    return rec


if __name__ == "__main__":
    main()
