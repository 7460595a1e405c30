"""Sub-expert SwiGLU over cache slots.

A unit (one group of one expert's neurons) is one flat row of a slot pool, laid out as
``[w1_g (Ig×D) | w3_g (Ig×D) | w2_g (D×Ig)]`` so that it moves in one copy and its gate/up rows
are one matrix. Summing the outputs of all of an expert's groups reproduces the expert exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit_numel(dim: int, group_inter: int) -> int:
    return 3 * dim * group_inter


def split_pool(pool: torch.Tensor, dim: int, group_inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a pool [S, 3·Ig·D] as gate/up [S, 2Ig, D] and down [S, D, Ig] (no copy)."""
    n13 = 2 * group_inter * dim
    return pool[:, :n13].view(-1, 2 * group_inter, dim), pool[:, n13:].view(-1, dim, group_inter)


def pack_unit(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w1, w3: [Ig, D]; w2: [D, Ig] -> the unit's flat row [3·Ig·D]."""
    return torch.cat((w1.reshape(-1), w3.reshape(-1), w2.reshape(-1)))


def swiglu_unit(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    # x: [n, D]; w13: [2Ig, D]; w2: [D, Ig] -> [n, D]
    gate, up = F.linear(x, w13).chunk(2, dim=-1)  # [n, Ig] x2
    return F.linear(F.silu(gate) * up, w2)


def grouped_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, slots: torch.Tensor,
                   tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over A (token, unit) assignments, one batched GEMV per matrix: no Python loop.

    x: [T, D]; w13: [S, 2Ig, D], w2: [S, D, Ig] (pool views); slots, tokens: [A] int64; weights: [A]
    -> [T, D]. Gathers the A units' weights (A·unit bytes of workspace), so use it when A is small
    (decode); prefill goes unit by unit instead.
    """
    h = torch.bmm(w13.index_select(0, slots), x.index_select(0, tokens).unsqueeze(-1)).squeeze(-1)  # [A, 2Ig]
    gate, up = h.chunk(2, dim=-1)  # [A, Ig] x2
    y = torch.bmm(w2.index_select(0, slots), (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [A, D]
    y = (y * weights[:, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y)
