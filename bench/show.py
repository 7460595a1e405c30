"""Print the key columns of bench records (results.json files or folders holding them), one line each.

    python3 bench/show.py RESULTS [RESULTS ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("system", "expert_dtype", "vram_gb", "tokens_per_s", "tokens_per_s_48_layers_est", "p50_ms", "p95_ms",
        "hit_rate", "cpu_share", "cpu_share_units", "cpu_share_gbps", "cpu_share_gpu_waits", "cpu_gbps",
        "units_cpu", "zero_copy_bytes_per_token")


def main(paths: list[str]) -> None:
    for arg in paths:
        p = Path(arg)
        for f in sorted(p.rglob("results.json")) if p.is_dir() else [p]:
            for rec in json.loads(f.read_text()):
                cells = []
                for k in KEYS:
                    v = rec.get(k)
                    if v is not None:
                        cells.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
                print(f.parent.name, " ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
