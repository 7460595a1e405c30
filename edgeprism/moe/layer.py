"""The seam between model math and systems: route → experts (injected) → combine.

`MoEBlock` computes the router exactly as the family's reference does and asks an injected
`ExpertProvider` for the weighted sum of the routed experts. It never learns where expert weights
live (resident VRAM, a slot cache, pinned host RAM); that is the provider's business.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from edgeprism.config import ModelSpec
from edgeprism.models.families import adapter_for
from edgeprism.models.modules import SwiGLU


class ExpertProvider(Protocol):
    """Computes sum_j w[t, j] · expert_{ids[t, j]}(x[t]) for one MoE layer."""

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # x: [T, D]; ids, weights: [T, k] -> [T, D]
        ...


class MoEBlock(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, experts: ExpertProvider) -> None:
        super().__init__()
        self.layer, self.top_k, self.normalize = layer, spec.top_k, spec.norm_topk_prob
        self.adapter = adapter_for(spec)
        self.gate = nn.Linear(spec.dim, spec.num_experts, bias=False)
        self.experts = experts
        self.shared: nn.Module | None = None
        if spec.shared_intermediate:
            self.shared = SwiGLU(spec.dim, spec.shared_intermediate)
            self.shared_gate = nn.Linear(spec.dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]
        weights, ids = self.adapter.route(self.gate(x), self.top_k, self.normalize)  # [T, k] x2
        y = self.experts(self.layer, x, ids, weights)  # [T, D]
        if self.shared is not None:
            y = y + F.sigmoid(self.shared_gate(x)) * self.shared(x)
        return y
