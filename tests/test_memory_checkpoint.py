"""In-memory checkpoints: a transformers model's own state_dict (fused expert tensors) and
synthetic random weights for benchmarks of real geometries."""

from __future__ import annotations

import torch

import edgeprism
from conftest import COMMON, transformers
from edgeprism.models.checkpoint import MemoryCheckpoint

IDS = [3, 14, 15, 92, 65, 35, 89, 79]


def test_state_dict_of_a_live_transformers_model(tmp_path):
    cfg = transformers.OlmoeConfig(**{**COMMON, "hidden_size": 48, "intermediate_size": 32, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(cfg).eval()
    model.config._experts_implementation = "eager"
    state = model.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in state)  # transformers 5 keeps experts fused
    source = MemoryCheckpoint({**cfg.to_dict(), "architectures": ["OlmoeForCausalLM"]}, state)
    eng = edgeprism.load(source, device="cpu", dtype="fp32")
    with torch.no_grad():
        expected = model(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(eng.logits(IDS), expected, atol=1e-4, rtol=1e-4)


def test_synthetic_weights_are_deterministic():
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 16,
           "num_experts_per_tok": 4, "moe_intermediate_size": 16, "norm_topk_prob": True}
    a = edgeprism.load(MemoryCheckpoint(cfg, seed=7), device="cpu", dtype="bf16", cache_fraction=0.25)
    b = edgeprism.load(MemoryCheckpoint(cfg, seed=7), device="cpu", dtype="bf16")
    la, lb = a.logits(IDS), b.logits(IDS)
    assert torch.isfinite(la).all() and la.std() > 0
    assert torch.equal(la, lb)
    assert a.generate_ids(IDS, max_new_tokens=6) == b.generate_ids(IDS, max_new_tokens=6)
