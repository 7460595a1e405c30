"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgeprism.errors import InputError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature={self.temperature!r}: must be a number ≥ 0 (0 = greedy).")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p={self.top_p!r}: must be in (0, 1] (1 = off).")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k={self.top_k!r}: must be an integer ≥ 0 (0 = off).")

    def generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def choose(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """logits: [V] (any device) -> token id."""
    if s.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)  # [V], on the logits' device
    if s.top_k:
        kth = torch.topk(probs, min(s.top_k, probs.numel())).values[-1]
        probs = torch.where(probs < kth, 0.0, probs)
    if s.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < s.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p * keep)
    # inverse-CDF draw: O(V) like multinomial but ~40x faster on CPU for a 150k vocabulary
    # (torch.multinomial took milliseconds per token there). right=True never picks a token
    # of zero probability: the first i with cdf[i] > u has cdf[i-1] <= u < cdf[i].
    cdf = torch.cumsum(probs.double(), 0)
    u = torch.rand(1, generator=gen, dtype=torch.float64).to(cdf.device) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)
