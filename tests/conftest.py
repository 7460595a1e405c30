"""Tiny random checkpoints built with transformers' own classes and `save_pretrained`.

transformers is the correctness oracle: every variant here is saved exactly as a user's checkpoint
would be, then loaded both by transformers (reference) and by edgeprism.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Triton (a test extra) then runs the fused decode kernels' tests on its CPU interpreter; it reads
    # this when first imported, so before anything imports it. Nothing else runs Triton off a GPU, and
    # the engine uses the fused kernels on the CPU only with EDGEPRISM_FUSED=interpret (models/fused.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules that decode the tiny default model a lot (`pytestmark = pytest.mark.usefixtures(...)`):
    one intra-op thread is as fast as two, and it does not collapse when the machine is busy
    (oversubscribed OpenMP threads made decoding ~30x slower on a shared CI box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """The embedded default model on the CPU, 256 tokens of context (modules with their own `engine`
    fixture override this one)."""
    import edgeprism

    with edgeprism.load(device="cpu", max_context=256) as eng:
        yield eng


def pytest_configure(config: pytest.Config) -> None:
    """Cost models, quantized-expert caches and profiles go to a throwaway directory, never to the
    user's ~/.cache (unless EDGEPRISM_CACHE_DIR is set on purpose)."""
    os.environ.setdefault("EDGEPRISM_CACHE_DIR", tempfile.mkdtemp(prefix="edgeprism-test-cache-"))


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    kwargs: dict[str, Any]
    shard: str | None = None  # max_shard_size for save_pretrained -> sharded index


COMMON = dict(vocab_size=131, num_hidden_layers=3, initializer_range=0.15, eos_token_id=None,
              bos_token_id=None, pad_token_id=None, max_position_embeddings=256)

VARIANTS = [
    Variant("mixtral-gqa", "mixtral", dict(hidden_size=48, intermediate_size=40, num_attention_heads=4,
                                           num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)),
    Variant("mixtral-headdim-sharded", "mixtral", dict(hidden_size=40, intermediate_size=36, num_attention_heads=4,
                                                       num_key_value_heads=1, head_dim=12, num_local_experts=5,
                                                       num_experts_per_tok=3), shard="40KB"),
    Variant("qwen2moe-shared-tied", "qwen2_moe", dict(hidden_size=48, intermediate_size=56, moe_intermediate_size=28,
                                                      shared_expert_intermediate_size=44, num_attention_heads=6,
                                                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
                                                      norm_topk_prob=False, tie_word_embeddings=True,
                                                      decoder_sparse_step=1, mlp_only_layers=[1])),
    Variant("qwen2moe-sparse-step", "qwen2_moe", dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=20,
                                                      shared_expert_intermediate_size=24, num_attention_heads=4,
                                                      num_key_value_heads=4, num_experts=6, num_experts_per_tok=2,
                                                      norm_topk_prob=True, decoder_sparse_step=2)),
    Variant("qwen3moe-headdim", "qwen3_moe", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                                  num_attention_heads=4, num_key_value_heads=2, head_dim=20,
                                                  num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                                  tie_word_embeddings=True)),
    Variant("qwen3moe-nonorm-sharded", "qwen3_moe", dict(hidden_size=36, intermediate_size=40, moe_intermediate_size=18,
                                                         num_attention_heads=6, num_key_value_heads=3, num_experts=7,
                                                         num_experts_per_tok=4, norm_topk_prob=False), shard="30KB"),
    Variant("olmoe", "olmoe", dict(hidden_size=48, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    Variant("olmoe-clip-norm", "olmoe", dict(hidden_size=40, intermediate_size=28, num_attention_heads=5,
                                             num_key_value_heads=5, num_experts=6, num_experts_per_tok=3,
                                             norm_topk_prob=True, clip_qkv=0.6)),
]

_CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
}


def tiny_qwen3_config(layers: int) -> dict[str, Any]:
    """A small Qwen3-MoE config for in-memory checkpoints (16 experts, top 4, hidden 256)."""
    return dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=256, hidden_size=256, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                moe_intermediate_size=128, intermediate_size=512, norm_topk_prob=True, max_position_embeddings=512)


def build_checkpoint(variant: Variant, directory: Path, seed: int = 0) -> Path:
    """Save a random model of `variant` with transformers into `directory` (fp32)."""
    config_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[variant.family])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **variant.kwargs}))
    kwargs = {"max_shard_size": variant.shard} if variant.shard else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def reference_model(directory: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              experts_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {v.name: build_checkpoint(v, root / v.name) for v in VARIANTS}


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["qwen3moe-headdim"]
