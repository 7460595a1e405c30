"""CUDA-only checks of quantized experts (skipped without a GPU).

The Triton grouped kernels must equal the reference dequantize-then-matmul (computed in fp32 from
the same stored units) within bf16 output rounding, for Qwen3-30B-A3B units and for ragged shapes;
and an offloaded engine with quantized units must give the resident engine's tokens.
"""

from __future__ import annotations

import pytest
import torch

import edgeprism
from edgeprism.moe.quant import UnitFormat, make_format, triton_ready

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(fmt, parts, x, slots, tokens, w):
    f32 = make_format(fmt.name if fmt.name != "int4" else f"int4-g{fmt.group_size}", fmt.dim, fmt.group_inter, torch.float32)
    w13, w2 = f32.dequantize(parts, slots)  # [A, 2Ig, D], [A, D, Ig] fp32
    h = torch.einsum("and,ad->an", w13, x.float()[tokens])
    gate, up = h.chunk(2, dim=-1)
    y = torch.einsum("adi,ai->ad", w2, torch.nn.functional.silu(gate) * up) * w.float()[:, None]
    return torch.zeros(x.shape, device=x.device).index_add_(0, tokens, y)


@pytest.mark.parametrize("name", ["int8", "int4", "int4-g64"])
@pytest.mark.parametrize("shape", [(2048, 768), (256, 384), (192, 320)])
def test_triton_grouped_equals_reference(name, shape):
    assert triton_ready(), "triton should be importable on the GPU box"
    D, Ig = shape
    if name.startswith("int4") and (D % 64 or Ig % 64):
        pytest.skip("int4 needs group-divisible shapes")
    fmt = make_format(name, D, Ig, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    pool = torch.stack([fmt.pack(*(torch.randn(*s, generator=g, device="cuda") * 0.03 for s in ((Ig, D), (Ig, D), (D, Ig))))
                        for _ in range(12)])
    parts = fmt.parts(pool)
    x = torch.randn(2, D, generator=g, device="cuda").bfloat16()
    slots = torch.tensor([7, 2, 11, 0, 2, 5], device="cuda")
    tokens = torch.tensor([0, 0, 0, 1, 1, 1], device="cuda")
    w = torch.rand(6, generator=g, device="cuda").bfloat16()
    got = fmt.grouped(x, parts, slots, tokens, w).float()
    ref = reference(fmt, parts, x, slots, tokens, w)
    torch.testing.assert_close(got, ref, atol=2e-2 * ref.abs().max().item(), rtol=1e-2)
    # and the torch path (what CPU and CI run) agrees with the kernel
    torch_path = UnitFormat.grouped(fmt, x, parts, slots, tokens, w).float()
    torch.testing.assert_close(torch_path, ref, atol=3e-2 * ref.abs().max().item(), rtol=2e-2)
    assert torch.equal(fmt.grouped(x, parts, slots, tokens, w), fmt.grouped(x, parts, slots, tokens, w))  # deterministic


@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
def test_offloaded_quantized_equals_resident_on_cuda(expert_dtype):
    ids = [11, 400, 23, 1999, 7, 64, 301, 5]
    resident = edgeprism.load(device="cuda", dtype="bf16", expert_dtype=expert_dtype)
    small = edgeprism.load(device="cuda", dtype="bf16", expert_dtype=expert_dtype, cache_fraction=0.25)
    assert resident.experts.slot_map is not None and small.experts.slot_map is None
    assert small.store.pinned and small.cache.pool.dtype == torch.uint8
    assert small.generate_ids(ids, max_new_tokens=16) == resident.generate_ids(ids, max_new_tokens=16)
    s = small.stats()
    assert s["expert_dtype"] == expert_dtype and s["misses"] > 0
