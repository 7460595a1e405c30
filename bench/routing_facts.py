"""Routing facts of a trained MoE on held-out text, measured at edgeprism's MoE seam.

These numbers decide which cache and prefetch ideas can pay off: a skewed expert load favours
frequency-based caching, experts repeating from one token to the next favour LRU, and a high
pre-gating recall (layer l+1's router applied to layer l's MoE input) favours fetching the next
layer's experts one layer ahead. Every figure is printed next to what random routing would give.

Teacher-forced: held-out text (documents followed by <|endoftext|>, as in training) goes through
`Engine.logits` in fresh windows; a wrapper on each MoE block's expert provider records the hidden
state entering the block and the routed experts, and returns the provider's output unchanged.

    python bench/routing_facts.py                    # default model, 4096 tokens, CPU
    python bench/routing_facts.py --tokens 8192 --out /tmp/routing.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgeprism  # noqa: E402
from edgeprism.api import Engine  # noqa: E402
from edgeprism.corpus import token_stream  # noqa: E402
from edgeprism.moe.layer import MoEBlock  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "2026-11-23-cpu-routing" / "routing.json"
EOS_ID = 0  # <|endoftext|> of the default model

Provider = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LayerTrace:
    """What one MoE layer saw over all windows: inputs x [T, D] and routed ids [T, k] per window."""

    x: list[torch.Tensor]
    ids: list[torch.Tensor]

    def all_ids(self) -> torch.Tensor:
        return torch.cat(self.ids)  # [N, k]


class RoutingRecorder:
    """Expert provider wrapper: records (x, ids) of every call, returns the inner provider's output."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.detach().float().cpu().clone(), ids.detach().cpu().clone()))
        return self.inner(layer, x, ids, weights)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, ids) of the calls since the last take, in token order (prefill chunks concatenated)."""
        x, ids = torch.cat([c[0] for c in self.calls]), torch.cat([c[1] for c in self.calls])
        self.calls.clear()
        return x, ids


def moe_blocks(engine: Engine) -> list[MoEBlock]:
    return [layer.ffn for layer in engine.model.layers if isinstance(layer.ffn, MoEBlock)]


def install(engine: Engine) -> list[RoutingRecorder]:
    recorders = []
    for block in moe_blocks(engine):
        recorders.append(RoutingRecorder(block.experts))
        block.experts = recorders[-1]
    return recorders


def uninstall(engine: Engine, recorders: list[RoutingRecorder]) -> None:
    for block, rec in zip(moe_blocks(engine), recorders, strict=True):
        block.experts = rec.inner


def heldout_ids(engine: Engine, n_tokens: int) -> list[int]:
    """The first `n_tokens` of heldout.txt, documents split at blank lines and followed by EOS."""
    ids = token_stream(engine.tokenizer, n_tokens, EOS_ID)
    if len(ids) < n_tokens:
        raise SystemExit(f"heldout.txt holds only {len(ids)} tokens, fewer than --tokens {n_tokens}")
    return ids


def trace(engine: Engine, ids: list[int], window: int) -> tuple[list[LayerTrace], float]:
    """Run `ids` in fresh windows, recording every MoE layer; also the perplexity of the windows."""
    recorders = install(engine)
    traces = [LayerTrace([], []) for _ in recorders]
    nll, count = 0.0, 0
    try:
        for start in range(0, len(ids), window):
            piece = ids[start:start + window]
            logits = engine.logits(piece)
            nll += F.cross_entropy(logits[:-1], torch.tensor(piece[1:]), reduction="sum").item()
            count += len(piece) - 1
            for rec, tr in zip(recorders, traces):
                x, routed = rec.take()
                tr.x.append(x)
                tr.ids.append(routed)
    finally:
        uninstall(engine, recorders)
    return traces, math.exp(nll / count)


def outputs_unchanged(engine: Engine, ids: list[int]) -> bool:
    """The recorder must be invisible: logits with and without it are bit-identical."""
    plain = engine.logits(ids)
    recorders = install(engine)
    try:
        wrapped = engine.logits(ids)
    finally:
        uninstall(engine, recorders)
    return torch.equal(plain, wrapped)


# ---- metrics ---------------------------------------------------------------------------------


def load_share(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of routed (token, slot) pairs that went to each expert: [E], sums to 1."""
    counts = torch.bincount(ids.flatten(), minlength=num_experts).double()
    return counts / counts.sum()


def entropy_bits(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def topk_overlap(windows: list[torch.Tensor]) -> float:
    """Mean fraction of token t's k experts that token t-1 also used (pairs inside a window only)."""
    hits = total = 0
    for ids in windows:  # [T, k]
        same = (ids[1:, :, None] == ids[:-1, None, :]).any(-1)  # [T-1, k]
        hits += int(same.sum())
        total += same.numel()
    return hits / total


def top1_repeat(windows: list[torch.Tensor]) -> float:
    """Fraction of tokens whose top-1 expert is the previous token's top-1 (inside a window)."""
    hits = sum(int((w[1:, 0] == w[:-1, 0]).sum()) for w in windows)
    return hits / sum(len(w) - 1 for w in windows)


def chance_overlap(share: torch.Tensor, k: int) -> float:
    """Expected overlap if consecutive tokens were routed independently with the observed loads.

    P(e in a token's set) = k * share[e]; the expected shared count is sum_e (k * share[e])^2, over k.
    With uniform loads this is k / E.
    """
    return float(k * (share ** 2).sum())


def recall(pred: torch.Tensor, actual: torch.Tensor) -> tuple[int, int]:
    """(hits, total): how many of the actual [T, k] experts the predicted [T, k] sets contain."""
    return int((actual[:, :, None] == pred[:, None, :]).any(-1).sum()), actual.numel()


@torch.inference_mode()
def pregate_recall(engine: Engine, src: LayerTrace, dst: LayerTrace, src_i: int, dst_i: int) -> dict[str, float]:
    """Recall of layer dst's routed experts predicted by dst's router from layer src's MoE input.

    'raw' feeds src's MoE input as is (normed with src's RMSNorm weight); 'renormed' swaps that
    weight for dst's (RMSNorm is scale-free, so this is dst's norm of the residual stream before
    src's MoE) — the input dst's router would see if src's MoE and dst's attention added nothing.
    """
    blocks, layers = moe_blocks(engine), engine.model.layers
    gate, block = blocks[dst_i].gate, blocks[dst_i]
    w_src = layers[block_index(engine, src_i)].ffn_norm.weight.float().cpu()
    w_dst = layers[block_index(engine, dst_i)].ffn_norm.weight.float().cpu()
    out = {}
    for name, scale in (("raw", None), ("renormed", w_dst / w_src)):
        hits = total = 0
        for x, actual in zip(src.x, dst.ids, strict=True):
            xin = x if scale is None else x * scale
            _, pred = block.adapter.route(gate(xin.to(gate.weight)), block.top_k, block.normalize)
            h, t = recall(pred.cpu(), actual)
            hits, total = hits + h, total + t
        out[name] = hits / total
    return out


def block_index(engine: Engine, moe_i: int) -> int:
    """Decoder layer index of the moe_i-th MoE block."""
    return [i for i, layer in enumerate(engine.model.layers) if isinstance(layer.ffn, MoEBlock)][moe_i]


@torch.inference_mode()
def self_route_ok(engine: Engine, traces: list[LayerTrace]) -> bool:
    """Sanity check of the pre-gating code path: a layer's own router on its own input gives its ids."""
    for block, tr in zip(moe_blocks(engine), traces, strict=True):
        for x, ids in zip(tr.x, tr.ids, strict=True):
            _, pred = block.adapter.route(block.gate(x.to(block.gate.weight)), block.top_k, block.normalize)
            if not torch.equal(pred.cpu(), ids):
                return False
    return True


def layer_facts(engine: Engine, traces: list[LayerTrace]) -> list[dict[str, Any]]:
    spec = engine.spec
    E, k = spec.num_experts, spec.top_k
    rows = []
    for i, tr in enumerate(traces):
        share = load_share(tr.all_ids(), E)
        top1_share = load_share(tr.all_ids()[:, 0], E)
        row: dict[str, Any] = {
            "layer": block_index(engine, i),
            "load_share": [round(float(s), 4) for s in share],
            "entropy_bits": round(entropy_bits(share), 4),
            "entropy_max_bits": round(math.log2(E), 4),
            "max_over_mean_load": round(float(share.max() * E), 3),
            "topk_overlap_prev": round(topk_overlap(tr.ids), 4),
            "topk_overlap_chance_uniform": round(k / E, 4),
            "topk_overlap_chance_load_aware": round(chance_overlap(share, k), 4),
            "top1_repeat_prev": round(top1_repeat(tr.ids), 4),
            "top1_repeat_chance_uniform": round(1 / E, 4),
            "top1_repeat_chance_load_aware": round(chance_overlap(top1_share, 1), 4),
            "pregate_recall": None, "pregate_recall_renormed": None, "pregate_recall_chance": round(k / E, 4),
        }
        if i > 0:
            r = pregate_recall(engine, traces[i - 1], tr, i - 1, i)
            row["pregate_recall"], row["pregate_recall_renormed"] = round(r["raw"], 4), round(r["renormed"], 4)
        rows.append(row)
    return rows


# ---- report ----------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]], k: int, E: int) -> str:
    head = ("| layer | load share per expert (%) | entropy (bits, max 3) | max/mean load "
            f"| top-{k} overlap with t-1 (chance {k / E:.2f} / load-aware) "
            f"| top-1 repeat (chance {1 / E:.3f} / load-aware) "
            f"| pre-gate recall from layer l-1 input (chance {k / E:.2f}) | same, renormed |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        share = " ".join(f"{100 * s:.0f}" for s in r["load_share"])
        pre = "–" if r["pregate_recall"] is None else f"{r['pregate_recall']:.3f}"
        pre_n = "–" if r["pregate_recall_renormed"] is None else f"{r['pregate_recall_renormed']:.3f}"
        lines.append(f"| {r['layer']} | {share} | {r['entropy_bits']:.3f} | {r['max_over_mean_load']:.2f} "
                     f"| {r['topk_overlap_prev']:.3f} ({r['topk_overlap_chance_load_aware']:.3f}) "
                     f"| {r['top1_repeat_prev']:.3f} ({r['top1_repeat_chance_load_aware']:.3f}) | {pre} | {pre_n} |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens to trace")
    p.add_argument("--window", type=int, default=512, help="tokens per fresh forward (context resets between)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    engine = edgeprism.load(args.model, device=args.device, dtype="fp32")
    ids = heldout_ids(engine, args.tokens)
    traces, ppl = trace(engine, ids, args.window)
    if not self_route_ok(engine, traces):
        raise SystemExit("re-routing a layer's own input did not reproduce its ids: the pre-gating code is wrong")
    rows = layer_facts(engine, traces)
    spec = engine.spec
    record = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.date.today().isoformat(),
        "device": device_name(engine.device),
        "torch": torch.__version__,
        "model": str(engine.path),
        "dtype": "fp32",
        "tokens": len(ids),
        "window": args.window,
        "heldout_slice": "first tokens of edgeprism/data/heldout.txt, blank-line documents each followed by <|endoftext|>",
        "perplexity_of_traced_text": round(ppl, 3),
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "outputs_unchanged_by_recorder": outputs_unchanged(engine, ids[:args.window]),
        "layers": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(rows, spec.top_k, spec.num_experts))
    print(f"\n{len(ids)} tokens, windows of {args.window}, ppl {ppl:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
