"""The fused one-token decode kernels (models/fused_triton.py) against the torch ops they replace.

Runs on a CUDA GPU, or on the CPU under Triton's interpreter when Triton is installed (the test
extras install it, so CI runs them; the engine-level test then covers three variants); skipped otherwise. Kernel by kernel on random
inputs (head dims that are and are not powers of two, GQA group sizes 1-8, window or not, norms per
head / over the projection / none), then whole engines: the greedy tokens and the logits with the
fused kernels equal those with the torch ops (`EDGEPRISM_FUSED=0`) on every family."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import VARIANTS

import edgeprism
from edgeprism.models import fused
from edgeprism.models.decoder import rotate_half, rope_tables

if torch.cuda.is_available():
    DEV = "cuda"
elif importlib.util.find_spec("triton") is not None:
    DEV = "cpu"  # Triton's interpreter (the test extras install Triton, so CI runs these)
else:
    DEV = None
pytestmark = pytest.mark.skipif(DEV is None, reason="needs a CUDA GPU or Triton (for its CPU interpreter)")
BF = torch.bfloat16
# whole engines under the interpreter are slow: on the CPU, one variant per attention kind
# (q/k norm per head, over the projection with GQA, none with q/k/v biases and a shared expert)
ENGINE_VARIANTS = [v.name for v in VARIANTS] if DEV == "cuda" else ["qwen3moe-headdim", "olmoe", "qwen2moe-shared-tied"]
SCHEDULES = ["fetch", "direct"] if DEV == "cuda" else ["fetch"]  # zero-copy decode needs CUDA


ON = "1" if DEV == "cuda" else "interpret"  # EDGEPRISM_FUSED value that turns the fused path on here


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """On the CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
    before anything imports Triton), and the engine takes the fused path for this module's tests only."""
    if DEV == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "TRITON_INTERPRET must be set before Triton is imported"
        monkeypatch.setenv("EDGEPRISM_FUSED", ON)


def _kern():
    k = fused.kernels(torch.zeros(1, dtype=BF, device=DEV))
    assert k is not None
    return k


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # what RMSNorm does on CUDA: fp32 math, one rounding
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


@pytest.mark.parametrize("hd,H,HKV,norm", [(128, 8, 2, 1), (128, 4, 4, 2), (20, 6, 3, 0), (12, 4, 2, 1), (64, 8, 1, 2)])
def test_rope_kv_equals_the_torch_ops(hd, H, HKV, norm):
    g = torch.Generator().manual_seed(hd + H)
    L, pos = 64, 37
    q = torch.randn(H * hd, generator=g).to(BF).to(DEV)
    k = torch.randn(HKV * hd, generator=g).to(BF).to(DEV)
    v = torch.randn(HKV * hd, generator=g).to(BF).to(DEV)
    size_q, size_k = (hd, hd) if norm == 1 else (H * hd, HKV * hd)
    qw = (1 + 0.3 * torch.randn(size_q, generator=g)).to(BF).to(DEV) if norm else None
    kw = (1 + 0.3 * torch.randn(size_k, generator=g)).to(BF).to(DEV) if norm else None
    cos, sin = (t.to(BF).to(DEV) for t in rope_tables(L, hd, 10000.0))
    ck = torch.zeros(HKV, L, hd, dtype=BF, device=DEV)
    cv = torch.zeros_like(ck)
    p = torch.tensor([pos], device=DEV)
    qo = _kern().rope_kv(q, k, v, qw, kw, norm, 1e-6, cos, sin, ck, cv, p)
    # reference: Attention._qkv's ops (norm, then x·cos + rotate_half(x)·sin in bf16)
    qr, kr = q, k
    if norm == 2:
        qr, kr = _rms(q, qw, 1e-6), _rms(k, kw, 1e-6)
    qr, kr = qr.view(H, hd), kr.view(HKV, hd)
    if norm == 1:
        qr, kr = _rms(qr, qw, 1e-6), _rms(kr, kw, 1e-6)
    c, s = cos[pos], sin[pos]
    qr = qr * c + rotate_half(qr) * s
    kr = kr * c + rotate_half(kr) * s
    torch.testing.assert_close(qo.float(), qr.float(), atol=0.02, rtol=0.02)
    torch.testing.assert_close(ck[:, pos].float(), kr.float(), atol=0.02, rtol=0.02)
    assert torch.equal(cv[:, pos], v.view(HKV, hd))
    others = [i for i in range(L) if i != pos]
    assert not ck[:, others].any() and not cv[:, others].any()  # nothing else written


@pytest.mark.parametrize("hd,H,HKV,length,pos,window", [
    (128, 32, 4, 256, 100, None), (128, 32, 4, 512, 300, None), (128, 16, 16, 256, 0, None),
    (20, 6, 3, 256, 200, None), (64, 8, 2, 768, 700, 128), (12, 4, 1, 256, 255, 7)])
def test_decode_attention_equals_the_torch_ops(hd, H, HKV, length, pos, window):
    g = torch.Generator().manual_seed(length + pos)
    q = torch.randn(H, hd, generator=g).to(BF).to(DEV)
    ck = torch.randn(HKV, length + 64, hd, generator=g).to(BF).to(DEV)
    cv = torch.randn(HKV, length + 64, hd, generator=g).to(BF).to(DEV)
    out = _kern().decode_attention(q, ck, cv, torch.tensor([pos], device=DEV), length, window)
    # reference: Attention.decode's torch ops over the first `length` slots
    k_pos = torch.arange(length, device=DEV)
    mask = k_pos <= pos
    if window is not None:
        mask &= k_pos > pos - window
    qg = q.view(HKV, H // HKV, hd)
    scores = torch.bmm(qg, ck[:, :length].transpose(1, 2)) * hd ** -0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32).to(BF)
    want = torch.bmm(probs, cv[:, :length]).reshape(1, -1)
    assert out.shape == (1, H * hd) and out.dtype == BF
    torch.testing.assert_close(out.float(), want.float(), atol=0.02, rtol=0.02)


@pytest.mark.parametrize("E,k,normalize,dtype", [(128, 8, True, BF), (64, 8, False, BF), (8, 2, False, torch.float32),
                                                 (60, 4, True, BF), (7, 4, False, BF)])
def test_route_equals_softmax_topk(E, k, normalize, dtype):
    g = torch.Generator().manual_seed(E * k)
    logits = (3 * torch.randn(5, E, generator=g)).to(BF).to(DEV)
    kern = _kern()
    for t in range(5):
        w, ids = kern.route(logits[t:t + 1], k, normalize, dtype)
        probs = torch.softmax(logits[t:t + 1], dim=-1, dtype=torch.float32)
        want_w, want_ids = torch.topk(probs, k, dim=-1)
        if normalize:
            want_w = want_w / want_w.sum(-1, keepdim=True)
        # same experts in the same order (bf16 logits can tie: then the lower index comes first here)
        assert torch.equal(probs[0, ids[0]], probs[0, want_ids[0]])
        assert w.dtype == dtype and ids.dtype == torch.long
        torch.testing.assert_close(w.float(), want_w.to(dtype).float(), atol=1e-3, rtol=1e-2)


IDS = [5, 17, 99, 3, 42, 8, 77, 120]


def _generate(path, fused_on: bool, monkeypatch, **kw) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of one engine, and the torch path's teacher-forced logits of prompt + tokens."""
    monkeypatch.setenv("EDGEPRISM_FUSED", ON if fused_on else "0")
    eng = edgeprism.load(path, device=DEV, dtype="bf16", **kw)
    try:
        ids = eng.generate_ids(IDS, max_new_tokens=24)
        monkeypatch.setenv("EDGEPRISM_FUSED", "0")
        return ids, eng.logits(IDS + ids).float().cpu()  # prefill: the torch ops
    finally:
        eng.close()


@pytest.mark.parametrize("name", ENGINE_VARIANTS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_engine_tokens_with_fused_kernels_follow_the_torch_ops(checkpoints, name, schedule, monkeypatch):
    """Every greedy token decoded with the fused kernels is the torch path's argmax at its step, or
    within bf16 noise of it (a near-tie, where either choice is a faithful bf16 greedy step)."""
    kw = dict(cache_fraction=0.5, schedule=schedule)
    want, _ = _generate(checkpoints[name], False, monkeypatch, **kw)
    got, ref = _generate(checkpoints[name], True, monkeypatch, **kw)
    # bf16 noise of this model: how far the torch path's own bf16 logits are from fp32 ones
    monkeypatch.setenv("EDGEPRISM_FUSED", "0")
    f32 = edgeprism.load(checkpoints[name], device=DEV, dtype="fp32")
    noise = (f32.logits(IDS + got).float().cpu() - ref).abs().max().item()
    f32.close()
    steps = ref[len(IDS) - 1:-1]  # row t predicts got[t]
    gap = steps.max(-1).values - steps[torch.arange(len(got)), torch.tensor(got)]
    assert gap.max().item() <= 2 * noise + 0.02, (gap.tolist(), noise)


def test_lookup_equals_the_map_gather():
    E, G, k = 9, 2, 4
    layer_map = torch.tensor([[s, -1] if s % 3 else [-1, s] for s in range(E)], device=DEV)
    rows = (torch.arange(E * G, device=DEV) + 100).reshape(E, G)
    ids = torch.tensor([[7, 0, 4, 3]], device=DEV)
    hit = torch.zeros(k * G, dtype=torch.bool, device=DEV)
    log = torch.zeros(k, dtype=torch.long, device=DEV)
    slots, unit_rows = _kern().lookup(ids, layer_map, rows, hit, log)
    assert torch.equal(slots, layer_map[ids].reshape(-1))
    assert torch.equal(unit_rows, rows[ids].reshape(-1))
    assert torch.equal(hit, slots >= 0) and torch.equal(log, ids[0])


def test_lookup_with_staged_codes_equals_the_torch_ops(monkeypatch):
    """Prefetch staging: an unmapped unit whose code is staged reads its staging row, a mapped one
    keeps its slot, anything else reads the host (-1); the kernel and DirectCache's torch ops agree."""
    from types import SimpleNamespace

    from edgeprism.cache.direct import DirectCache

    E, G, k, L, layer, base = 16, 2, 4, 3, 1, 50
    g = torch.Generator().manual_seed(5)
    for trial in range(12):
        layer_map = torch.where(torch.rand(L, E, G, generator=g) < 0.4, torch.randint(0, 40, (L, E, G), generator=g), -1)
        P = (2, 4, 8)[trial % 3] * G
        codes = torch.full((L, P), -1)
        pick = torch.randperm(E * G, generator=g)[:P]
        codes[layer] = torch.where(torch.rand(P, generator=g) < 0.7, pick, -1)
        ids = torch.randperm(E, generator=g)[:k][None]

        def state(dev, layer_map=layer_map, codes=codes):
            return SimpleNamespace(_base={layer: base}, groups=G, dev_map=layer_map.to(dev),
                                   rows=(torch.arange(E * G) + 100).reshape(E, G).to(dev), codes=codes.to(dev),
                                   hit_log=torch.zeros(L, k * G, dtype=torch.bool, device=dev),
                                   route_log=torch.zeros(L, k, dtype=torch.long, device=dev))

        got = state(DEV)
        slots, unit_rows = DirectCache.lookup(got, layer, ids.to(DEV))
        monkeypatch.setenv("EDGEPRISM_FUSED", "0")
        ref = state("cpu")
        want, want_rows = DirectCache.lookup(ref, layer, ids)
        monkeypatch.setenv("EDGEPRISM_FUSED", ON)
        assert torch.equal(slots.cpu(), want) and torch.equal(unit_rows.cpu(), want_rows), trial
        assert torch.equal(got.hit_log.cpu(), ref.hit_log) and torch.equal(got.route_log.cpu(), ref.route_log)
        code = (ids.reshape(-1, 1) * G + torch.arange(G)).reshape(-1)
        staged = torch.isin(code, codes[layer][codes[layer] >= 0]) & (layer_map[layer][ids].reshape(-1) < 0)
        assert (want[staged] >= base).all() and (want[~staged] < base).all(), trial


@pytest.mark.parametrize("W,budget", [(7, None), (4096, 2), (5000, 0), (5000, 3)])
def test_stage_copies_the_predicted_units_the_map_lacks(W, budget):
    """The staging kernel copies the best-ranked `budget` predicted units the map lacks from their
    host rows (pinned on a GPU: read over PCIe) into their staging rows, leaves the others' rows
    untouched and writes codes."""
    E, G, top, base = 12, 2, 3, 5
    g = torch.Generator().manual_seed(W)
    src = torch.randint(-2**31, 2**31 - 1, (E * G + 3, W), generator=g, dtype=torch.int32)
    if DEV == "cuda":
        src = src.pin_memory()
    rows = torch.randperm(E * G + 3, generator=g)[:E * G].reshape(E, G)
    layer_map = torch.where(torch.rand(E, G, generator=g) < 0.5, torch.arange(E * G).reshape(E, G), -1)
    ids = torch.tensor([4, 0, 9])
    dst = torch.zeros(base + 2 * top * G, W, dtype=torch.int32, device=DEV)
    codes = torch.zeros(top * G, dtype=torch.long, device=DEV)
    _kern().stage(ids.to(DEV), layer_map.to(DEV), rows.to(DEV), src, dst, codes, base, G, budget)
    dst = dst.cpu()
    ranked_missing = 0
    for i in range(top * G):
        e, grp = int(ids[i // G]), i % G
        take = layer_map[e, grp] < 0 and (budget is None or ranked_missing < budget)
        ranked_missing += int(layer_map[e, grp] < 0)
        if take:
            assert int(codes[i]) == e * G + grp and torch.equal(dst[base + i], src[rows[e, grp]]), i
        else:
            assert int(codes[i]) == -1 and not dst[base + i].any(), i
    assert not dst[:base].any() and not dst[base + top * G:].any()


@pytest.mark.parametrize("dtype", [torch.float32, BF])
def test_drop_misses_equals_the_torch_ops(monkeypatch, dtype):
    """The fused quality floor drops exactly what DirectCache.drop_misses' torch ops drop (a stable
    ascending order of the misses' weights), keeps the other weights bit for bit and writes the same
    stats; weights are multiples of 1/64, so both sums are exact and ties (units of one expert share
    its weight) are common."""
    from types import SimpleNamespace

    from edgeprism.cache.direct import DirectCache

    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        A = (1, 2, 8, 13, 32, 64)[trial % 6]
        w = ((torch.randint(1, 12, (A,), generator=g).float() / 64).repeat_interleave(2)[:A]).to(dtype)
        slots = torch.where(torch.rand(A, generator=g) < 0.4, torch.arange(A), torch.full((A,), -1))
        floor = (1.0, 0.95, 0.8, 0.5, 0.0)[trial % 5]
        got = SimpleNamespace(floor=torch.tensor(floor, device=DEV), layer_stats=torch.zeros(2, 3, device=DEV))
        kept = DirectCache.drop_misses(got, 1, slots.to(DEV), w.to(DEV))
        monkeypatch.setenv("EDGEPRISM_FUSED", "0")
        ref = SimpleNamespace(floor=torch.tensor(floor), layer_stats=torch.zeros(2, 3))
        want = DirectCache.drop_misses(ref, 1, slots, w)
        monkeypatch.setenv("EDGEPRISM_FUSED", ON)
        assert kept.dtype == dtype and torch.equal(kept.cpu(), want), (trial, kept, want)
        assert torch.equal(got.layer_stats.cpu(), ref.layer_stats), trial
        assert floor < 1 or not (kept == 0).any()


def test_qkv_parameters_are_views_of_one_tensor(tiny_checkpoint):
    eng = edgeprism.load(tiny_checkpoint, device=DEV, dtype="bf16")
    attn = eng.model.layers[0].attn
    w, b = attn.wqkv
    assert b is None and w.data_ptr() == attn.wq.weight.data_ptr()
    assert torch.equal(torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]), w)
    assert attn.wk.weight.data_ptr() == w[attn.wq.out_features:].data_ptr()
    eng.close()


@pytest.mark.parametrize("D", [48, 2048, 40])
def test_add_rms_norm_equals_the_torch_ops(D):
    g = torch.Generator().manual_seed(D)
    x, r = (torch.randn(1, D, generator=g).to(BF).to(DEV) for _ in range(2))
    w = (1 + 0.3 * torch.randn(D, generator=g)).to(BF).to(DEV)
    h, n = _kern().add_rms_norm(x, r, w, 1e-6)
    if DEV == "cuda":
        assert torch.equal(h, x + r)  # round to nearest even, as torch's add
    else:  # Triton's interpreter rounds halfway cases to bf16 otherwise: one ulp
        torch.testing.assert_close(h, x + r, atol=0.016, rtol=0.008)
    torch.testing.assert_close(n.float(), _rms(x + r, w, 1e-6).float(), atol=0.02, rtol=0.02)
    h0, n0 = _kern().add_rms_norm(x, None, w, 1e-6)
    assert h0 is x
    torch.testing.assert_close(n0.float(), _rms(x, w, 1e-6).float(), atol=0.02, rtol=0.02)
