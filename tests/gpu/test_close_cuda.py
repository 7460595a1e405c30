"""CUDA-only: `Engine.close()` gives the device memory back (skipped without a GPU)."""

from __future__ import annotations

import gc

import pytest
import torch

import edgeprism

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_close_gives_back_device_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    with edgeprism.load(device="cuda", vram_gb=1, max_context=256) as eng:
        assert eng.generate("The meaning of the word", max_new_tokens=8, temperature=0)
        assert torch.cuda.memory_allocated() - base > 16 * 2**20  # weights, KV cache and expert cache
    gc.collect()
    assert torch.cuda.memory_allocated() - base < 2**20
