"""Typed, frozen configuration: what a checkpoint is (ModelSpec) and how to run it (EngineConfig).

`ModelSpec` is built once from `config.json`; every per-family difference in the JSON keys is
resolved here or in `models/families.py`, so the rest of the engine reads plain fields.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprism.errors import BudgetError, ConfigError, UnsupportedModelError

# architectures string in config.json -> internal family name
ARCHITECTURES: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a checkpoint's shapes and math."""

    family: str
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate: int  # intermediate size of one routed expert
    dense_intermediate: int  # intermediate size of dense (mlp_only) layers
    norm_topk_prob: bool
    rms_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (Qwen3: per head) | "full" (OLMoE: over all heads)
    clip_qkv: float | None = None
    shared_intermediate: int = 0  # Qwen2-MoE shared expert; 0 = none
    sparse_layers: tuple[bool, ...] = ()  # per layer: True if it is an MoE layer
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.sparse_layers:
            object.__setattr__(self, "sparse_layers", (True,) * self.n_layers)
        checks = [
            (self.n_heads % self.n_kv_heads == 0, "num_attention_heads must be a multiple of num_key_value_heads"),
            (0 < self.top_k <= self.num_experts, "num_experts_per_tok must be between 1 and the number of experts"),
            (self.head_dim % 2 == 0, "head_dim must be even for rotary embeddings"),
            (len(self.sparse_layers) == self.n_layers, "one sparse flag per layer"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"config.json: {msg} (got heads={self.n_heads}, kv_heads={self.n_kv_heads}, "
                                  f"top_k={self.top_k}, experts={self.num_experts}, head_dim={self.head_dim}).")

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.sparse_layers) if s]

    @property
    def expert_params(self) -> int:
        """Parameters in routed experts (what edgeprism offloads)."""
        return len(self.moe_layers) * self.num_experts * 3 * self.dim * self.moe_intermediate

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelSpec":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{path} does not exist: a Hugging Face model directory must hold config.json.") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint.") from e
        return cls.from_dict(cfg, source=str(path))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelSpec":
        archs = cfg.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            raise UnsupportedModelError(
                f"{source}: architectures={archs!r} is not supported; edgeprism runs "
                f"{', '.join(sorted(ARCHITECTURES))}.")
        try:
            return _spec_for(family, cfg)
        except KeyError as e:
            raise ConfigError(f"{source}: required key {e} is missing for a {family} checkpoint.") from e
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: a value has the wrong type ({e}).") from e


def _rope_theta(cfg: dict[str, Any]) -> float:
    """transformers 5 nests RoPE settings in `rope_parameters`; older files use `rope_theta`/`rope_scaling`."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported yet; only default RoPE is.")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _sparse_layers(family: str, cfg: dict[str, Any], n_layers: int) -> tuple[bool, ...]:
    if family not in ("qwen2_moe", "qwen3_moe"):
        return (True,) * n_layers
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers))


def _spec_for(family: str, cfg: dict[str, Any]) -> ModelSpec:
    dim = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    n_layers = int(cfg["num_hidden_layers"])
    head_dim = cfg.get("head_dim") or dim // n_heads
    experts = cfg.get("num_local_experts") if family == "mixtral" else cfg.get("num_experts", cfg.get("num_local_experts"))
    moe_inter = cfg["intermediate_size"] if family in ("mixtral", "olmoe") else cfg["moe_intermediate_size"]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", family == "mixtral") else None
    if family == "olmoe" and head_dim * n_heads != dim:
        raise UnsupportedModelError("OLMoE normalises q over the full hidden size: head_dim * heads must equal hidden_size.")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act={cfg.get('hidden_act')!r} is not supported; only silu (SwiGLU) is.")
    return ModelSpec(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        num_experts=int(experts),
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate=int(moe_inter),
        dense_intermediate=int(cfg.get("intermediate_size", moe_inter)),
        norm_topk_prob=True if family == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("qkv_bias", True)) if family == "qwen2_moe" else bool(cfg.get("attention_bias", False)),
        qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family, "none"),
        clip_qkv=cfg.get("clip_qkv") if family == "olmoe" else None,
        shared_intermediate=int(cfg.get("shared_expert_intermediate_size", 0)) if family == "qwen2_moe" else 0,
        sparse_layers=_sparse_layers(family, cfg, n_layers),
        sliding_window=int(window) if window else None,
        eos_token_ids=_eos_ids(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
    )


@dataclass(frozen=True)
class EngineConfig:
    """How to run a model: budget, cache policy, sub-expert groups, context."""

    vram_gb: float | None = None
    policy: str = "lru"
    groups: int = 1  # sub-experts per expert (G); 1 = whole experts
    max_context: int = 4096
    prefill_chunk: int = 256
    pin_memory: bool = True
    cache_fraction: float | None = None  # test/bench knob: expert cache as a fraction of expert bytes
    gather_limit: int = 256 * 2**20  # decode gathers at most this many bytes of expert weights per layer
    expert_dtype: str | None = None  # routed experts' storage: bf16/fp16/fp32/int8/int4 (None = dtype)
    cuda_graphs: bool = True  # replay the decode step (or its per-layer segments) as CUDA graphs
    prefetch: bool = False  # predict the next layers' experts and copy them in ahead of need (opt-in: see docs)
    lookahead: int = 1  # how many MoE layers ahead the predictor looks (1-3)
    predict_experts: int | None = None  # experts prefetched per target layer (None = top_k)
    schedule: str = "fetch"  # decode misses: "fetch" (copy in), "cpu" (compute on the CPU), "hybrid" (planner),
    # "direct" (the kernels read them from pinned host RAM: one graph per token)
    cpu_threads: int | None = None  # threads of the CPU expert path (None = CPUs − 1)
    adaptive_cache: bool = False  # per-layer cache shares re-solved from measured hit curves (schedule/adaptive.py)
    quant_cache: bool = True  # read/write quantized experts from/to disk (cache/quant_store.py)
    zero_copy: bool = False  # cpu/hybrid: the GPU reads the plan's misses in place from pinned host RAM (opt-in)
    # direct: the CPU computes a share of each layer's misses inside the decode graph (schedule/cpu_share.py):
    # True = a share adapted to this machine, a number in [0, 1] = that fixed fraction of the misses, None = off
    cpu_share: float | bool | None = None

    def __post_init__(self) -> None:
        if self.vram_gb is not None and not self.vram_gb > 0:
            raise BudgetError(f"vram_gb={self.vram_gb!r}: the VRAM budget must be a positive number of GB "
                              "(or None to use what the GPU has free).")
        if self.groups < 1:
            raise ConfigError(f"groups={self.groups}: must be ≥ 1 (1 = whole experts).")
        if self.max_context < 1:
            raise ConfigError(f"max_context={self.max_context}: must be ≥ 1.")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or not 1 <= self.lookahead <= 3:
            raise ConfigError(f"lookahead={self.lookahead!r}: must be 1, 2 or 3 MoE layers.")
        if self.predict_experts is not None and (not isinstance(self.predict_experts, int) or self.predict_experts < 1):
            raise ConfigError(f"predict_experts={self.predict_experts!r}: must be a positive integer or None.")
        if self.schedule not in ("fetch", "cpu", "hybrid", "direct"):
            raise ConfigError(f"schedule={self.schedule!r}: must be 'fetch' (copy misses to the GPU), 'cpu' "
                              "(compute misses on the CPU), 'hybrid' (choose per layer from the cost model) or "
                              "'direct' (the GPU reads misses straight from pinned host RAM).")
        for name in ("pin_memory", "cuda_graphs", "prefetch", "adaptive_cache", "quant_cache", "zero_copy"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be True or False.")
        if self.schedule == "direct" and not self.pin_memory:
            raise ConfigError("schedule='direct' has the GPU read experts straight from pinned host RAM, but "
                              "pin_memory=False; pin the experts or use schedule='fetch'.")
        if self.cpu_share is False:
            object.__setattr__(self, "cpu_share", None)  # False = off, as None
        if self.cpu_share is not None and self.cpu_share is not True and (
                not isinstance(self.cpu_share, (int, float)) or not 0.0 <= self.cpu_share <= 1.0):
            raise ConfigError(f"cpu_share={self.cpu_share!r}: must be True (adapt the CPU's share of the misses), "
                              "a fraction in [0, 1], or None (off).")
        if self.cpu_share is not None and self.schedule != "direct":
            raise ConfigError(f"cpu_share is a knob of schedule='direct' (got schedule={self.schedule!r}); "
                              "schedule='cpu' or 'hybrid' compute misses on the CPU their own way.")
        if self.cpu_threads is not None and (isinstance(self.cpu_threads, bool) or not isinstance(self.cpu_threads, int)
                                             or self.cpu_threads < 1):
            raise ConfigError(f"cpu_threads={self.cpu_threads!r}: must be a positive integer or None.")
        if self.cache_fraction is not None and not 0 < self.cache_fraction <= 1:
            raise ConfigError(f"cache_fraction={self.cache_fraction}: must be in (0, 1].")

