"""`edgeprism profile`: measure a model's operating points (quality vs latency per quality floor) on
this machine and budget, through the decode path the scheduler runs in.

Quality at a floor `keep` is ppl_ref / ppl, both teacher-forced one token at a time through the
decode step over held-out text (`edgeprism.corpus`, or the caller's ids): the scheduler drops misses
only in decode steps, so a full-sequence forward would not see its effect. The reference is the same
text at keep = 1 (nothing dropped). Latency is the mean wall time of a decode step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from edgeprism.errors import InputError
from edgeprism.schedule.qos import DEFAULT_KEEPS, OperatingPoints, profile

if TYPE_CHECKING:
    from edgeprism.api import Engine


def decode_nll(engine: Engine, ids: Sequence[int], keep: float = 1.0) -> tuple[float, float, float]:
    """Teacher-forced decode of `ids` with the scheduler's quality floor at `keep`: (mean NLL of
    ids[1:] in nats, mean seconds per decode step, kept share of routed mass)."""
    sched = engine.sched
    if sched is None:
        raise InputError("profiling needs a dynamic expert cache with schedule='hybrid' (load(schedule='hybrid') "
                         "with a budget smaller than the experts); with every expert resident nothing is dropped.")
    if len(ids) < 2 or len(ids) > engine.max_context:
        raise InputError(f"profiling needs 2..{engine.max_context} tokens, got {len(ids)}")
    nll, seconds = 0.0, 0.0
    with engine._lock, torch.inference_mode():
        engine._session += 1  # supersedes any paused stream: the KV cache is rewritten from position 0
        kept0, routed0 = sched.stats.mass_kept, sched.stats.mass_routed
        sched.keep, sched.budget_s = keep, None
        try:
            for pos in range(len(ids) - 1):
                t0 = time.perf_counter()
                logits = engine._run([ids[pos]], pos, last_only=True).float()
                nll += F.cross_entropy(logits[None], torch.tensor([ids[pos + 1]], device=logits.device)).item()
                seconds += time.perf_counter() - t0
        finally:
            sched.keep = 1.0
        routed = sched.stats.mass_routed - routed0
        kept = (sched.stats.mass_kept - kept0) / routed if routed > 0 else 1.0
    n = len(ids) - 1
    return nll / n, seconds / n, kept


def profile_engine(engine: Engine, ids: Sequence[int], keeps: Sequence[float] = DEFAULT_KEEPS,
                   date: str | None = None) -> OperatingPoints:
    """The operating-points table of `engine` on `ids` (warmed up once first, so that the first
    point does not pay for a cold cache)."""
    decode_nll(engine, ids[:min(len(ids), 64)])
    ref, _, _ = decode_nll(engine, ids)

    def measure(keep: float) -> tuple[float, float]:
        nll, seconds, _ = decode_nll(engine, ids, keep)
        return math.exp(ref - nll), seconds * 1e3

    return profile(measure, keeps, vram_gb=engine.config.vram_gb, device=_device_name(engine.device),
                   expert_dtype=engine.format.name, date=date)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
