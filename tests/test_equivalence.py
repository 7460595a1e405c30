"""Golden checks: edgeprism's logits and greedy tokens equal transformers' on every family."""

from __future__ import annotations

import pytest
import torch

import edgeprism
from conftest import VARIANTS, reference_model

NAMES = [v.name for v in VARIANTS]


def prompt(n: int, vocab: int = 131, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed + n)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def engines(checkpoints):
    # prefill_chunk=5 so prompts run in several chunks through the KV cache
    return {name: edgeprism.load(path, device="cpu", dtype="fp32", prefill_chunk=5) for name, path in checkpoints.items()}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length", [1, 7, 33])
def test_logits_match_transformers(checkpoints, engines, name, length):
    ids = prompt(length)
    ref = reference_model(checkpoints[name])
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    got = engines[name].logits(ids)
    assert got.shape == expected.shape == (length, 131)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_transformers(checkpoints, engines, name):
    ids = prompt(9)
    ref = reference_model(checkpoints[name])
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    expected = out[0, len(ids):].tolist()
    assert len(expected) == 32
    assert engines[name].generate_ids(ids, max_new_tokens=32) == expected


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_is_as_close_as_transformers_own(checkpoints, engines, dtype):
    """Held to transformers' own half-precision error, position by position: ours ≤ 2x theirs + 0.02.

    A position may exceed it only through a top-k routing flip: when two experts' router
    probabilities nearly tie, half-precision rounding picks either (seen: 1 position in 12 on
    this model, error 0.68 there and ≤ 0.04 elsewhere), so ≥ 85% of positions must hold the bound.
    """
    import transformers

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    path, ids = checkpoints["qwen3moe-headdim"], prompt(33)
    ref32 = engines["qwen3moe-headdim"].logits(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, experts_implementation="eager")
    with torch.no_grad():
        err_hf = (hf(torch.tensor([ids])).logits[0].float() - ref32).abs().amax(-1)  # [T]
    half = edgeprism.load(path, device="cpu", dtype=dtype)
    assert half.model.embed.weight.dtype == torch_dtype
    err_ours = (half.logits(ids) - ref32).abs().amax(-1)  # [T]
    within = (err_ours <= 2 * err_hf + 0.02).float().mean().item()
    assert within >= 0.85, (within, err_ours, err_hf)
    assert len(half.generate_ids(ids, max_new_tokens=8)) == 8
