"""Prefetch on a real copy stream: the per-layer graph segments, CUDA events and the copy stream
give exactly the outputs of the fully resident step (one CUDA graph), with prefetch on or off."""

from __future__ import annotations

import pytest
import torch

import edgeprism
from conftest import VARIANTS
from edgeprism.prefetch.prefetcher import CudaCopies
from edgeprism.runtime.layerwise import LayerwiseDecode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
IDS = [5, 17, 99, 3, 42, 8, 77, 120, 61, 2, 33, 14]


@pytest.mark.parametrize("name", [v.name for v in VARIANTS])
def test_segments_and_copy_stream_match_the_resident_graph(checkpoints, name):
    path = checkpoints[name]
    resident = edgeprism.load(path, device="cuda", dtype="bf16")
    want = resident.generate_ids(IDS, max_new_tokens=40)
    for prefetch, graphs in [(True, True), (False, True), (True, False)]:
        eng = edgeprism.load(path, device="cuda", dtype="bf16", cache_fraction=0.4, prefetch=prefetch,
                             cuda_graphs=graphs, lookahead=2)
        assert isinstance(eng.decode_step, LayerwiseDecode) and isinstance(eng.fetch.engine, CudaCopies)
        assert eng.generate_ids(IDS, max_new_tokens=40) == want, (prefetch, graphs)
        s = eng.stats()
        assert s["misses"] > 0 and s["stall_s"] >= 0
        if prefetch and eng.decode_step.predictor is not None:
            assert s["prefetch_units"] > 0
        eng.cache.table.check_invariants()
        eng.close()


def test_copies_run_on_their_own_stream(checkpoints):
    eng = edgeprism.load(checkpoints["olmoe"], device="cuda", dtype="bf16", cache_fraction=0.2, prefetch=True)
    copies = eng.fetch.engine
    assert copies.h2d != torch.cuda.current_stream()
    eng.generate_ids(IDS, max_new_tokens=8)
    torch.cuda.synchronize()
    assert copies.h2d.query()  # everything issued on the copy stream has landed
