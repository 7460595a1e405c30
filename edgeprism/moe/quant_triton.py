"""Triton kernels of the quantized grouped decode path: dequantize-and-multiply straight from slots.

Imported only when Triton is installed and a CUDA device is used (`quant.triton_ready`); CPU and CI
use the torch reference in `quant.py`. Two launches per layer, whatever the number of units:

- `_w13_kernel`: grid (A, Ig / BLOCK_N). Program (a, nb) reads rows nb·BLOCK_N.. of the gate and up
  matrices of the unit in slot `slots[a]`, dequantizes them in registers and writes
  silu(gate) · up for token `tokens[a]` to an fp32 workspace act [A, Ig].
- `_w2_kernel`: grid (A, D / BLOCK_N). Program (a, nb) reads rows of the unit's down matrix and
  writes weights[a] · (w2 @ act[a]) to y [A, D] (fp32); `index_add_` sums the assignments per token.

Weights are read once, from the pool, in their stored width (1 or ½ byte per weight): no gathered or
dequantized copy is made. int4 works one quantization group at a time (a step unrolls KG of them),
so each row needs one scale and one minimum per group: Σ_k (q·s + m)·x_k = s·Σ q·x + m·Σ x.
Accumulation is fp32.
No atomics: results are deterministic for a given launch shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from edgeprism.moe.quant import QuantParts


@triton.jit
def _dot_rows(q_base, s_base, m_base, x_row, rows, rows_ok, K: tl.constexpr, GS: tl.constexpr,
              INT4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N]: Σ_k w[rows, k] · x[k] for one quantized matrix [N, K] of one unit.

    int4: each step covers BLOCK_K = KG·GS inputs, unrolled into KG quantization groups (one scale
    and minimum per row and group) so that KG independent loads are in flight."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if INT4:
        NG: tl.constexpr = K // GS
        HALF: tl.constexpr = GS // 2
        for k0 in range(0, K, BLOCK_K):
            for j in tl.static_range(BLOCK_K // GS):
                kb = (k0 + j * GS) // 2 + tl.arange(0, HALF)  # byte index: k = 2·kb (low nibble), 2·kb + 1 (high)
                x_even = tl.load(x_row + 2 * kb).to(tl.float32)
                x_odd = tl.load(x_row + 2 * kb + 1).to(tl.float32)
                b = tl.load(q_base + rows[:, None] * (K // 2) + kb[None, :], mask=rows_ok[:, None], other=0)
                qx = tl.sum((b & 15).to(tl.float32) * x_even[None, :] + (b >> 4).to(tl.float32) * x_odd[None, :], 1)
                g = (k0 + j * GS) // GS
                s = tl.load(s_base + rows * NG + g, mask=rows_ok, other=0).to(tl.float32)
                m = tl.load(m_base + rows * NG + g, mask=rows_ok, other=0).to(tl.float32)
                acc += s * qx + m * (tl.sum(x_even, 0) + tl.sum(x_odd, 0))
    else:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xk = tl.load(x_row + k, mask=k_ok, other=0).to(tl.float32)
            q = tl.load(q_base + rows[:, None] * K + k[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0)
            acc += tl.sum(q.to(tl.float32) * xk[None, :], 1)
        acc *= tl.load(s_base + rows, mask=rows_ok, other=0).to(tl.float32)
    return acc


@triton.jit
def _unit_bases(q_ptr, s_ptr, m_ptr, hq_ptr, hs_ptr, hm_ptr, slots_ptr, rows_ptr, a, q_stride, s_stride,
                DIRECT: tl.constexpr):
    """Base pointers of assignment a's unit: its slot in the VRAM pool, or (DIRECT, slot < 0) its row
    of the pinned host arena, which the kernel then reads over PCIe (zero-copy; host and pool rows
    have the same layout, so the same strides)."""
    slot = tl.load(slots_ptr + a).to(tl.int64)
    if DIRECT:
        if slot < 0:
            row = tl.load(rows_ptr + a).to(tl.int64)
            q_base, s_base, m_base = hq_ptr + row * q_stride, hs_ptr + row * s_stride, hm_ptr + row * s_stride
        else:
            q_base, s_base, m_base = q_ptr + slot * q_stride, s_ptr + slot * s_stride, m_ptr + slot * s_stride
    else:
        q_base, s_base, m_base = q_ptr + slot * q_stride, s_ptr + slot * s_stride, m_ptr + slot * s_stride
    return q_base, s_base, m_base


@triton.jit
def _w13_kernel(x_ptr, q_ptr, s_ptr, m_ptr, hq_ptr, hs_ptr, hm_ptr, slots_ptr, rows_ptr, tokens_ptr, weights_ptr,
                act_ptr, q_stride, s_stride, D: tl.constexpr, IG: tl.constexpr, GS: tl.constexpr, INT4: tl.constexpr,
                DIRECT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # gate rows n, up rows IG + n
    n_ok = n < IG
    # a unit of weight 0 (dropped by keep < 1) reads no weights: every load below is masked off
    live = tl.load(weights_ptr + a).to(tl.float32) != 0
    x_row = x_ptr + tl.load(tokens_ptr + a).to(tl.int64) * D
    q_base, s_base, m_base = _unit_bases(q_ptr, s_ptr, m_ptr, hq_ptr, hs_ptr, hm_ptr, slots_ptr, rows_ptr, a,
                                         q_stride, s_stride, DIRECT)
    gate = _dot_rows(q_base, s_base, m_base, x_row, n, n_ok & live, D, GS, INT4, BLOCK_N, BLOCK_K)
    up = _dot_rows(q_base, s_base, m_base, x_row, IG + n, n_ok & live, D, GS, INT4, BLOCK_N, BLOCK_K)
    act = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) · up
    tl.store(act_ptr + a * IG + n, act, mask=n_ok)


@triton.jit
def _w2_kernel(act_ptr, q_ptr, s_ptr, m_ptr, hq_ptr, hs_ptr, hm_ptr, slots_ptr, rows_ptr, weights_ptr, y_ptr,
               q_stride, s_stride, D: tl.constexpr, IG: tl.constexpr, GS: tl.constexpr, INT4: tl.constexpr,
               DIRECT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    n_ok = n < D
    w = tl.load(weights_ptr + a).to(tl.float32)
    q_base, s_base, m_base = _unit_bases(q_ptr, s_ptr, m_ptr, hq_ptr, hs_ptr, hm_ptr, slots_ptr, rows_ptr, a,
                                         q_stride, s_stride, DIRECT)
    y = _dot_rows(q_base, s_base, m_base, act_ptr + a * IG, n, n_ok & (w != 0), IG, GS, INT4, BLOCK_N, BLOCK_K)
    tl.store(y_ptr + a * D + n, y * w, mask=n_ok)


@triton.jit
def _sum_rows_kernel(y_ptr, out_ptr, A, D: tl.constexpr, BLOCK: tl.constexpr):
    # out[0, n] = Σ_a y[a, n] (fp32 sum of one token's weighted assignments, one rounding)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = n < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for a in range(0, A):
        acc += tl.load(y_ptr + a * D + n, mask=ok, other=0.0)
    tl.store(out_ptr + n, acc, mask=ok)


@dataclass(frozen=True)
class Blocks:
    """Launch shape of the two kernels: rows per program, K per step (int8: inputs; int4: groups),
    warps. Defaults from `bench/quant_kernels.py tune` on an H100 (Qwen3-30B-A3B units)."""

    n13: int
    n2: int
    k13: int
    k2: int
    warps13: int = 4
    warps2: int = 4


# H100, Qwen3-30B-A3B units, 8 per layer, CUDA graph (bench/results/2026-11-23-h100-quant/tune.json):
# int8 36 µs/layer (1.04 TB/s of stored weights), int4 55 µs/layer (0.36 TB/s)
INT8_BLOCKS = Blocks(n13=8, n2=32, k13=256, k2=256)
INT4_BLOCKS = Blocks(n13=16, n2=32, k13=1, k2=1, warps13=8)
DENSE_BLOCKS = Blocks(n13=8, n2=32, k13=128, k2=128)  # 16-bit weights: half the K of int8 per step


def _step_k(K: int, group_size: int, groups_per_step: int) -> int:
    """int4 inputs per step: the largest power-of-two number of groups ≤ asked that divides K/group."""
    kg = groups_per_step
    while (K // group_size) % kg:
        kg //= 2
    return kg * group_size


def grouped_dense(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, slots: torch.Tensor,
                  tokens: torch.Tensor, weights: torch.Tensor, blocks: Blocks = DENSE_BLOCKS,
                  host: tuple[torch.Tensor, torch.Tensor] | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`grouped` for unquantized 16-bit units: the int8 kernels with the weights as they are and a
    unit scale (a stride-0 row of ones). w13 [S, 2Ig, D], w2 [S, D, Ig] pool views -> [T, D];
    `host` = (w13, w2) views of a pinned host arena for the units with slot < 0 (see `grouped`)."""
    D, IG = x.shape[1], w2.shape[-1]
    ones = torch.ones(max(2 * IG, D), dtype=torch.float32, device=x.device)

    def parts_of(a13: torch.Tensor, a2: torch.Tensor) -> QuantParts:
        return QuantParts(q13=a13, s13=ones[None, :2 * IG].expand(a13.shape[0], -1),
                          q2=a2, s2=ones[None, :D].expand(a2.shape[0], -1))

    host_parts = parts_of(*host) if host is not None else None
    return grouped(x, parts_of(w13, w2), slots, tokens, weights, int4=False, group_size=0, blocks=blocks,
                   host=host_parts, rows=rows)


def grouped(x: torch.Tensor, parts: QuantParts, slots: torch.Tensor, tokens: torch.Tensor,
            weights: torch.Tensor, int4: bool, group_size: int, blocks: Blocks | None = None,
            host: QuantParts | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`UnitFormat.grouped` for int8/int4 on CUDA. x: [T, D]; slots, tokens, weights: [A] -> [T, D].

    With `host` (the same format's views of a pinned host arena) and `rows` [A], an assignment whose
    slot is < 0 reads its unit from host row rows[a] instead: the kernel streams it over PCIe
    (measured ~50 GB/s on the H100 box, as fast as a copy) and no copy or host decision is needed."""
    x = x.contiguous()
    A, D = slots.numel(), x.shape[1]
    IG = parts.q2.shape[-1] * (2 if int4 else 1)
    b = blocks or (INT4_BLOCKS if int4 else INT8_BLOCKS)
    m13 = parts.m13 if int4 else parts.s13  # unused by the int8 branch; any valid pointer
    m2 = parts.m2 if int4 else parts.s2
    direct = host is not None
    if direct:
        assert rows is not None and host.q13.stride(0) == parts.q13.stride(0) and host.q2.stride(0) == parts.q2.stride(0)
        assert host.s13.stride(0) == parts.s13.stride(0) and host.s2.stride(0) == parts.s2.stride(0)
        h = host
        hm13, hm2 = (h.m13, h.m2) if int4 else (h.s13, h.s2)
    else:
        h, hm13, hm2, rows = parts, m13, m2, slots
    k13 = _step_k(D, group_size, b.k13) if int4 else b.k13
    k2 = _step_k(IG, group_size, b.k2) if int4 else b.k2
    gs = group_size if int4 else 1
    weights = weights.reshape(-1)
    act = torch.empty(A, IG, dtype=torch.float32, device=x.device)
    y = torch.empty(A, D, dtype=torch.float32, device=x.device)
    _w13_kernel[(A, triton.cdiv(IG, b.n13))](
        x, parts.q13, parts.s13, m13, h.q13, h.s13, hm13, slots, rows, tokens, weights, act,
        parts.q13.stride(0), parts.s13.stride(0),
        D=D, IG=IG, GS=gs, INT4=int4, DIRECT=direct, BLOCK_N=b.n13, BLOCK_K=k13, num_warps=b.warps13)
    _w2_kernel[(A, triton.cdiv(D, b.n2))](
        act, parts.q2, parts.s2, m2, h.q2, h.s2, hm2, slots, rows, weights, y, parts.q2.stride(0), parts.s2.stride(0),
        D=D, IG=IG, GS=gs, INT4=int4, DIRECT=direct, BLOCK_N=b.n2, BLOCK_K=k2, num_warps=b.warps2)
    if x.shape[0] == 1:  # one token (decode): one launch sums the assignments, instead of three
        out = torch.empty_like(x)
        _sum_rows_kernel[(triton.cdiv(D, 256),)](y, out, A, D=D, BLOCK=256, num_warps=2)
        return out
    return torch.zeros_like(x).index_add_(0, tokens, y.to(x.dtype))
