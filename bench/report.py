"""Build bench/README.md's tables and one PNG per run from the committed results files.

    python bench/report.py

Numbers in bench/README.md come only from bench/results/*/results.json (and */quality.json, from
bench/quality.py): the text between the markers is regenerated from them, the rest of the page is
written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
QBEGIN, QEND = "<!-- quality:begin -->", "<!-- quality:end -->"
COLUMNS = [("system", "system"), ("vram_gb", "VRAM GB"), ("tokens_per_s", "tok/s"), ("p50_ms", "p50 ms"),
           ("p95_ms", "p95 ms"), ("ttft_ms", "TTFT ms"), ("hit_rate", "hit rate"), ("bytes_per_token", "MB/token"),
           ("h2d_gbps", "H2D GB/s"), ("peak_vram_gb", "peak VRAM GB"), ("prefetch_recall", "pred. recall"),
           ("stall_ms_per_token", "stall ms/token")]


def fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "bytes_per_token":
        return f"{value / 1e6:.1f}"
    if key == "hit_rate":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    order = {s: i for i, s in enumerate(["edgeprism", "edgeprism-noprefetch", "edgeprism-fetch", "edgeprism-cpu",
                                         "edgeprism-hybrid", "edgeprism-hybrid-q0.95", "edgeprism-latency",
                                         "edgeprism-batched", "lru-expert", "accelerate", "pcie-bound", "resident",
                                         "edgeprism-resident", "transformers"])}
    for r in sorted(records, key=lambda r: (order.get(r["system"], 99), r.get("vram_gb") or 1e9)):
        rows.append("| " + " | ".join(fmt(k, r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(rows)


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    systems = sorted({r["system"] for r in records if r.get("vram_gb") is not None})
    for system in systems:
        pts = sorted((r["vram_gb"], r["tokens_per_s"]) for r in records
                     if r["system"] == system and r.get("vram_gb") is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
    for r in records:
        if r["system"] == "resident":
            ax.axhline(r["tokens_per_s"], ls="--", color="gray", label="resident (all experts in VRAM)")
    ax.set_xlabel("VRAM budget (GB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(folder: Path) -> str:
    records = json.loads((folder / "results.json").read_text())
    first = records[0]
    main = [r for r in records if r.get("model") == first["model"]]
    title = (f"{first['model']} ({first['layers']} layers), routing={first.get('routing', 'model')}, "
             f"{first['device']}, {first['date']}")
    png = folder / "tokens_per_s_vs_budget.png"
    budgets = any(r.get("vram_gb") is not None for r in main)
    if budgets:
        plot(main, png, title)
    others = [r for r in records if r.get("model") != first["model"]]
    text = [f"### {folder.name}", "", f"{title}  ", f"command: `{first['command']}`", "",
            *([f"![tokens/s vs budget]({png.relative_to(HERE)})", ""] if budgets else []), table(main)]
    if others:
        o = others[0]
        text += ["", f"Fully resident, {o['model']} ({o['layers']} layers), same weights:", "", table(others)]
    return "\n".join(text)


def main() -> None:
    folders = sorted(p.parent for p in (HERE / "results").glob("*/results.json"))
    body = "\n\n".join(section(f) for f in folders)
    readme = HERE / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")
    print(f"updated {readme} from {len(folders)} result folders")
    quality_sections(readme)


def quality_sections(readme: Path) -> None:
    """The quality runs (bench/quality.py, */quality.json) between their own markers."""
    from quality import readme_section

    folders = sorted(p.parent for p in (HERE / "results").glob("*/quality.json"))
    text = readme.read_text()
    if QBEGIN not in text:
        return
    head, _, rest = text.partition(QBEGIN)
    _, _, tail = rest.partition(QEND)
    body = "\n\n".join(readme_section(f) for f in folders)
    readme.write_text(f"{head}{QBEGIN}\n{body}\n{QEND}{tail}")
    print(f"updated {readme} from {len(folders)} quality runs")


if __name__ == "__main__":
    main()
