"""Lean MoE decoder: model math only (batch 1, token-major shapes; `forward_batch` decodes one
token of each of B sequences, each against its own KV caches).

Shapes: T tokens of this call, S = tokens in the KV cache after it, D = hidden size, H / Hkv query
and key-value heads, hd = head dim, V = vocab. No device policy lives here: the MoE block's experts
come from an injected provider (`moe/layer.py`), and caches are created by `setup_caches`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeprism.config import ModelSpec
from edgeprism.models import fused
from edgeprism.models.modules import RMSNorm, SwiGLU
from edgeprism.moe.layer import ExpertProvider, MoEBlock


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, hd] in fp32, computed as transformers' default RoPE does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_len).float()[:, None] * inv_freq[None, :]  # [L, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [L, hd]
    return emb.cos(), emb.sin()


class KVCache(nn.Module):
    """Keys and values of one layer for up to `max_len` positions: [Hkv, max_len, hd] each."""

    def __init__(self, n_kv: int, max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(n_kv, max_len, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(n_kv, max_len, head_dim, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [Hkv, T, hd] -> views of everything cached so far: [Hkv, S, hd]
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.qk_norm, self.clip = spec.qk_norm, spec.clip_qkv
        q_out, kv_out = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        self.wq = nn.Linear(spec.dim, q_out, bias=spec.qkv_bias)
        self.wk = nn.Linear(spec.dim, kv_out, bias=spec.qkv_bias)
        self.wv = nn.Linear(spec.dim, kv_out, bias=spec.qkv_bias)
        self.wo = nn.Linear(q_out, spec.dim, bias=False)
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(spec.head_dim, spec.rms_eps), RMSNorm(spec.head_dim, spec.rms_eps)
        elif spec.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(q_out, spec.rms_eps), RMSNorm(kv_out, spec.rms_eps)
        self.cache: KVCache | None = None
        # the RoPE tables [max_len, hd] (set by Decoder.setup_caches) and the sliding window, for the
        # fused decode kernels (models/fused_triton.py)
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None
        # (weight [(H + 2·Hkv)·hd, D], bias or None) whose rows wq, wk, wv are views of, as the loader
        # lays them out (api.py): one GEMV for the three in fused decode (without it, the torch ops)
        self.wqkv: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.window = spec.sliding_window

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: [T, D]; cos, sin: [T, hd] -> q [T, H, hd], k, v [T, Hkv, hd] (normed, clipped, rotated)
        T = x.shape[0]
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # [T, H*hd], [T, Hkv*hd] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(T, self.n_heads, self.head_dim)
        k = k.view(T, self.n_kv, self.head_dim)
        v = v.view(T, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, hd]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        # x: [T, D]; cos, sin: [T, hd]; mask: [T, S] bool (True = attend) or None for plain causal
        T = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        assert self.cache is not None, "call Decoder.setup_caches() before running the model"
        keys, values = self.cache.update(start, k.transpose(0, 1), v.transpose(0, 1))  # [Hkv, S, hd]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys, values, attn_mask=mask,  # [H, T, hd]
            is_causal=mask is None and T > 1 and start == 0, enable_gqa=self.n_kv != self.n_heads)
        return self.wo(out.transpose(0, 1).reshape(T, -1))  # [T, D]

    def forward_batch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache],
                      starts: list[int], masks: list[torch.Tensor | None]) -> torch.Tensor:
        """One token of each of B sequences; sequence b writes and reads only `caches[b]`.

        x: [B, D]; cos, sin: [B, hd] (row b at position starts[b]); masks[b]: [1, S_b] bool or None.
        Projections run once for the batch; attention per sequence, as `forward` runs it for T = 1.
        """
        B = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)  # [B, H, hd], [B, Hkv, hd] x2
        out = []
        for b, (cache, start, mask) in enumerate(zip(caches, starts, masks, strict=True)):
            keys, values = cache.update(start, k[b, :, None], v[b, :, None])  # [Hkv, S_b, hd]
            out.append(F.scaled_dot_product_attention(q[b, :, None], keys, values, attn_mask=mask,  # [H, 1, hd]
                                                      enable_gqa=self.n_kv != self.n_heads))
        return self.wo(torch.stack(out).reshape(B, -1))  # [B, D]

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """One token at a device-side position: fixed shapes, no host sync (CUDA-graph capturable).

        x: [1, D]; cos, sin: [1, hd]; pos: [1] int64; mask: [L] bool over the first L cache slots.
        """
        assert self.cache is not None, "call Decoder.setup_caches() before running the model"
        ready = self.clip is None and self.tables is not None and self.wqkv is not None
        kern = fused.kernels(x) if ready else None
        if kern is not None:  # norm, RoPE, KV write and attention: three launches instead of ~25
            norm = {"head": 1, "full": 2}.get(self.qk_norm, 0)
            qw, kw = (self.q_norm.weight, self.k_norm.weight) if norm else (None, None)
            eps = self.q_norm.eps if norm else 0.0
            qkv = F.linear(x, *self.wqkv).reshape(-1)
            q_out, kv_out = self.wq.out_features, self.wk.out_features
            q, k, v = qkv[:q_out], qkv[q_out:q_out + kv_out], qkv[q_out + kv_out:]
            q = kern.rope_kv(q, k, v, qw, kw, norm, eps, *self.tables, self.cache.k, self.cache.v, pos)
            return self.wo(kern.decode_attention(q, self.cache.k, self.cache.v, pos, mask.shape[0], self.window))
        q, k, v = self._qkv(x, cos, sin)
        self.cache.k.index_copy_(1, pos, k.transpose(0, 1))
        self.cache.v.index_copy_(1, pos, v.transpose(0, 1))
        L = mask.shape[0]
        g = self.n_heads // self.n_kv  # query heads per KV head (heads kv*g .. kv*g+g-1 share KV head kv)
        qg = q.view(self.n_kv, g, self.head_dim)  # [Hkv, g, hd]
        scores = torch.bmm(qg, self.cache.k[:, :L].transpose(1, 2)) * self.head_dim ** -0.5  # [Hkv, g, L]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.bmm(probs, self.cache.v[:, :L])  # [Hkv, g, hd]
        return self.wo(out.reshape(1, -1))  # [1, D]


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, experts: ExpertProvider) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(spec.dim, spec.rms_eps)
        self.attn = Attention(spec)
        self.ffn_norm = RMSNorm(spec.dim, spec.rms_eps)
        self.ffn: nn.Module = (MoEBlock(spec, layer, experts) if spec.sparse_layers[layer]
                               else SwiGLU(spec.dim, spec.dense_intermediate))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin, start, mask)
        return h + self.ffn(self.ffn_norm(h))

    def forward_batch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache],
                      starts: list[int], masks: list[torch.Tensor | None]) -> torch.Tensor:
        # x: [B, D], one token per sequence -> [B, D]; the FFN (experts) runs once for the batch
        h = x + self.attn.forward_batch(self.attn_norm(x), cos, sin, caches, starts, masks)
        return h + self.ffn(self.ffn_norm(h))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        h = self.decode_attn(x, cos, sin, pos, mask)
        return h + self.ffn(self.ffn_norm(h))

    def decode_attn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """The attention half of `decode`: the residual stream h [1, D] entering the FFN."""
        return x + self.attn.decode(self.attn_norm(x), cos, sin, pos, mask)


class Decoder(nn.Module):
    """Token ids -> logits. Expert weights are not parameters here: `experts` supplies them."""

    def __init__(self, spec: ModelSpec, experts: ExpertProvider) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.dim)
        self.layers = nn.ModuleList(Block(spec, i, experts) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.dim, spec.rms_eps)
        self.lm_head = nn.Linear(spec.dim, spec.vocab_size, bias=False)
        self.max_len = 0

    def setup_caches(self, max_len: int) -> None:
        """Allocate KV caches and RoPE tables for `max_len` positions on the parameters' device."""
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        for block in self.layers:
            block.attn.cache = KVCache(self.spec.n_kv_heads, max_len, self.spec.head_dim, dtype, device)
        cos, sin = rope_tables(max_len, self.spec.head_dim, self.spec.rope_theta)
        # cast once here, as transformers casts the fp32 tables to the activation dtype every call
        self.register_buffer("cos", cos.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", sin.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("positions", torch.arange(max_len, device=device), persistent=False)
        for block in self.layers:
            block.attn.tables = (self.cos, self.sin)
        self.max_len = max_len

    def attention_mask(self, start: int, T: int) -> torch.Tensor | None:
        """None when plain causal attention is exact (no sliding window), else [T, S] bool."""
        window = self.spec.sliding_window
        if window is None or start + T <= window:
            return None if (start == 0 or T == 1) else self._causal(start, T, None)
        return self._causal(start, T, window)

    def _causal(self, start: int, T: int, window: int | None) -> torch.Tensor:
        q_pos = self.positions[start:start + T, None]  # [T, 1]
        k_pos = self.positions[None, :start + T]  # [1, S]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        return mask

    def forward(self, tokens: torch.Tensor, start: int, last_only: bool = False) -> torch.Tensor:
        # tokens: [T] ids at positions start..start+T-1 -> logits [T, V] ([1, V] if last_only)
        T = tokens.shape[0]
        x = self.embed(tokens)  # [T, D]
        cos = self.cos[start:start + T]  # [T, hd]
        sin = self.sin[start:start + T]
        mask = self.attention_mask(start, T)
        for block in self.layers:
            x = block(x, cos, sin, start, mask)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x))  # [T, V]

    def forward_batch(self, tokens: torch.Tensor, starts: list[int], caches: list[list[KVCache]]) -> torch.Tensor:
        """One token of each of B sequences at their own positions -> logits [B, V].

        tokens: [B]; starts[b]: the position of tokens[b] (its caches hold positions < starts[b]);
        caches[b]: sequence b's KV cache of every layer (not the model's own `setup_caches` caches).
        """
        x = self.embed(tokens)  # [B, D]
        pos = torch.tensor(starts, dtype=torch.long, device=tokens.device)
        cos, sin = self.cos[pos], self.sin[pos]  # [B, hd]
        masks = [self.attention_mask(start, 1) for start in starts]  # None or [1, S_b]
        for i, block in enumerate(self.layers):
            x = block.forward_batch(x, cos, sin, [c[i] for c in caches], starts, masks)
        return self.lm_head(self.norm(x))  # [B, V]

    def decode(self, token: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        """One token; token, pos: [1] device tensors; attends over the first `length` cache slots
        (masked beyond pos), so shapes depend on `length` only -> capturable in a CUDA graph."""
        x = self.embed(token)  # [1, D]
        cos, sin, mask = self.decode_tables(pos, length)
        kern = fused.kernels(x)
        if kern is None:
            for block in self.layers:
                x = block.decode(x, cos, sin, pos, mask)
            return self.lm_head(self.norm(x))  # [1, V]
        # the same math with each residual add fused into the norm after it: the stream is x + res
        res = None
        for block in self.layers:
            x, xn = kern.add_rms_norm(x, res, block.attn_norm.weight, block.attn_norm.eps)
            x, hn = kern.add_rms_norm(x, block.attn.decode(xn, cos, sin, pos, mask), block.ffn_norm.weight,
                                      block.ffn_norm.eps)
            res = block.ffn(hn)
        return self.lm_head(kern.add_rms_norm(x, res, self.norm.weight, self.norm.eps)[1])  # [1, V]

    def decode_tables(self, pos: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE rows [1, hd] x2 of device position `pos` [1] and its attention mask [length] bool."""
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        k_pos = self.positions[:length]  # [L]
        mask = k_pos <= pos
        if self.spec.sliding_window is not None:
            mask &= k_pos > pos - self.spec.sliding_window
        return cos, sin, mask
