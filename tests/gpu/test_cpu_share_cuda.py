"""The CPU share of zero-copy decode on a real GPU (skipped without one): inside one CUDA graph per
token each MoE layer publishes its CPU units to pinned host RAM, a native CPU loop computes them while
the GPU reads the rest over PCIe, and a Triton kernel polls the CPU's flag before adding its result.
Greedy tokens equal direct decode without a share (the CPU sums in fp32 in another order: logits agree
within bf16 tolerance), on every family, with int8/int4 units, across graph recaptures and requests."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, tiny_qwen3_config

import edgeprism
from edgeprism.models.checkpoint import MemoryCheckpoint
from edgeprism.schedule import native

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(native.load() is None, reason="needs a C compiler")]
IDS = [5, 17, 99, 3, 42, 8, 77, 120, 61, 2, 33, 14]


@pytest.mark.parametrize("name", [v.name for v in VARIANTS])
@pytest.mark.parametrize("share", [1.0, True])
def test_cpu_share_matches_direct_on_cuda(checkpoints, name, share):
    path = checkpoints[name]
    kw = dict(device="cuda", dtype="fp32", cache_fraction=0.3, schedule="direct")
    ref = edgeprism.load(path, **kw)
    want = ref.generate_ids(IDS, max_new_tokens=24)
    ref.close()
    eng = edgeprism.load(path, cpu_share=share, **kw)
    assert eng.decode_step.use_graphs
    assert eng.generate_ids(IDS, max_new_tokens=24) == want
    assert eng.generate_ids(IDS, max_new_tokens=24) == want  # a second request: graphs replay
    s = eng.stats()
    assert s["cpu_share_units"] > 0 or share is True
    assert s["cpu_share_bytes"] == s["cpu_share_units"] * s["unit_bytes"]
    eng.close()


@pytest.mark.parametrize("expert_dtype,int4_act", [("bf16", None), ("int8", None), ("int4", "fp32"),
                                                    ("int4", "int8")])
def test_cpu_share_units_formats_on_cuda(expert_dtype, int4_act, monkeypatch):
    if int4_act:
        monkeypatch.setenv("EDGEPRISM_CPU_INT4_ACT", int4_act)
    cfg = tiny_qwen3_config(3)
    ck = MemoryCheckpoint(cfg, seed=3)
    kw = dict(device="cuda", dtype="bf16", cache_fraction=0.3, expert_dtype=expert_dtype, quant_cache=False,
              schedule="direct")
    ref = edgeprism.load(ck, **kw)
    want = ref.generate_ids(IDS, max_new_tokens=40)
    ref.close()
    eng = edgeprism.load(ck, cpu_share=0.5, **kw)
    got = eng.generate_ids(IDS, max_new_tokens=40)
    # bf16 activations: a different summation order may flip a near-tie late in the sequence; int8
    # activations on the CPU (~1% relative error of a unit's output, tests/test_cpu_experts.py) flip
    # this random model's near-ties sooner (measured: token 18 of 40)
    assert got[:12 if int4_act == "int8" else 20] == want[:12 if int4_act == "int8" else 20]
    s = eng.stats()
    assert s["cpu_share_units"] > 0 and s["cpu_share_gbps"] is not None
    eng.close()


def test_cpu_share_with_quality_floor_on_cuda(checkpoints):
    """The lossy graphs (quality < 1) carry the share too, and are captured beside the exact ones."""
    path = checkpoints["olmoe"]
    eng = edgeprism.load(path, device="cuda", dtype="fp32", cache_fraction=0.3, schedule="direct", cpu_share=1.0)
    exact = eng.generate_ids(IDS, max_new_tokens=16)
    eng.generate_ids(IDS, max_new_tokens=16, quality=0.9)
    assert eng.generate_ids(IDS, max_new_tokens=16) == exact
    assert eng.stats()["cpu_share_units"] > 0
    eng.close()


def test_fused_and_torch_split_agree_on_cuda(checkpoints, monkeypatch):
    """The Triton split (record and flag stored through the host mapping, fenced) and the torch split
    (device ops and two copies) hand the CPU the same units: the same tokens and unit counts."""
    path = checkpoints["qwen3moe-headdim"]
    kw = dict(device="cuda", dtype="fp32", cache_fraction=0.3, schedule="direct", cpu_share=0.5)
    runs = {}
    for mode in ("triton", "torch"):
        monkeypatch.setenv("EDGEPRISM_SHARE_SPLIT", mode)
        eng = edgeprism.load(path, **kw)
        assert eng.experts.direct.cpu_share.fused == (mode == "triton")
        runs[mode] = (eng.generate_ids(IDS, max_new_tokens=24), eng.stats()["cpu_share_units"])
        eng.close()
    assert runs["triton"] == runs["torch"] and runs["triton"][1] > 0
