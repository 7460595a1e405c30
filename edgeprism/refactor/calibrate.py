"""Neuron statistics on calibration text, streamed through the model one layer at a time.

The engine's own decoder runs the text (so calibration fits the same VRAM budget as inference and
works on CPU): all calibration windows go through layer l, then all through layer l+1, holding
only the hidden states [N, D] and one layer's statistics at a time. Per expert and neuron i, over
the tokens routed to the expert (contribution ``c_ti = |silu(w1_i x_t) (w3_i x_t)| · ||w2[:, i]||``,
the size of neuron i's term in the expert output):

- importance: mean ``c_ti``;
- frequency: fraction of tokens where ``c_ti`` is above the token's mean over the expert's neurons;
- co-activation ``C = sum_t ĉ_t ĉ_t^T`` with ``ĉ_t = c_t / ||c_t||_1`` (neurons large together).

C is I×I per expert; while E·I² floats fit `coact_bytes` it is accumulated exactly, otherwise each
expert keeps a uniform reservoir sample of its tokens' ĉ rows and C is rebuilt from the sample
when that expert is partitioned — so memory stays bounded for 128-expert models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeprism.cache.host_store import HostStore
from edgeprism.corpus import CALIB
from edgeprism.errors import InputError
from edgeprism.moe.layer import MoEBlock
from edgeprism.refactor.partition import NeuronStats

Progress = Callable[[int, int], None]  # (layers done, layers total)


def calibration_ids(tokenizer: object, path: Path | None, max_tokens: int, eos_id: int | None) -> list[int]:
    """Tokens of the calibration text (the shipped `calib.txt` when path is None), documents split
    at blank lines and each followed by EOS, as the default model was trained."""
    path = CALIB if path is None else Path(path)
    if not path.is_file():
        raise InputError(f"calibration file {str(path)!r} does not exist; pass a UTF-8 text file "
                         "(or leave --calib out to use the built-in text).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read calibration file {path} as UTF-8 text ({e}).") from e
    ids: list[int] = []
    for doc in text.split("\n\n"):
        if doc.strip():
            ids += tokenizer.encode(doc) + ([eos_id] if eos_id is not None else [])  # type: ignore[attr-defined]
        if len(ids) >= max_tokens:
            break
    if len(ids) < 64:
        raise InputError(f"calibration file {path} gives only {len(ids)} tokens; give at least 64 (thousands are better).")
    return ids[:max_tokens]


def expert_units(store: HostStore, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert's G units from the host store, in fp32 whatever the storage format:
    w13 [G, 2Ig, D] (gate rows then up rows) and w2 [G, D, Ig]."""
    fmt = store.format
    rows = torch.arange(expert * store.groups, (expert + 1) * store.groups)
    w13, w2 = fmt.dequantize(fmt.parts(store.arenas[layer]), rows)
    return w13.float(), w2.float()


def expert_weights(store: HostStore, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1 [I, D], w3 [I, D], w2 [D, I]) in fp32, reassembled from the expert's units in the host store."""
    w13, w2 = expert_units(store, layer, expert)
    gi = store.group_inter
    return w13[:, :gi].reshape(-1, store.dim), w13[:, gi:].reshape(-1, store.dim), torch.cat(list(w2), dim=1)


@dataclass
class _ExpertAccumulator:
    inter: int
    sample_rows: int | None  # None: exact co-activation; else reservoir size
    rng: np.random.Generator
    tokens: int = 0
    importance: np.ndarray = field(init=False)
    active: np.ndarray = field(init=False)
    coact: np.ndarray | None = field(init=False)
    sample: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.importance = np.zeros(self.inter)
        self.active = np.zeros(self.inter)
        self.coact = np.zeros((self.inter, self.inter), dtype=np.float32) if self.sample_rows is None else None

    def add(self, c: torch.Tensor) -> None:
        # c: [n, I] |contributions| of the n tokens routed here
        self.importance += c.sum(0).double().numpy()
        self.active += (c > c.mean(1, keepdim=True)).sum(0).double().numpy()
        cn = c / c.sum(1, keepdim=True).clamp_min(1e-30)  # [n, I]
        if self.coact is not None:
            self.coact += (cn.T @ cn).numpy()
        else:
            self._reservoir(cn.to(torch.float16).numpy())
        self.tokens += c.shape[0]

    def _reservoir(self, rows: np.ndarray) -> None:
        """Algorithm R: every token seen so far is in the sample with equal probability."""
        assert self.sample_rows is not None
        for seen, r in enumerate(rows, start=self.tokens + 1):  # seen: tokens so far, r included
            if len(self.sample) < self.sample_rows:
                self.sample.append(r)
                continue
            slot = int(self.rng.integers(0, seen))
            if slot < self.sample_rows:
                self.sample[slot] = r

    def stats(self) -> NeuronStats:
        n = max(1, self.tokens)
        if self.coact is not None:
            coact = self.coact.astype(np.float64)
        elif self.sample:
            s = np.stack(self.sample).astype(np.float32)
            coact = (s.T @ s).astype(np.float64) * (self.tokens / len(self.sample))
        else:
            coact = np.zeros((self.inter, self.inter))
        return NeuronStats(importance=self.importance / n, frequency=self.active / n, coact=coact, tokens=self.tokens)


@dataclass
class LayerStats:
    """One MoE layer's accumulators; `expert(e)` builds that expert's `NeuronStats` on demand."""

    layer: int
    experts: list[_ExpertAccumulator]

    def expert(self, e: int) -> NeuronStats:
        return self.experts[e].stats()


def _contributions(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2_norm: torch.Tensor) -> torch.Tensor:
    # x: [n, D]; w1, w3: [I, D]; w2_norm: [I] -> [n, I] |neuron terms| of the expert output
    return (F.silu(x @ w1.T) * (x @ w3.T)).abs() * w2_norm


@torch.inference_mode()
def calibrate(engine: object, ids: list[int], *, window: int = 256, coact_bytes: int = 512 * 2**20,
              seed: int = 0, progress: Progress | None = None) -> Iterator[LayerStats]:
    """Yield the statistics of each MoE layer in order, streaming `ids` layer by layer through
    `engine`'s decoder in windows of `window` tokens (each window attends within itself)."""
    model, store, spec = engine.model, engine.store, engine.spec  # type: ignore[attr-defined]
    device = engine.device  # type: ignore[attr-defined]
    E, inter = spec.num_experts, spec.moe_intermediate
    sample_rows = None if E * inter * inter * 4 <= coact_bytes else max(64, coact_bytes // (E * inter * 2))
    rng = np.random.default_rng(seed)
    hidden = [model.embed(torch.tensor(ids[s:s + window], device=device)) for s in range(0, len(ids), window)]
    for layer, block in enumerate(model.layers):
        moe = block.ffn if isinstance(block.ffn, MoEBlock) else None
        acc = [_ExpertAccumulator(inter, sample_rows, rng) for _ in range(E)] if moe is not None else []
        weights = [expert_weights(store, layer, e) for e in range(E)] if moe is not None else []
        for i, x in enumerate(hidden):
            T = x.shape[0]
            h = x + block.attn(block.attn_norm(x), model.cos[:T], model.sin[:T], 0, model.attention_mask(0, T))
            f = block.ffn_norm(h)  # [T, D]: the MoE input
            if moe is not None:
                _, eids = moe.adapter.route(moe.gate(f), moe.top_k, moe.normalize)  # [T, k]
                fc = f.float().cpu()
                for e in torch.unique(eids).tolist():
                    tokens = torch.nonzero((eids == e).any(-1)).squeeze(-1).cpu()
                    w1, w3, w2 = weights[e]
                    acc[e].add(_contributions(fc[tokens], w1, w3, w2.norm(dim=0)))
            hidden[i] = h + block.ffn(f)
        if progress is not None:
            progress(layer + 1, len(model.layers))
        if moe is not None:
            yield LayerStats(layer, acc)
