"""Next-layer gate predictor: which experts will layer l+d route to, known while layer l runs.

Pre-gating without retraining: the residual stream changes little from one layer to the next, so
layer l+d's own router, applied to the state after layer l's attention (normed by layer l+d's FFN
norm, as its router expects), ranks l+d's experts well (measured on the default model: 81–91%
recall of the routed experts one layer ahead; `bench/routing_facts.py`). The device half
(`candidates`) is pure tensor math and runs inside the decode step's CUDA graphs; the host half
(`choose`) blends in the layer's recent activation history; `size_prediction` then cuts the
ranked set to what the copy engine can hide behind the compute before the target layer runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgeprism.moe.layer import MoEBlock
from edgeprism.models.modules import RMSNorm


class NextLayerPredictor:
    """Candidate experts of the next `lookahead` MoE layers, and the host-side choice among them."""

    def __init__(self, targets: list[tuple[RMSNorm, MoEBlock]], lookahead: int, candidates: int,
                 history_weight: float = 0.0, history_decay: float = 0.9) -> None:
        # targets[j] = (ffn_norm, MoE block) of the j-th MoE layer, in layer order
        self.targets, self.lookahead, self.num_candidates = targets, lookahead, candidates
        self.history_weight, self.history_decay = history_weight, history_decay
        num_experts = targets[0][1].gate.out_features
        self.history = torch.zeros(len(targets), num_experts)  # EMA of routing frequency, per MoE layer

    def candidates(self, h: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top candidates for MoE layers j+1 .. j+lookahead from h [1, D] (after layer j's attention).

        -> probabilities and expert ids, [lookahead, C] each (rows past the last layer repeat it).
        """
        probs, ids = [], []
        for d in range(1, self.lookahead + 1):
            norm, block = self.targets[min(j + d, len(self.targets) - 1)]
            p = torch.softmax(block.gate(norm(h)).float(), dim=-1)  # [1, E]
            top = p.topk(self.num_candidates, dim=-1)
            probs.append(top.values)
            ids.append(top.indices)
        return torch.cat(probs), torch.cat(ids)

    def observe(self, j: int, experts: list[int]) -> None:
        """Record the experts MoE layer j actually routed (host side, for the history blend)."""
        if self.history_weight:
            row = self.history[j]
            row.mul_(self.history_decay)
            row[experts] += 1.0 - self.history_decay

    def choose(self, j: int, probs: list[float], ids: list[int], count: int) -> list[int]:
        """The `count` experts to fetch for MoE layer j, from its device candidates (best first)."""
        if self.history_weight:
            hist = self.history[j]
            score = {e: p + self.history_weight * float(hist[e]) for p, e in zip(probs, ids)}
            ids = sorted(ids, key=lambda e: -score[e])
        return ids[:count]


def copy_budget(distance: int, layer_s: float | None, queued_s: float, copy_unit_s: float | None) -> int | None:
    """Units a prefetch for the MoE layer `distance` layers ahead can copy unseen: the compute time
    until that layer (distance × the measured time of a layer) minus the copies already queued,
    divided by one unit's copy time. None when a price or the layer time is unknown (no limit)."""
    if layer_s is None or copy_unit_s is None or copy_unit_s <= 0:
        return None
    return max(0, int((distance * layer_s - queued_s) / copy_unit_s))


def size_prediction(ranked: list[int], missing_units: Callable[[int], int], cap: int,
                    budget: int | None) -> list[int]:
    """The best-ranked experts to prefetch: at most `cap`, and while their missing units (resident
    ones cost no copy) fit `budget` copies; stops at the first expert that does not fit, so a copy
    is never spent on a lower-ranked expert ahead of a better one."""
    chosen, copies = [], 0
    for e in ranked[:cap]:
        need = missing_units(e)
        if budget is not None and copies + need > budget:
            break
        chosen.append(e)
        copies += need
    return chosen
