"""Triton kernels that fuse the small ops of one-token decode (CUDA only; imported through `fused.py`).

At batch 1 a decoder layer is launch-bound: the H100 profile of a Qwen3-30B-A3B-shaped layer
(bench/results/2026-11-23-h100-fused/) showed 50 kernels and ~173 µs of kernel time per layer, most of
it in kernels that each move a few KB. These kernels replace chains of them with one launch each:

- `rope_kv`: q/k norm (per head or over the whole projection), RoPE, and the KV-cache write at the
  device-side position, for every query and key head: one launch instead of ~16.
- `decode_attention`: scores, mask (from the device-side position: causal and sliding window),
  softmax and the value sum, split over the cached positions (flash-decoding) and combined by a second
  launch: two launches instead of ~8.
- `route`: softmax, top-k and the renormalisation of the router's logits: one launch instead of ~8.
- `lookup` and `drop_misses`: zero-copy decode's map lookup (one launch instead of four) and its
  in-graph quality floor (one instead of ~15, which cost ~4 µs each on the serial path of every layer).
- `stage`: zero-copy decode's prefetch, the predicted next-layer units the cache lacks copied from host
  RAM into staging rows of the pool (cache/direct.py), on a side stream of the token's graph.

Rounding follows the reference ops where it is cheap to (bf16 results of each elementwise op, bf16
attention scores); sums run in a different order, so results equal the torch path within bf16
tolerance, not bit for bit. The tests compare both (tests/gpu/test_fused_cuda.py; they also run on the
CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, DT: tl.constexpr):
    """x rounded to the activation dtype and back (what a torch op on DT tensors stores)."""
    return x.to(DT).to(tl.float32)


@triton.jit
def _norm_rope_head(base, w_ptr, head, n_total, cos, sin, eps, HD: tl.constexpr, HDP: tl.constexpr,
                    NORM: tl.constexpr, DT: tl.constexpr):
    """Head `head` [HD] of a q or k projection (`base`, n_total values): RMS-normed (NORM 1: over the
    head, 2: over the whole projection) then rotated; fp32 values already rounded to DT."""
    i = tl.arange(0, HDP)  # lanes ≥ HD (head dims that are not a power of two) are masked off
    ok = i < HD
    HALF: tl.constexpr = HD // 2
    j = tl.where(i < HALF, i + HALF, i - HALF)  # rotate_half's partner of each lane
    src = base + head * HD
    x = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)
    xj = tl.load(src + j, mask=ok, other=0.0).to(tl.float32)
    if NORM == 1:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / HD + eps)
        x = _round(x * rstd * tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32), DT)
        xj = _round(xj * rstd * tl.load(w_ptr + j, mask=ok, other=0.0).to(tl.float32), DT)
    if NORM == 2:
        ss = tl.zeros([HDP], dtype=tl.float32)
        for t in range(0, n_total, HD):
            v = tl.load(base + t + i, mask=ok, other=0.0).to(tl.float32)
            ss += v * v
        rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / n_total + eps)
        x = _round(x * rstd * tl.load(w_ptr + head * HD + i, mask=ok, other=0.0).to(tl.float32), DT)
        xj = _round(xj * rstd * tl.load(w_ptr + head * HD + j, mask=ok, other=0.0).to(tl.float32), DT)
    rot = tl.where(i < HALF, -xj, xj)
    return _round(_round(x * cos, DT) + _round(rot * sin, DT), DT)


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, qo_ptr,
                    eps, H, HKV, cache_head_stride, HD: tl.constexpr, HDP: tl.constexpr, NORM: tl.constexpr,
                    DT: tl.constexpr):
    # program h < H: query head h -> qo; program H + j: key head j and value head j -> the caches at pos
    h = tl.program_id(0)
    i = tl.arange(0, HDP)
    ok = i < HD
    pos = tl.load(pos_ptr).to(tl.int64)
    cos = tl.load(cos_ptr + pos * HD + i, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HD + i, mask=ok, other=0.0).to(tl.float32)
    if h < H:
        out = _norm_rope_head(q_ptr, qw_ptr, h, H * HD, cos, sin, eps, HD, HDP, NORM, DT)
        tl.store(qo_ptr + h * HD + i, out, mask=ok)
    else:
        j = h - H
        out = _norm_rope_head(k_ptr, kw_ptr, j, HKV * HD, cos, sin, eps, HD, HDP, NORM, DT)
        dst = j.to(tl.int64) * cache_head_stride + pos * HD + i
        tl.store(kc_ptr + dst, out, mask=ok)
        tl.store(vc_ptr + dst, tl.load(v_ptr + j * HD + i, mask=ok), mask=ok)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (Triton's CPU interpreter only, whose 16-bit dot is
    wrong) multiplies fp32 copies instead, exactly."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _attn_partial_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, scale, L, window,
                         cache_head_stride, G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr,
                         CHUNK: tl.constexpr, BL: tl.constexpr, WINDOW: tl.constexpr, DT: tl.constexpr,
                         UPCAST: tl.constexpr):
    # program (kv head, chunk c): the G query heads sharing the KV head, over positions
    # [c·CHUNK, (c+1)·CHUNK) ∩ [0, L), online softmax; writes the chunk's max, sum and weighted values
    kv = tl.program_id(0)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    pos = tl.load(pos_ptr)
    g = tl.arange(0, GP)
    d = tl.arange(0, HDP)
    d_ok = d < HD
    q = tl.load(q_ptr + (kv * G + g)[:, None] * HD + d[None, :], mask=(g < G)[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, HDP], dtype=tl.float32)
    base = kv.to(tl.int64) * cache_head_stride
    for s0 in range(0, CHUNK, BL):
        t = c * CHUNK + s0 + tl.arange(0, BL)
        ok = (t < L) & (t <= pos)
        if WINDOW:
            ok &= t > pos - window
        k = tl.load(kc_ptr + base + t[:, None] * HD + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), UPCAST)  # [GP, BL] fp32
        s = _round(_round(s, DT) * scale, DT)  # the reference's bf16 scores, then × hd^-0.5
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no position yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + base + t[:, None] * HD + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    row = (kv * n_chunks + c) * GP + g
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)
    tl.store(acc_ptr + row[:, None] * HDP + d[None, :], acc)


@triton.jit
def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, n_chunks, G: tl.constexpr, GP: tl.constexpr,
                         HD: tl.constexpr, HDP: tl.constexpr):
    # program h (query head): combine the chunks' partial softmax sums into the head's output
    h = tl.program_id(0)
    kv = h // G
    gi = h % G
    d = tl.arange(0, HDP)
    m = tl.load(m_ptr + kv * n_chunks * GP + gi)
    for c in range(1, n_chunks):
        m = tl.maximum(m, tl.load(m_ptr + (kv * n_chunks + c) * GP + gi))
    num = tl.zeros([HDP], dtype=tl.float32)
    den = tl.sum(num, 0)  # 0.0 as an fp32 scalar
    for c in range(0, n_chunks):
        row = (kv * n_chunks + c) * GP + gi
        scale = tl.exp(tl.load(m_ptr + row) - m)  # 0 for a chunk with no position (m = -inf)
        den += tl.load(l_ptr + row) * scale
        num += tl.load(acc_ptr + row * HDP + d) * scale
    tl.store(out_ptr + h * HD + d, num / den, mask=d < HD)


@triton.jit
def _route_kernel(logits_ptr, w_ptr, ids_ptr, E, K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr,
                  NORMALIZE: tl.constexpr):
    # program t (token): softmax over E logits in fp32, the K largest (lowest index first on ties),
    # renormalised to sum 1 when asked; weights stored in the output's dtype
    t = tl.program_id(0)
    e = tl.arange(0, EP)
    x = tl.load(logits_ptr + t * E + e, mask=e < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    p = tl.where(e < E, p, -1.0)
    kk = tl.arange(0, KP)
    vals = tl.zeros([KP], dtype=tl.float32)
    idx = tl.zeros([KP], dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(p, 0)
        pick = tl.min(tl.where(p == best, e, EP), 0)
        vals = tl.where(kk == j, best, vals)
        idx = tl.where(kk == j, pick.to(tl.int64), idx)
        p = tl.where(e == pick, -1.0, p)
    if NORMALIZE:
        vals = vals / tl.sum(tl.where(kk < K, vals, 0.0), 0)
    tl.store(w_ptr + t * K + kk, vals, mask=kk < K)
    tl.store(ids_ptr + t * K + kk, idx, mask=kk < K)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, h_ptr, n_ptr, eps, D, HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
                         DT: tl.constexpr):
    # h = x + r (rounded as the torch add stores it), n = RMSNorm(h)·w (fp32 math, one rounding)
    i = tl.arange(0, BLOCK)
    ok = i < D
    h = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        h = _round(h + tl.load(r_ptr + i, mask=ok, other=0.0).to(tl.float32), DT)
        tl.store(h_ptr + i, h, mask=ok)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / D + eps)
    tl.store(n_ptr + i, h * rstd * tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32), mask=ok)


@triton.jit
def _lookup_kernel(ids_ptr, map_ptr, rows_ptr, slots_ptr, unit_rows_ptr, hit_ptr, log_ptr, codes_ptr, base, N, P,
                   G: tl.constexpr, NP: tl.constexpr, PP: tl.constexpr, STAGED: tl.constexpr):
    # unit a = (routed expert a // G, group a % G): its slot in the layer's map (-1: not cached), its
    # host-arena row, whether it was mapped, and the routing recorded for the host. STAGED: a unit
    # not mapped but staged by the prefetch (codes[j] = its code e·G + g) reads staging row base + j.
    a = tl.arange(0, NP)
    ok = a < N
    e = tl.load(ids_ptr + a // G, mask=ok, other=0)
    g = a % G
    slot = tl.load(map_ptr + e * G + g, mask=ok, other=-1)
    tl.store(hit_ptr + a, (slot >= 0).to(tl.int8), mask=ok)
    if STAGED:
        j = tl.arange(0, PP)
        codes = tl.load(codes_ptr + j, mask=j < P, other=-1)
        match = (codes[None, :] == (e * G + g)[:, None]) & (codes[None, :] >= 0)  # [NP, PP]
        at = tl.max(tl.where(match, j[None, :], -1), axis=1)
        slot = tl.where((slot < 0) & (at >= 0), base + at, slot)
    tl.store(slots_ptr + a, slot, mask=ok)
    tl.store(unit_rows_ptr + a, tl.load(rows_ptr + e * G + g, mask=ok, other=0), mask=ok)
    tl.store(log_ptr + a // G, e, mask=ok & (g == 0))


@triton.jit
def _stage_kernel(ids_ptr, map_ptr, rows_ptr, src_ptr, dst_ptr, codes_ptr, base, W, NCH, TOTAL, P, BUDGET,
                  G: tl.constexpr, BLOCK: tl.constexpr, PP: tl.constexpr):
    # Prefetch staging: predicted unit i = (expert ids[i // G], group i % G), best-ranked first. A
    # unit the map holds costs nothing (code -1); of the others, the first BUDGET in rank order are
    # copied, in NCH chunks of BLOCK words, from their rows of the layer's host arena (read over
    # PCIe) into staging rows base + i of the pool, and their codes e·G + g written for the layer's
    # lookup (-1 for the rest). Programs stride over the (unit, chunk) items, so the copy occupies
    # only as many SMs as the grid has programs.
    j = tl.arange(0, PP)
    ej = tl.load(ids_ptr + j // G, mask=j < P, other=0)
    missing = (tl.load(map_ptr + ej * G + j % G, mask=j < P, other=0) < 0) & (j < P)
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    for t in range(pid, TOTAL, nprog):
        i = t // NCH
        c = t % NCH
        e = tl.load(ids_ptr + i // G)
        g = i % G
        slot = tl.load(map_ptr + e * G + g)
        rank = tl.sum((missing & (j < i)).to(tl.int32), axis=0)  # missing units ranked before unit i
        take = (slot < 0) & (rank < BUDGET)
        row = tl.load(rows_ptr + e * G + g).to(tl.int64)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        m = offs < tl.where(take, W, 0)  # a mapped or over-budget unit copies nothing
        v = tl.load(src_ptr + row * W + offs, mask=m)
        tl.store(dst_ptr + (base + i).to(tl.int64) * W + offs, v, mask=m)
        if c == 0:
            tl.store(codes_ptr + i, tl.where(take, e * G + g, -1))


@triton.jit
def _drop_misses_kernel(slots_ptr, w_ptr, floor_ptr, out_ptr, stats_ptr, N, NP: tl.constexpr):
    # unit i is dropped when it is a miss (slot < 0) and the misses ranked up to it (ascending weight,
    # lower index first on ties: a stable sort) hold at most (1 - floor) of the routed mass
    i = tl.arange(0, NP)
    ok = i < N
    w_raw = tl.load(w_ptr + i, mask=ok, other=0.0)
    w = w_raw.to(tl.float32)
    miss = ok & (tl.load(slots_ptr + i, mask=ok, other=0) < 0)
    total = tl.sum(w, axis=0)
    budget = (1.0 - tl.load(floor_ptr)) * total
    wj = tl.load(w_ptr + i[None, :], mask=ok[None, :], other=0.0).to(tl.float32)  # [1, NP]
    mj = ok[None, :] & (tl.load(slots_ptr + i[None, :], mask=ok[None, :], other=0) < 0)
    first = mj & ((wj < w[:, None]) | ((wj == w[:, None]) & (i[None, :] <= i[:, None])))  # [NP, NP]
    prefix = tl.sum(tl.where(first, wj, 0.0), axis=1)  # missed mass ranked up to and including unit i
    drop = miss & (prefix <= budget)
    tl.store(out_ptr + i, tl.where(drop, 0.0, w_raw).to(w_raw.dtype), mask=ok)
    tl.store(stats_ptr, tl.sum(drop.to(tl.float32), axis=0))
    tl.store(stats_ptr + 1, tl.sum(tl.where(drop, 0.0, w), axis=0))
    tl.store(stats_ptr + 2, total)


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
CHUNK = 64  # positions per attention program (the graphs' attention-length bucket, 256, is a multiple)


def _pad(hd: int) -> int:
    """Lanes for a head of hd values: a power of two, ≥ 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(hd))


def rope_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_w: torch.Tensor | None, k_w: torch.Tensor | None,
            norm: int, eps: float, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
            cache_v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotated queries [H, hd] of one token; writes its rotated key and its value at `pos` of the caches.

    q: [H·hd], k, v: [Hkv·hd] (contiguous); q_w, k_w: norm weights ([hd] for norm 1, the projection's
    size for norm 2, None for norm 0); cos, sin: the [max_len, hd] tables; cache_k, cache_v:
    [Hkv, max_len, hd]; pos: [1] int64 on the device."""
    H, HKV, HD = q.numel() // cache_k.shape[-1], cache_k.shape[0], cache_k.shape[-1]
    qo = torch.empty(H, HD, dtype=q.dtype, device=q.device)
    qw = q_w if q_w is not None else q
    kw = k_w if k_w is not None else k
    _rope_kv_kernel[(H + HKV,)](q, k, v, qw, kw, cos, sin, cache_k, cache_v, pos, qo, eps, H, HKV,
                                cache_k.stride(0), HD=HD, HDP=_pad(HD), NORM=norm, DT=_DT[q.dtype], num_warps=1)
    return qo


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor,
                     length: int, window: int | None) -> torch.Tensor:
    """Attention of one query token over the first `length` cache slots, masked to positions ≤ pos
    (and > pos − window): q [H, hd] -> [1, H·hd] in q's dtype."""
    H, HD = q.shape
    HKV = cache_k.shape[0]
    G = H // HKV
    GP = max(16, triton.next_power_of_2(G))
    n_chunks = triton.cdiv(length, CHUNK)
    m = torch.empty(HKV * n_chunks * GP, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(HKV * n_chunks * GP, _pad(HD), dtype=torch.float32, device=q.device)
    _attn_partial_kernel[(HKV, n_chunks)](
        q, cache_k, cache_v, pos, m, lsum, acc, HD ** -0.5, length, window or 0, cache_k.stride(0),
        G=G, GP=GP, HD=HD, HDP=_pad(HD), CHUNK=CHUNK, BL=64, WINDOW=window is not None, DT=_DT[q.dtype],
        UPCAST=_INTERPRET, num_warps=4)
    out = torch.empty(1, H * HD, dtype=q.dtype, device=q.device)
    _attn_combine_kernel[(H,)](m, lsum, acc, out, n_chunks, G=G, GP=GP, HD=HD, HDP=_pad(HD), num_warps=1)
    return out


def route(logits: torch.Tensor, top_k: int, normalize: bool, weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] in `weights_dtype`, ids [T, k] int64): softmax, top-k, renormalise."""
    T, E = logits.shape
    logits = logits.contiguous()
    w = torch.empty(T, top_k, dtype=weights_dtype, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.long, device=logits.device)
    _route_kernel[(T,)](logits, w, ids, E, K=top_k, KP=triton.next_power_of_2(top_k),
                        EP=triton.next_power_of_2(E), NORMALIZE=normalize, num_warps=1)
    return w, ids


def lookup(ids: torch.Tensor, layer_map: torch.Tensor, rows: torch.Tensor, hit_log: torch.Tensor,
           route_log: torch.Tensor, codes: torch.Tensor | None = None, base: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One token's k routed experts `ids` -> (slots, host rows) of its k·G units, from the layer's map
    [E, G] (-1 = not cached) and the host-row table [E, G]; writes hit_log [k·G] (bool: mapped) and
    route_log [k] (the ids) for the host. `codes` [P] (the layer's prefetch staging, `stage`): an
    unmapped unit found there gets staging slot base + its index. One launch instead of four."""
    G = layer_map.shape[-1]
    n = ids.numel() * G
    slots = torch.empty(n, dtype=torch.long, device=ids.device)
    unit_rows = torch.empty(n, dtype=torch.long, device=ids.device)
    P = codes.numel() if codes is not None else 1
    _lookup_kernel[(1,)](ids.reshape(-1), layer_map, rows, slots, unit_rows, hit_log.view(torch.int8), route_log,
                         codes if codes is not None else slots, base, n, P, G=G, NP=triton.next_power_of_2(n),
                         PP=max(2, triton.next_power_of_2(P)), STAGED=codes is not None, num_warps=1)
    return slots, unit_rows


STAGE_BLOCK = 4096  # words (int32) per copy item: 16 KiB
STAGE_PROGRAMS = int(os.environ.get("EDGEPRISM_STAGE_PROGRAMS", "64"))  # SMs the staging copy may occupy


def stage(ids: torch.Tensor, layer_map: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
          codes: torch.Tensor, base: int, groups: int, budget: int | None = None) -> None:
    """Copy the predicted experts' unmapped units (ids [n] best first, groups each; at most `budget`
    of them, the best-ranked) from the host arena `src` [R, W] (int32 words, pinned: read over PCIe)
    into pool rows base .. base + n·G of `dst` [S, W], and write codes [n·G] (e·G + g, or -1 for a
    unit not staged). One launch; see `_stage_kernel`."""
    P, W = ids.numel() * groups, src.shape[1]
    nch = triton.cdiv(W, STAGE_BLOCK)
    total = P * nch
    _stage_kernel[(max(1, min(STAGE_PROGRAMS, total)),)](
        ids.reshape(-1), layer_map, rows, src, dst, codes, base, W, nch, total, P, P if budget is None else budget,
        G=groups, BLOCK=STAGE_BLOCK, PP=max(2, triton.next_power_of_2(P)), num_warps=4)


def drop_misses(slots: torch.Tensor, weights: torch.Tensor, floor: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """`weights` [A] with the lowest-weighted misses (slot < 0) zeroed while the dropped mass stays within
    (1 − floor) × the routed mass (`cache/direct.py: DirectCache.drop_misses`); writes stats [3] (fp32:
    units dropped, mass kept, mass routed). One launch instead of ~15."""
    n = weights.numel()
    kept = torch.empty_like(weights)
    _drop_misses_kernel[(1,)](slots, weights, floor, kept, stats, n, NP=max(16, triton.next_power_of_2(n)), num_warps=1)
    return kept


def add_rms_norm(x: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h)·weight) with h = x + res (x itself when res is None): one token [1, D], one
    launch for the residual add and the norm after it."""
    D = x.shape[-1]
    h = torch.empty_like(x) if res is not None else x
    n = torch.empty_like(x)
    _add_rms_norm_kernel[(1,)](x, res if res is not None else x, weight, h, n, eps, D, HAS_RES=res is not None,
                               BLOCK=triton.next_power_of_2(D), DT=_DT[x.dtype], num_warps=4)
    return h, n
