"""The Triton grouped kernel on unquantized 16-bit units against the torch gather + bmm path."""

from __future__ import annotations

import pytest
import torch

from edgeprism.moe.kernels import grouped_swiglu, split_pool, unit_numel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,inter,assignments", [(256, 96, 8), (2048, 768, 8), (320, 40, 5)])
def test_dense_triton_matches_gather_bmm(dtype, dim, inter, assignments):
    pytest.importorskip("triton")
    from edgeprism.moe.quant_triton import grouped_dense

    g = torch.Generator(device="cuda").manual_seed(0)
    pool = (torch.randn(24, unit_numel(dim, inter), device="cuda", generator=g) * 0.05).to(dtype)
    w13, w2 = split_pool(pool, dim, inter)
    x = torch.randn(2, dim, device="cuda", generator=g).to(dtype)
    slots = torch.randperm(24, device="cuda", generator=g)[:assignments]
    tokens = torch.arange(assignments, device="cuda") % 2
    weights = torch.rand(assignments, device="cuda", generator=g)
    ours = grouped_dense(x, w13, w2, slots, tokens, weights).float()
    # reference in fp32 (the kernel accumulates in fp32); the bf16 torch path rounds in between
    ref = grouped_swiglu(x.float(), w13.float(), w2.float(), slots, tokens, weights).float()
    torch_16 = grouped_swiglu(x, w13, w2, slots, tokens, weights).float()
    err_ours, err_torch = (ours - ref).abs().max().item(), (torch_16 - ref).abs().max().item()
    assert err_ours <= err_torch + 1e-3, (err_ours, err_torch)
