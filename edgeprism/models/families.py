"""One adapter per model family: checkpoint tensor names and router semantics.

The engine only sees internal names (those of `models/decoder.py`); each adapter translates them to
the family's Hugging Face names once, at load time. Router math follows transformers exactly:
softmax in fp32 over all experts, top-k, optional renormalisation of the k weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeprism.config import ModelSpec


@dataclass(frozen=True)
class FamilyAdapter:
    """Names and router details of one family."""

    moe_prefix: str  # module holding router + experts inside a layer
    expert_names: tuple[str, str, str]  # (gate, up, down) projection names inside an expert
    weights_in_fp32: bool  # Mixtral keeps the routing weights in fp32; the others cast to the hidden dtype

    def hf_name(self, internal: str, layer: int | None = None) -> str:
        """Hugging Face tensor name of an internal parameter name."""
        if layer is None:
            return _GLOBAL_NAMES[internal]
        return f"model.layers.{layer}." + _LAYER_NAMES[internal].format(moe=self.moe_prefix)

    def expert_name(self, layer: int, expert: int, which: int) -> str:
        """Name of w1 (which=0, gate), w3 (which=1, up) or w2 (which=2, down) of one expert."""
        return f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}.{self.expert_names[which]}.weight"

    def fused_expert_names(self, layer: int) -> tuple[str, str]:
        """transformers-5-style fused expert tensors: gate_up_proj [E, 2I, D] and down_proj [E, D, I]."""
        base = f"model.layers.{layer}.{self.moe_prefix}.experts."
        return base + "gate_up_proj", base + "down_proj"

    def route(self, logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: [T, E] -> (weights [T, k], expert ids [T, k]), as the family's reference computes them."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.weights_in_fp32 else weights.to(logits.dtype)), ids


_GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.bias": "self_attn.o_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.gate.weight": "{moe}.gate.weight",
    "ffn.shared.w1.weight": "{moe}.shared_expert.gate_proj.weight",
    "ffn.shared.w3.weight": "{moe}.shared_expert.up_proj.weight",
    "ffn.shared.w2.weight": "{moe}.shared_expert.down_proj.weight",
    "ffn.shared_gate.weight": "{moe}.shared_expert_gate.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",  # dense (mlp_only) layers
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}

_ADAPTERS = {
    "mixtral": FamilyAdapter("block_sparse_moe", ("w1", "w3", "w2"), weights_in_fp32=True),
    "qwen2_moe": FamilyAdapter("mlp", ("gate_proj", "up_proj", "down_proj"), weights_in_fp32=False),
    "qwen3_moe": FamilyAdapter("mlp", ("gate_proj", "up_proj", "down_proj"), weights_in_fp32=False),
    "olmoe": FamilyAdapter("mlp", ("gate_proj", "up_proj", "down_proj"), weights_in_fp32=False),
}


def adapter_for(spec: ModelSpec) -> FamilyAdapter:
    return _ADAPTERS[spec.family]
