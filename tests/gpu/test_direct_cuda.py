"""Zero-copy decode on a real GPU (skipped without one): the Triton kernels read uncached units from
pinned host RAM through the device-side map, inside one CUDA graph per token, while admissions copy
hot units in on the copy stream. The same tokens as the fetch path (bf16: the very same kernels, so
bit-identical logits), on every family, cache size and unit format; and the map stays consistent
with the slot table while copies and graphs overlap."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, tiny_qwen3_config

import edgeprism
from edgeprism.cache.keys import SubExpertKey
from edgeprism.models.checkpoint import MemoryCheckpoint
from edgeprism.moe.quant import make_format
from edgeprism.runtime.direct import DirectDecode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
IDS = [5, 17, 99, 3, 42, 8, 77, 120, 61, 2, 33, 14]


def check_map(eng) -> None:
    d = eng.experts.direct
    eng.cache.table.check_invariants()
    for layer, e, g in (d.host_map >= 0).nonzero().tolist():
        assert eng.cache.table.lookup(SubExpertKey(layer, e, g)) == int(d.host_map[layer, e, g])


@pytest.mark.parametrize("name", [v.name for v in VARIANTS])
@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_direct_matches_the_fetch_path_on_cuda(checkpoints, name, fraction):
    path = checkpoints[name]
    ref = edgeprism.load(path, device="cuda", dtype="bf16", cache_fraction=fraction)
    want = ref.generate_ids(IDS, max_new_tokens=32)
    ref.close()
    eng = edgeprism.load(path, device="cuda", dtype="bf16", cache_fraction=fraction, schedule="direct")
    assert isinstance(eng.decode_step, DirectDecode) and eng.decode_step.use_graphs
    assert eng.generate_ids(IDS, max_new_tokens=32) == want
    check_map(eng)
    d = eng.experts.direct
    assert d.misses > 0 and d.admitted > 0 and eng.stats()["schedule"] == "direct"
    # a second request (prefill moves units, then graphs replay over the rebuilt map)
    assert eng.generate_ids(IDS, max_new_tokens=32) == want
    check_map(eng)
    eng.close()


@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
def test_direct_quantized_units_on_cuda(tmp_path, expert_dtype):
    cfg = tiny_qwen3_config(3)
    ck = MemoryCheckpoint(cfg, seed=3)
    kw = dict(device="cuda", dtype="bf16", cache_fraction=0.3, expert_dtype=expert_dtype, quant_cache=False)
    ref = edgeprism.load(ck, **kw)
    want = ref.generate_ids(IDS, max_new_tokens=40)
    ref.close()
    eng = edgeprism.load(ck, schedule="direct", **kw)
    assert eng.generate_ids(IDS, max_new_tokens=40) == want
    check_map(eng)
    eng.close()


@pytest.mark.parametrize("name", ["bf16", "int8", "int4"])
def test_kernel_reads_pinned_host_rows(name):
    """The Triton kernels, given slot -1, read the pinned host row: bit-identical to the same unit in VRAM."""
    D, Ig = 2048, 768
    fmt = make_format(name, D, Ig, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = torch.stack([fmt.pack(*(torch.randn(*s, generator=g, device="cuda") * 0.03 for s in ((Ig, D), (Ig, D), (D, Ig))))
                        for _ in range(6)])
    host = rows.cpu().pin_memory()
    pool = rows[[3, 1]].clone()
    x = torch.randn(1, D, generator=g, device="cuda").bfloat16()
    tokens = torch.zeros(4, dtype=torch.long, device="cuda")
    w = torch.tensor([0.4, 0.3, 0.2, 0.1], device="cuda").bfloat16()
    slots = torch.tensor([0, -1, 1, -1], device="cuda")
    host_rows = torch.tensor([3, 5, 1, 0], device="cuda")
    got = fmt.grouped_direct(x, fmt.parts(pool), fmt.parts(host), slots, host_rows, tokens, w)
    want = fmt.grouped(x, fmt.parts(rows), host_rows, tokens, w)
    assert torch.equal(got, want)


def test_direct_quality_floor_on_cuda(checkpoints):
    """The lossy graphs (in-graph dropping of low-weighted misses) on CUDA: the floor holds, misses are
    dropped, and the exact graphs afterwards give the fetch path's tokens again."""
    path = checkpoints["mixtral-gqa"]
    ref = edgeprism.load(path, device="cuda", dtype="bf16", cache_fraction=0.3)
    want = ref.generate_ids(IDS, max_new_tokens=24)
    ref.close()
    eng = edgeprism.load(path, device="cuda", dtype="bf16", cache_fraction=0.3, schedule="direct")
    assert len(eng.generate_ids(IDS, max_new_tokens=24, quality=0.7)) == 24
    s = eng.stats()
    assert s["units_drop"] > 0 and s["mass_kept"] >= 0.7 - 1e-3
    assert (True, False) in eng.decode_step._steps and eng.decode_step._steps[(True, False)].graphs  # captured as graphs
    assert eng.generate_ids(IDS, max_new_tokens=24) == want
    check_map(eng)
    eng.close()


@pytest.mark.parametrize("name", [v.name for v in VARIANTS])
def test_direct_prefetch_on_cuda_changes_nothing_computed(checkpoints, name, monkeypatch):
    """Prefetch inside the graph (a side stream stages the next layer's predicted units): the same
    tokens as without it, over two requests, with staged units actually read (2 experts predicted,
    all those missing staged, so that tiny models stage something)."""
    monkeypatch.setenv("EDGEPRISM_STAGE_BUDGET", "64")
    path = checkpoints[name]
    kw = dict(device="cuda", dtype="bf16", cache_fraction=0.7, schedule="direct")
    ref = edgeprism.load(path, **kw)
    want = ref.generate_ids(IDS, max_new_tokens=32)
    ref.close()
    eng = edgeprism.load(path, prefetch=True, predict_experts=2, **kw)
    d = eng.experts.direct
    assert eng.generate_ids(IDS, max_new_tokens=32) == want
    assert eng.generate_ids(IDS, max_new_tokens=32) == want
    check_map(eng)
    if len(eng.spec.moe_layers) > 1:
        s = eng.stats()
        assert d.prefetching and s["prefetch"] and s["prefetch_units"] > 0 and d.staged_used > 0
    eng.close()


@pytest.mark.parametrize("expert_dtype,lookahead", [("int4", 1), (None, 1), (None, 2)])
def test_direct_prefetch_with_the_cpu_share_on_cuda(expert_dtype, lookahead, monkeypatch):
    """Staged units are GPU units to the CPU share (slot >= 0): tokens unchanged with both on, one or
    two layers ahead (two: each target's lookup waits on its own staging event)."""
    monkeypatch.setenv("EDGEPRISM_STAGE_BUDGET", "64")
    cfg = tiny_qwen3_config(4)
    ck = MemoryCheckpoint(cfg, seed=4)
    kw = dict(device="cuda", dtype="bf16", cache_fraction=0.4, expert_dtype=expert_dtype, quant_cache=False,
              schedule="direct")
    ref = edgeprism.load(ck, **kw)
    want = ref.generate_ids(IDS, max_new_tokens=40)
    ref.close()
    eng = edgeprism.load(ck, prefetch=True, predict_experts=4, cpu_share=0.5, lookahead=lookahead, **kw)
    assert eng.experts.direct.prefetching and eng.experts.direct.lookahead == lookahead
    assert eng.generate_ids(IDS, max_new_tokens=40) == want
    assert eng.experts.direct.staged_used > 0
    eng.close()
