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
from edgeprism.models import fused
from edgeprism.models.families import adapter_for
from edgeprism.models.modules import SwiGLU


class ExpertProvider(Protocol):
    """Computes sum_j w[t, j] · expert_{ids[t, j]}(x[t]) for one MoE layer; with `units` [T, k, G]
    it computes sum_{j,g} units[t, j, g] · unit_g(expert_{ids[t, j]})(x[t]) and skips zero-weight units."""

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 units: torch.Tensor | None = None) -> torch.Tensor:
        # x: [T, D]; ids, weights: [T, k]; units: [T, k, G] or None -> [T, D]
        ...


class UnitGateProtocol(Protocol):
    """Chooses the routed sub-experts that run when `keep` < 1 (`moe/gate.py`)."""

    keep: float

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # x: [T, D]; ids, weights: [T, k] -> per-unit weights [T, k, G], 0 = skipped
        ...


class MoEBlock(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, experts: ExpertProvider) -> None:
        super().__init__()
        self.layer, self.top_k, self.normalize = layer, spec.top_k, spec.norm_topk_prob
        self.adapter = adapter_for(spec)
        self.gate = nn.Linear(spec.dim, spec.num_experts, bias=False)
        self.experts = experts
        self.unit_gate: UnitGateProtocol | None = None  # set by the engine; consulted only when keep < 1
        self.shared: nn.Module | None = None
        if spec.shared_intermediate:
            self.shared = SwiGLU(spec.dim, spec.shared_intermediate)
            self.shared_gate = nn.Linear(spec.dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]
        weights, ids = self.route(x)  # [T, k] x2
        if self.unit_gate is not None and self.unit_gate.keep < 1.0:
            units = self.unit_gate(self.layer, x, ids, weights)  # [T, k, G]
            return self.combine(x, self.experts(self.layer, x, ids, weights, units))
        return self.combine(x, self.experts(self.layer, x, ids, weights))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights and expert ids of each token: [T, k] x2 (the family's semantics; one-token
        decode on CUDA runs them as one fused kernel, which puts the lower expert id first on a tie)."""
        logits = self.gate(x)
        kern = fused.kernels(logits)
        if kern is not None and x.shape[0] == 1:  # one launch instead of ~8 (models/fused_triton.py)
            dtype = torch.float32 if self.adapter.weights_in_fp32 else logits.dtype
            return kern.route(logits, self.top_k, self.normalize, dtype)
        return self.adapter.route(logits, self.top_k, self.normalize)

    def combine(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum y [T, D] plus the shared expert, if the family has one."""
        if self.shared is not None:
            y = y + F.sigmoid(self.shared_gate(x)) * self.shared(x)
        return y
