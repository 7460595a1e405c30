"""Quantized expert units (moe/quant.py): error bounds, packing, the grouped path against the
reference dequantize-then-matmul, the engine end to end, and held-out perplexity of the default model.

Round-trip bounds asserted per weight (see quant.py's docstring):
- int8, symmetric per output channel: |w − ŵ| ≤ s/2, s = max|w_row| / 127.
- int4, asymmetric per group: |w − ŵ| ≤ s/2 + fp16 rounding, s = (max − min)/15 stored in fp16,
  so the bound is s/2 · (1 + 2⁻⁸) + 2⁻¹¹ · |min| (the stored minimum is rounded to fp16).
"""

from __future__ import annotations

import math

import pytest
import torch

import edgeprism
from edgeprism.errors import ExpertDtypeError
from edgeprism.moe.kernels import grouped_swiglu, swiglu_unit
from edgeprism.moe.quant import (
    DenseFormat,
    Int4Format,
    Int8Format,
    dequantize_int4,
    dequantize_int8,
    make_format,
    quantize_int4,
    quantize_int8,
)

QUANT = ["int8", "int4", "int4-g64"]


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian weights with per-row scales spread over 3 decades, a few outliers and a flat row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n)[:, None]
    w[0, 5] = 40.0  # an outlier
    w[1] = 0.25  # a constant row (zero range)
    return w


@pytest.mark.parametrize("shape", [(64, 256), (96, 384)])
def test_int8_round_trip_bound(shape):
    w = weights(*shape, seed=1)
    q, s = quantize_int8(w)
    err = (dequantize_int8(q, s) - w).abs()
    assert q.dtype == torch.int8 and s.shape == (shape[0],)
    assert (err <= s[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
    assert err.max() / w.abs().max() < 1 / 254 + 1e-6


@pytest.mark.parametrize("group_size", [64, 128])
def test_int4_round_trip_bound(group_size):
    w = weights(96, 384, seed=2)
    q, s, m = quantize_int4(w, group_size)
    assert q.shape == (96, 192) and s.dtype == m.dtype == torch.float16
    err = (dequantize_int4(q, s, m, group_size) - w).abs().unflatten(-1, (-1, group_size))
    bound = s.float() / 2 * (1 + 2**-8) + m.float().abs() * 2**-11 + 1e-7
    assert (err <= bound[..., None]).all()
    # and the step itself is (max - min) / 15 of each group
    g = w.unflatten(-1, (-1, group_size))
    rng = (g.amax(-1) - g.amin(-1)) / 15
    torch.testing.assert_close(s.float(), rng.clamp(min=2**-14), rtol=2**-10, atol=0)


@pytest.mark.parametrize("name", QUANT + ["bf16", "fp16"])
def test_pack_and_views(name):
    D, Ig = 128, 192
    fmt = make_format(name, D, Ig, torch.float32)
    w1, w3, w2 = weights(Ig, D, 3), weights(Ig, D, 4), weights(D, Ig, 5)
    pool = torch.zeros(3, fmt.row_numel, dtype=fmt.row_dtype)
    pool[1] = fmt.pack(w1, w3, w2)
    w13, w2d = fmt.dequantize(fmt.parts(pool), torch.tensor([1]))
    assert w13.shape == (1, 2 * Ig, D) and w2d.shape == (1, D, Ig) and w13.dtype == torch.float32
    if fmt.quantized:
        assert fmt.unit_bytes % 16 == 0
        assert fmt.unit_bytes < fmt.dense_bytes / {"int8": 3.8, "int4": 6.5, "int4-g64": 6.5}[name]
        parts = fmt.parts(pool)
        q, s = (quantize_int8(w2) if name == "int8" else quantize_int4(w2, fmt.group_size)[:2])  # type: ignore[attr-defined]
        assert torch.equal(parts.q2[1], q) and torch.equal(parts.s2[1], s)
    ref = torch.cat((w1, w3)).to(fmt.row_dtype).float() if not fmt.quantized else None
    if ref is not None:
        assert torch.equal(w13[0], ref)


@pytest.mark.parametrize("name", QUANT + ["bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_reference(name, dtype):
    """The grouped path (and the CPU one-call-per-layer path) equals dequantize-then-matmul per unit."""
    D, Ig, S = 128, 256, 6
    fmt = make_format(name, D, Ig, dtype)
    pool = torch.stack([fmt.pack(weights(Ig, D, 10 + i) * 0.05, weights(Ig, D, 20 + i) * 0.05, weights(D, Ig, 30 + i) * 0.05)
                        for i in range(S)])
    parts = fmt.parts(pool)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    slots, tokens = torch.tensor([4, 1, 5, 0, 2, 4]), torch.tensor([0, 0, 1, 1, 2, 2])
    w = torch.rand(6, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = torch.zeros_like(x)
    for a in range(len(slots)):
        w13, w2 = fmt.dequantize(parts, slots[a:a + 1])
        ref.index_add_(0, tokens[a:a + 1], (swiglu_unit(x[tokens[a:a + 1]], w13[0], w2[0]) * w[a]).to(dtype))
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(fmt.grouped(x, parts, slots, tokens, w), ref, **tol)
    torch.testing.assert_close(fmt.cpu_grouped(x, parts, slots, tokens, w), ref, **tol)
    torch.testing.assert_close(fmt.unit(x[:1], parts, 3), swiglu_unit(x[:1], *(t[0] for t in fmt.dequantize(parts, torch.tensor([3])))), **tol)


def test_dense_format_is_the_unquantized_path():
    D, Ig = 64, 96
    fmt = make_format(None, D, Ig, torch.float32)
    assert isinstance(fmt, DenseFormat) and not fmt.quantized and fmt.row_dtype == torch.float32
    assert isinstance(make_format("fp32", D, Ig, torch.float32), DenseFormat)
    pool = torch.randn(4, fmt.row_numel)
    parts = fmt.parts(pool)
    x, slots, tokens, w = torch.randn(1, D), torch.tensor([2, 0]), torch.tensor([0, 0]), torch.rand(2)
    assert torch.equal(fmt.grouped(x, parts, slots, tokens, w), grouped_swiglu(x, parts.w13, parts.w2, slots, tokens, w))


def test_format_choice_and_errors():
    assert isinstance(make_format("int8", 256, 384, torch.float32), Int8Format)
    assert make_format("int4", 256, 384, torch.float32).group_size == 128  # type: ignore[attr-defined]
    assert make_format("int4", 256, 192, torch.float32).group_size == 64  # type: ignore[attr-defined]
    with pytest.raises(ExpertDtypeError, match="group size"):
        make_format("int4", 256, 96, torch.float32)
    for bad in ("int3", "q4_k", 7):
        with pytest.raises(ExpertDtypeError):
            make_format(bad, 256, 384, torch.float32)  # type: ignore[arg-type]
    with pytest.raises(ExpertDtypeError):
        edgeprism.load(device="cpu", expert_dtype="int2")


# ---- the engine end to end (default model, CPU) -----------------------------------------------

IDS = [11, 400, 23, 1999, 7, 64, 301, 5, 812, 90]


@pytest.fixture(scope="module")
def int4_resident():
    return edgeprism.load(device="cpu", dtype="fp32", expert_dtype="int4", prefill_chunk=PPL_WINDOW)


def test_engine_reports_format_and_plans_more_slots(int4_resident):
    s = int4_resident.stats()
    assert s["expert_dtype"] == "int4" and s["unit_bytes"] == int4_resident.format.unit_bytes
    assert isinstance(int4_resident.format, Int4Format)
    assert int4_resident.store.arenas[0].dtype == torch.uint8 and int4_resident.cache.pool.dtype == torch.uint8
    dense = 3 * 256 * 384 * 4
    assert s["unit_bytes"] * 7 < dense  # fp32 -> int4: 7.5x fewer bytes per unit


def test_offloading_is_invisible_with_quantized_units(int4_resident):
    small = edgeprism.load(device="cpu", dtype="fp32", expert_dtype="int4", cache_fraction=0.25)
    assert small.experts.slot_map is None  # a dynamic cache
    assert torch.equal(small.logits(IDS), int4_resident.logits(IDS))
    assert small.generate_ids(IDS, max_new_tokens=12) == int4_resident.generate_ids(IDS, max_new_tokens=12)
    s = small.stats()
    # every copy moves whole stored units (misses, plus any prefetched ones)
    assert s["misses"] > 0 and s["bytes_h2d"] % s["unit_bytes"] == 0 and s["bytes_h2d"] >= s["misses"] * s["unit_bytes"]
    small.cache.table.check_invariants()


# ---- held-out perplexity of the default model -------------------------------------------------

# Measured 2026-11-23 on CPU (torch 2.13.0+cpu), first 2048 predicted tokens of the held-out stream
# in windows of 512, resident weights fp32: fp32 experts 20.5828; bf16 20.5828 (+0.00%); int8 20.5864
# (+0.02%); int4 (group 128) 20.7220 (+0.68%). Over 4096 tokens: 22.0009; +0.00%; +0.01%; +0.48%.
# Thresholds are the issue's: int8 within 1%, int4 within 5% of the unquantized model (bf16 within 1%).
PPL_TOKENS, PPL_WINDOW, EOS_ID = 2048, 512, 0
PPL_LIMITS = {"bf16": 1.01, "int8": 1.01, "int4": 1.05}  # ratio to the unquantized (fp32) model


def perplexity(engine, ids: list[int]) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, PPL_WINDOW):
        chunk = ids[start:start + PPL_WINDOW + 1]
        logits = engine.logits(chunk[:-1])
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def test_quantized_perplexity(int4_resident):
    from edgeprism.corpus import token_stream

    ids = token_stream(int4_resident.tokenizer, PPL_TOKENS + 1, EOS_ID)
    base = perplexity(edgeprism.load(device="cpu", dtype="fp32", prefill_chunk=PPL_WINDOW), ids)
    ppl = {"int4": perplexity(int4_resident, ids)}
    for name in ("bf16", "int8"):
        ppl[name] = perplexity(edgeprism.load(device="cpu", dtype="fp32", expert_dtype=name, prefill_chunk=PPL_WINDOW), ids)
    report = f"fp32 {base:.4f}; " + "; ".join(f"{k} {v:.4f} ({100 * (v / base - 1):+.2f}%)" for k, v in ppl.items())
    print(report)
    for name, limit in PPL_LIMITS.items():
        assert ppl[name] <= base * limit, report
