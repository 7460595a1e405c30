"""The miss scheduler on a real GPU: CPU units computed on the worker thread while the graph
segments wait, their partial output added on the device, copies on the copy stream — the same
tokens as the fetch path (bf16: logits within bf16 tolerance), in every mode, with prefetch on."""

from __future__ import annotations

import pytest
import torch

import edgeprism
from conftest import VARIANTS
from edgeprism.runtime.layerwise import LayerwiseDecode
from edgeprism.schedule.cost import CostModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
IDS = [5, 17, 99, 3, 42, 8, 77, 120, 61, 2, 33, 14]


def cheap_cpu(unit_bytes: int) -> CostModel:
    """A CPU path as fast as the copy: the planner splits misses both ways."""
    return CostModel(unit_bytes=unit_bytes, h2d_latency_s=1e-5, h2d_sizes=(4096,), h2d_bytes_per_s=(20e9,),
                     cpu_call_s=1e-5, cpu_bytes_per_s=20e9, gpu_call_s=1e-5, gpu_unit_s=1e-6)


@pytest.mark.parametrize("name", [v.name for v in VARIANTS])
def test_modes_match_the_fetch_path_on_cuda(checkpoints, name):
    path = checkpoints[name]
    ref = edgeprism.load(path, device="cuda", dtype="fp32", cache_fraction=0.3)
    want = ref.generate_ids(IDS, max_new_tokens=24)
    unit_bytes = ref.stats()["unit_bytes"]
    ref.close()
    for mode in ("cpu", "hybrid"):
        for prefetch, zero_copy in ((False, False), (True, False), (False, True)):
            eng = edgeprism.load(path, device="cuda", dtype="fp32", cache_fraction=0.3, schedule=mode, prefetch=prefetch,
                                 cost=cheap_cpu(unit_bytes), cpu_threads=2, zero_copy=zero_copy)
            assert isinstance(eng.decode_step, LayerwiseDecode) and eng.sched is not None
            assert (eng.decode_step.host_parts is not None) == zero_copy
            assert eng.generate_ids(IDS, max_new_tokens=24) == want, (mode, prefetch, zero_copy)
            s = eng.stats()
            assert s["units_cpu"] > 0 and s["units_drop"] == 0, (mode, prefetch, s)
            eng.cache.table.check_invariants()
            eng.close()


def test_measured_cost_model_and_quality_floor(checkpoints):
    eng = edgeprism.load(checkpoints["olmoe"], device="cuda", dtype="bf16", cache_fraction=0.3, schedule="hybrid",
                         groups=4)
    cost = eng.sched.cost
    assert cost.machine["gpu"] == torch.cuda.get_device_name() and cost.cpu_bytes_per_s > 0
    text = eng.generate_ids(IDS, max_new_tokens=16)
    assert len(text) == 16
    eng.sched.keep = 0.9
    eng.generate_ids(IDS, max_new_tokens=16)
    assert eng.stats()["mass_kept"] >= 0.9 - 1e-6
    eng.close()
