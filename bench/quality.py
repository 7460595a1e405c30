"""Perplexity against expert bytes per token on the embedded default model (CPU, fp32).

    python bench/quality.py                      # the committed run: bench/results/<date>-cpu-quality/
    python bench/quality.py --quick              # smoke run (CI): few tokens, tiny solver budget

Operating points compared, all on held-out text (`edgeprism.corpus`, not the calibration text):
- `topk`: top-k reduction, the model run with num_experts_per_tok = k for k = 1..K;
- `expert-keep`: whole experts (G = 1) with the `keep` knob (drops the lowest-weighted experts);
- `contiguous`, `random`, `topbottom`, `anneal`, `genetic`: G sub-experts grouped by that method
  (one shared calibration), over a sweep of `keep`, with the `score` gate (core neurons) and the
  `static` gate (calibrated group importance).
Expert bytes per token count the units actually computed, at bf16 (what would cross PCIe on a
miss). Summary per (method, gate): distinct operating points within 10% of the full model's
perplexity (points closer than `--distinct` of the full bytes count once), and the expert bytes
saved at ≤ 2/5/10% perplexity increase (measured points only, no interpolation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import edgeprism  # noqa: E402
from edgeprism.corpus import token_stream  # noqa: E402
from edgeprism.models.checkpoint import MemoryCheckpoint  # noqa: E402
from edgeprism.refactor.calibrate import calibrate, calibration_ids  # noqa: E402
from edgeprism.refactor.run import RefactorOptions, solve_layers, write_artifact  # noqa: E402

KEEPS = [1.0, 0.995, 0.99, 0.98, 0.97, 0.96, 0.94, 0.92, 0.9, 0.87, 0.84, 0.8, 0.75, 0.7, 0.6]
METHODS = ["contiguous", "random", "topbottom", "anneal", "genetic"]
EOS_ID = 0
WINDOW = 512


def perplexity(engine: edgeprism.Engine, ids: list[int], keep: float) -> tuple[float, float]:
    """(perplexity, expert units computed per token) over non-overlapping windows of WINDOW tokens."""
    engine.reset_stats()
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, WINDOW):
        chunk = ids[start:start + WINDOW + 1]
        logits = engine.logits(chunk[:-1], keep=keep)
        nll += F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count), engine.stats()["units_computed"] / count


def topk_checkpoint(k: int) -> MemoryCheckpoint:
    """The default model with num_experts_per_tok = k (the router renormalises over k, as configured)."""
    from safetensors.torch import load_file

    config = json.loads((edgeprism.DEFAULT_MODEL / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(edgeprism.DEFAULT_MODEL.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return MemoryCheckpoint({**config, "num_experts_per_tok": k}, tensors)


def build_artifacts(out: Path, groups: int, iters: int, calib_tokens: int, methods: list[str],
                    always_on: bool) -> dict[str, Path]:
    """One calibration, one artifact per method (under out/artifacts/)."""
    engine = edgeprism.load(device="cpu", dtype="fp32", groups=1)
    ids = calibration_ids(engine.tokenizer, None, calib_tokens, EOS_ID)
    t0 = time.time()
    layers = list(calibrate(engine, ids))
    print(f"calibration: {len(ids)} tokens in {time.time() - t0:.1f} s", flush=True)
    spec = engine.spec
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    paths = {}
    for method in methods:
        variants = [(method, False)] + ([(f"{method}+always-on", True)] if always_on and method == "anneal" else [])
        for name, on in variants:
            options = RefactorOptions(groups=groups, method=method, iters=iters, calib_tokens=calib_tokens, always_on=on)
            t0 = time.time()
            tensors, solver = solve_layers(layers, spec.num_experts, len(spec.moe_layers), options)
            path = out / "artifacts" / f"{name}-g{groups}"
            if path.exists():
                import shutil

                shutil.rmtree(path)
            write_artifact(path, edgeprism.DEFAULT_MODEL, options, None, len(ids), tensors, solver)
            print(f"{name}: objective {solver['gain_over_random']:.3f}x random, {time.time() - t0:.1f} s", flush=True)
            paths[name] = path
    engine.close()
    return paths


def sweep(engine: edgeprism.Engine, ids: list[int], keeps: list[float], record: dict[str, Any],
          full_units: float) -> list[dict[str, Any]]:
    rows = []
    for keep in keeps:
        t0 = time.time()
        ppl, units = perplexity(engine, ids, keep)
        rows.append({**record, "keep": keep, "ppl": ppl, "units_per_token": units, "bytes_fraction": units / full_units,
                     "seconds": round(time.time() - t0, 2)})
        print(f"  {record['method']:>22} {record['gate']:>6} keep={keep:<5} ppl={ppl:8.3f} "
              f"bytes={units / full_units:.3f}", flush=True)
    return rows


def summarize(records: list[dict[str, Any]], distinct: float) -> list[dict[str, Any]]:
    full = next(r["ppl"] for r in records if r["method"] == "topk" and r["keep"] == 1.0)
    out = []
    for key in dict.fromkeys((r["method"], r["gate"]) for r in records):
        pts = sorted((r["bytes_fraction"], r["ppl"]) for r in records if (r["method"], r["gate"]) == key)
        row: dict[str, Any] = {"method": key[0], "gate": key[1]}
        chosen: list[float] = []
        for b, p in pts:
            if p <= 1.10 * full and all(abs(b - c) >= distinct - 1e-9 for c in chosen):
                chosen.append(b)
        row["points_within_10pct"] = len(chosen)
        for tol in (2, 5, 10):
            ok = [b for b, p in pts if p <= (1 + tol / 100) * full]
            row[f"saved_at_{tol}pct"] = 1 - min(ok) if ok else 0.0
        out.append(row)
    return out


COLORS = {"topk": "black", "expert-keep": "tab:gray", "contiguous": "tab:blue", "random": "tab:orange",
          "topbottom": "tab:green", "anneal": "tab:red", "anneal+always-on": "tab:purple", "genetic": "tab:brown"}


def plot(records: list[dict[str, Any]], full: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for key in dict.fromkeys((r["method"], r["gate"]) for r in records):
        pts = sorted((r["bytes_fraction"], r["ppl"]) for r in records if (r["method"], r["gate"]) == key)
        static = key[1] == "static" and key[0] != "expert-keep"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if static else "-", color=COLORS.get(key[0]),
                marker="s" if key[0] in ("topk", "expert-keep") else ("^" if static else "o"), ms=4,
                lw=2.2 if key[0] == "topk" else 1.2, label=key[0] if key[1] in ("-", "score") or key[0] == "expert-keep"
                else f"{key[0]} (static gate)")
    for tol, color in ((1.05, "gray"), (1.10, "darkgray")):
        ax.axhline(tol * full, ls=":", color=color, lw=1)
        ax.text(0.01, tol * full, f" full +{round((tol - 1) * 100)}%", va="bottom", fontsize=7, color="gray",
                transform=ax.get_yaxis_transform())
    ax.set_xlabel("expert bytes per token (fraction of the full model's top-2)")
    ax.set_ylabel("held-out perplexity")
    ax.set_xlim(0.35, 1.02)
    ax.set_ylim(full * 0.98, full * 1.3)
    ax.set_title(title + "\nsolid: score gate (core neurons), dashed: static gate (group importance)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(folder: Path) -> None:
    data = json.loads((folder / "quality.json").read_text())
    meta, records = data["meta"], data["records"]
    plot(records, meta["full_ppl"], folder / "ppl_vs_bytes.png", _title(records[0], meta["date"]))


def _title(record: dict[str, Any], date: str) -> str:
    return (f"default model (6 layers, 8 experts, top-2), G={record['groups']}, {record['tokens']} held-out tokens, "
            f"CPU, {date}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens predicted per point")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--iters", type=int, default=20000, help="solver swap proposals per expert")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--static", default="contiguous,random,topbottom,anneal", help="methods also run with the static gate ('all' or a list)")
    p.add_argument("--always-on", action="store_true", help="also run anneal with an always-on group")
    p.add_argument("--distinct", type=float, default=0.05, help="operating points closer than this (fraction of "
                   "full bytes) count once")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 1024 tokens, 3 keeps, tiny solver budget")
    p.add_argument("--replot", type=Path, default=None, help="only redraw FOLDER/ppl_vs_bytes.png from its quality.json")
    args = p.parse_args(argv)
    if args.replot is not None:
        replot(args.replot)
        return 0
    torch.set_num_threads(args.threads)
    keeps = [1.0, 0.8, 0.5] if args.quick else KEEPS
    if args.quick:
        args.tokens, args.iters, args.calib_tokens = 1024, 100, 512
    date = datetime.date.today().isoformat()
    out = args.out or HERE / "results" / f"{date}-cpu-quality"
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    static = methods if args.static == "all" else [m for m in args.static.split(",") if m]
    t_start = time.time()

    artifacts = build_artifacts(out, args.groups, args.iters, args.calib_tokens, methods, args.always_on)
    probe = edgeprism.load(device="cpu", dtype="fp32")
    ids = token_stream(probe.tokenizer, args.tokens + 1, EOS_ID)
    spec = probe.spec
    probe.close()
    K, L = spec.top_k, len(spec.moe_layers)
    base = {"model": "default", "tokens": args.tokens, "groups": args.groups}
    records: list[dict[str, Any]] = []
    for k in range(K, 0, -1):
        eng = edgeprism.load(topk_checkpoint(k), device="cpu", dtype="fp32")
        ppl, units = perplexity(eng, ids, 1.0)
        records.append({**base, "method": "topk", "gate": "-", "k": k, "keep": 1.0, "ppl": ppl,
                        "units_per_token": units, "bytes_fraction": units / (L * K)})
        print(f"  topk k={k} ppl={ppl:.3f} bytes={units / (L * K):.3f}", flush=True)
    low = [] if args.quick else [0.5, 0.4, 0.3]  # whole experts reach the same bytes only at lower keep
    records += sweep(edgeprism.load(device="cpu", dtype="fp32", groups=1), ids, keeps + low,
                     {**base, "method": "expert-keep", "gate": "static", "groups": 1}, L * K)
    for name, path in artifacts.items():
        eng = edgeprism.load(path, device="cpu", dtype="fp32")
        records += sweep(eng, ids, keeps, {**base, "method": name, "gate": "score"}, L * K * args.groups)
        if name.split("+")[0] in static:
            eng.gate.mode = "static"
            records += sweep(eng, ids, [k for k in keeps if k < 1], {**base, "method": name, "gate": "static"},
                             L * K * args.groups)
        eng.close()
    for r in records:
        r["expert_mb_per_token_bf16"] = r["bytes_fraction"] * L * K * 3 * spec.dim * spec.moe_intermediate * 2 / 1e6
    full = next(r["ppl"] for r in records if r["method"] == "topk" and r["keep"] == 1.0)
    command = "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"date": date, "device": f"CPU ({platform.processor() or platform.machine()}), torch "
            f"{torch.__version__}, {args.threads} thread(s)", "command": command.strip(), "full_ppl": full,
            "distinct": args.distinct, "keeps": keeps, "iters": args.iters, "calib_tokens": args.calib_tokens,
            "seconds": round(time.time() - t_start, 1)}
    summary = summarize(records, args.distinct)
    (out / "quality.json").write_text(json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1) + "\n")
    plot(records, full, out / "ppl_vs_bytes.png", _title({**base, "groups": args.groups}, date))
    print(table(summary))
    print(f"wrote {out}")
    return 0


def table(summary: list[dict[str, Any]]) -> str:
    rows = ["| method | gate | operating points within 10% ppl | bytes saved at ≤2% | ≤5% | ≤10% |",
            "|---|---|---|---|---|---|"]
    for r in summary:
        rows.append(f"| {r['method']} | {r['gate']} | {r['points_within_10pct']} | {r['saved_at_2pct']:.1%} | "
                    f"{r['saved_at_5pct']:.1%} | {r['saved_at_10pct']:.1%} |")
    return "\n".join(rows)


def readme_section(folder: Path) -> str:
    """bench/README.md's text for one quality run (called by bench/report.py)."""
    data = json.loads((folder / "quality.json").read_text())
    meta = data["meta"]
    return "\n".join([
        f"### {folder.name}", "",
        (f"{meta['device']}, {meta['date']}; full-model perplexity {meta['full_ppl']:.3f}; "
         f"points closer than {meta['distinct']:.0%} of full bytes count once  "),
        f"command: `{meta['command']}`", "",
        f"![perplexity vs expert bytes]({(folder / 'ppl_vs_bytes.png').relative_to(HERE)})", "",
        table(data["summary"])])


if __name__ == "__main__":
    raise SystemExit(main())
