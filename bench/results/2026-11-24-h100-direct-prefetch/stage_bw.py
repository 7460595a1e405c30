"""The staging kernel's read bandwidth from pinned host RAM, by grid size, against a plain copy.

PYTHONPATH=$PWD python3 <this file>: 8 units of a Qwen3-30B-A3B bf16 expert (9.4 MB) or int4 (2.5 MB)."""
import json
import time

import torch

from edgeprism.models import fused_triton

for name, unit_bytes in (("bf16", 9437184), ("int4", 2506752)):
    W = unit_bytes // 4
    src = torch.randint(-2**31, 2**31 - 1, (64, W), dtype=torch.int32).pin_memory()
    dst = torch.zeros(16, W, dtype=torch.int32, device="cuda")
    rows = torch.arange(64, device="cuda").reshape(64, 1)
    layer_map = torch.full((64, 1), -1, device="cuda")
    codes = torch.zeros(8, dtype=torch.long, device="cuda")
    for units in (1, 2, 8):
        ids = torch.arange(units, device="cuda") * 7 % 64
        for programs in (32, 64, 132, 264, 528, 1056):
            fused_triton.STAGE_PROGRAMS = programs
            fused_triton.stage(ids, layer_map, rows, src, dst, codes, 0, 1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                fused_triton.stage(ids, layer_map, rows, src, dst, codes, 0, 1)
            torch.cuda.synchronize()
            s = (time.perf_counter() - t0) / 10
            ok = torch.equal(dst[:units].cpu(), src[ids.cpu()])
            print(json.dumps({"unit": name, "units": units, "programs": programs, "us": round(s * 1e6, 1),
                              "gbps": round(units * unit_bytes / s / 1e9, 1), "correct": ok}), flush=True)
        t0 = time.perf_counter()
        for _ in range(10):
            for i in ids.tolist():
                dst[i % 16].copy_(src[i], non_blocking=True)
        torch.cuda.synchronize()
        s = (time.perf_counter() - t0) / 10
        print(json.dumps({"unit": name, "units": units, "programs": "copy engine", "us": round(s * 1e6, 1),
                          "gbps": round(units * unit_bytes / s / 1e9, 1)}), flush=True)
