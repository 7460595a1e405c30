"""Training-free sub-expert gate: which routed units run when `keep` < 1.

Every routed unit (token t, routed expert j, group g) gets a mass ``w_tj · s_tjg``: the router
weight times the group's estimated share of the expert's output (``s`` sums to 1 over the groups).
One ranking of all of a token's routed units by mass; the smallest prefix holding ``keep`` of the
token's total mass runs (at least one unit), the rest get weight exactly 0. Shares come from:

- ``score`` (MoE-Prism): the SwiGLU terms of each group's few core neurons, computed from those
  neurons' own w1/w3 rows and scaled by ||w2 column|| and by calibration's group ÷ core importance;
- ``static``: the group's calibrated importance, the same for every token (uniform without an
  artifact, so with G = 1 it drops the lowest-weighted experts: a mass-based top-k).

An artifact's always-on group (0) always runs with its expert; its dropped group (G-1) never runs
when keep < 1. keep = 1 never calls the gate, so full quality stays bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALWAYS_ON_BONUS = 1e6  # ranks the always-on group first; masses are ≤ 1 (router probabilities)


class UnitGate:
    """Per-unit weights [T, k, G] for one call; `keep` is set by the engine per call."""

    def __init__(self, groups: int, importance: dict[int, torch.Tensor], core_w13: dict[int, torch.Tensor] | None = None,
                 core_w2: dict[int, torch.Tensor] | None = None, always_on: bool = False, dropped: bool = False) -> None:
        # importance[layer]: [E, G]; core_w13[layer]: [E, G, c, 2, D]; core_w2[layer]: [E, G, c] (||w2 col|| × scale)
        self.groups, self.importance = groups, importance
        self.core_w13, self.core_w2 = core_w13, core_w2
        self.always_on, self.dropped = always_on, dropped
        self.mode = "score" if core_w13 is not None else "static"
        self.keep = 1.0
        self.units_dropped = 0  # a device tensor once counting starts (no host sync per layer)

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # x: [T, D]; ids, weights: [T, k] -> per-unit weights [T, k, G] (0 = skipped)
        T, k = ids.shape
        mass = (weights.float()[..., None] * self.shares(layer, x, ids)).reshape(T, -1)  # [T, kG]
        priority = mass.clone()
        if self.always_on:
            priority.view(T, k, -1)[..., 0] += ALWAYS_ON_BONUS
        order = priority.argsort(dim=-1, descending=True, stable=True)  # [T, kG]
        ranked = mass.gather(-1, order)
        before = ranked.cumsum(-1) - ranked  # mass ranked above each unit
        run = before < self.keep * mass.sum(-1, keepdim=True)
        run[:, 0] = True  # at least one unit per token
        mask = torch.zeros_like(run).scatter(-1, order, run).view(T, k, -1)
        if self.always_on:
            mask[..., 0] = True  # runs with its expert whatever the budget (its mass is counted first)
        if self.dropped:
            mask[..., -1] = False
        self.units_dropped = self.units_dropped + (~mask).sum()
        return weights[..., None] * mask.to(weights.dtype)

    def shares(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each routed expert's split of its output over its groups: [T, k, G], rows sum to 1."""
        if self.mode == "score" and self.core_w13 is not None and self.core_w2 is not None:
            est = self._core_estimate(layer, x, ids)
        else:
            est = self.importance[layer][ids].float()  # [T, k, G]
        return est / est.sum(-1, keepdim=True).clamp_min(1e-30)

    def _core_estimate(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.core_w13[layer], self.core_w2[layer]  # type: ignore[index]
        E, G, c, _, D = w13.shape
        h = F.linear(x, w13.view(-1, D)).float().view(-1, E, G, c, 2)  # [T, E, G, c, 2]: every expert's cores
        terms = (F.silu(h[..., 0]) * h[..., 1]).abs() * w2.float()  # [T, E, G, c]
        est = terms.sum(-1)  # [T, E, G]
        return est.gather(1, ids[..., None].expand(-1, -1, G))  # [T, k, G]
