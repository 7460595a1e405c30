"""Prefetch changes when bytes move, never what is computed.

The ordering logic is tested with fake copy engines: copies that land late and out of order (only
the orderings the prefetcher declares are honoured), and copies that never land unless waited on.
A prefetcher that forgot a wait would read stale slots and change the outputs.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

import edgeprism
from conftest import VARIANTS
from edgeprism.cache.keys import SubExpertKey
from edgeprism.errors import ConfigError
from edgeprism.runtime.layerwise import LayerwiseDecode

NAMES = [v.name for v in VARIANTS]
IDS = [5, 17, 99, 3, 42, 8, 77, 120, 61, 2, 33, 14]


class Pending:
    """One queued copy of the fake engine."""

    def __init__(self, dst: torch.Tensor, src: torch.Tensor, after: list["Pending"]) -> None:
        self.dst, self.src, self.after, self.done = dst, src, list(after), False

    def query(self) -> bool:  # as a CUDA event's: has the copy landed? (never waits)
        return self.done


class FakeCopies:
    """A copy engine whose copies complete late: at random points (`shuffle`) in random order,
    or only when compute waits on them (`lazy`). Declared `after` orderings are honoured; nothing
    else is. Compute on the CPU is synchronous, so read marks have nothing to order."""

    def __init__(self, seed: int, lazy: bool = False) -> None:
        self.rng, self.lazy = random.Random(seed), lazy
        self.queue: list[Pending] = []
        self.completed = self.waited = 0
        self.steps = 0  # begin_step minus end_step calls (a decode step balances them)
        self.begun = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: list[Pending], reads: list) -> Pending:
        ticket = Pending(dst, src, after)
        self.queue.append(ticket)
        self._progress()
        return ticket

    def mark(self) -> None:
        self._progress()

    def wait(self, tickets: list[Pending]) -> None:
        for t in tickets:
            self.waited += 1
            self._complete(t)

    def stall_seconds(self) -> float:
        return 0.0

    def reset_stall(self) -> None:
        pass

    def begin_step(self) -> None:
        self.steps += 1
        self.begun += 1
        return None

    def end_step(self) -> None:
        self.steps -= 1

    def issuing(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def flush(self) -> None:
        """Land every queued copy, latest first (the worst order the declared orderings allow)."""
        while self.queue:
            self._complete(self.queue[-1])

    def _complete(self, t: Pending) -> None:
        if t.done:
            return
        for earlier in t.after:
            self._complete(earlier)
        t.dst.copy_(t.src)
        t.done = True
        self.queue.remove(t)
        self.completed += 1

    def _progress(self) -> None:
        if self.lazy or not self.queue:
            return
        for t in self.rng.sample(self.queue, k=self.rng.randint(0, len(self.queue))):
            self._complete(t)


def load_cpu(path, **kw):
    kw.setdefault("prefetch", True)  # opt-in in the API
    return edgeprism.load(path, device="cpu", dtype="fp32", prefill_chunk=4, **kw)


@pytest.fixture(scope="module")
def reference(checkpoints):
    """Prefetch off, inline copies: logits and greedy tokens per variant."""
    out = {}
    for name, path in checkpoints.items():
        eng = load_cpu(path, cache_fraction=0.25, prefetch=False)
        out[name] = (eng.logits(IDS), eng.generate_ids(IDS, max_new_tokens=24))
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fraction,lookahead", [(0.1, 1), (0.25, 2), (0.6, 1)])
def test_prefetch_on_gives_the_same_outputs(checkpoints, reference, name, fraction, lookahead):
    eng = load_cpu(checkpoints[name], cache_fraction=fraction, lookahead=lookahead)
    step = eng.decode_step
    assert isinstance(step, LayerwiseDecode)
    assert (step.predictor is not None) == (step.M > 1)  # a lone MoE layer has no next layer to predict
    logits, tokens = reference[name]
    assert torch.equal(eng.logits(IDS), logits)
    assert eng.generate_ids(IDS, max_new_tokens=24) == tokens
    s = eng.stats()
    if step.M > 1:
        assert s["prefetch"] and s["prefetch_recall"] is not None and 0 <= s["prefetch_recall"] <= 1
    eng.cache.table.check_invariants()


@pytest.mark.parametrize("name", ["mixtral-gqa", "qwen2moe-shared-tied", "qwen3moe-nonorm-sharded", "olmoe"])
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_late_and_reordered_copies_change_nothing(checkpoints, reference, name, lazy, groups):
    eng = load_cpu(checkpoints[name], cache_fraction=0.4, groups=groups, lookahead=2)
    fake = FakeCopies(seed=groups, lazy=lazy)
    eng.fetch.engine = fake
    eng.decode_step.idle_after = 10**9  # every layer predicts every token: as many copies in flight as can be
    logits, tokens = reference[name]
    assert eng.generate_ids(IDS, max_new_tokens=24) == tokens
    torch.testing.assert_close(eng.logits(IDS), logits, atol=1e-5, rtol=1e-5)  # groups=2 sums in another order
    assert fake.completed > 0 and fake.waited > 0
    # 23 decode steps after the prefill's token; each let go of the compute stream it kept
    assert fake.begun == 23 and fake.steps == 0
    assert eng.stats()["prefetch_units"] > 0
    eng.cache.table.check_invariants()


def test_a_missing_wait_is_caught(checkpoints, reference):
    """The fake engine has teeth: a prefetcher that skips the read-after-write wait goes wrong."""
    eng = load_cpu(checkpoints["olmoe"], cache_fraction=0.2)
    eng.fetch.engine = FakeCopies(seed=0, lazy=True)
    eng.fetch._take_tickets = lambda slots: []  # the bug: compute never waits for copies
    logits, _ = reference["olmoe"]
    assert not torch.equal(eng.logits(IDS), logits)


def test_write_after_write_is_ordered(checkpoints):
    """A slot refilled while its previous copy is still queued gets the later unit's weights."""
    eng = load_cpu(checkpoints["olmoe"], cache_fraction=0.2)
    fake = FakeCopies(seed=0, lazy=True)
    fetch = eng.fetch
    fetch.engine = fake
    a, b = SubExpertKey(0, 0, 0), SubExpertKey(0, 1, 0)
    assert fetch.prefetch(0, [a], step=1, current_layer=0) == 1
    slot = fetch.table.lookup(a)
    fetch.table.discard(a)  # a stale prefetch dropped before its copy landed
    assert fetch.prefetch(0, [b], step=1, current_layer=0) == 1
    assert fetch.table.lookup(b) == slot
    fetch.drain()
    fake.flush()
    assert torch.equal(eng.cache.pool[slot], eng.store.unit(b))


def test_prefetch_never_evicts_a_pinned_unit(checkpoints):
    eng = load_cpu(checkpoints["olmoe"], cache_fraction=0.2, lookahead=1)
    fetch, table = eng.fetch, eng.cache.table
    pinned = [SubExpertKey(0, e, 0) for e in range(min(2, eng.spec.num_experts))]
    fetch.acquire(pinned, step=1, layer=0)
    others = [SubExpertKey(layer, e, 0) for layer in eng.spec.moe_layers for e in range(eng.spec.num_experts)]
    fetch.prefetch(1, others, step=1, current_layer=0)
    for key in pinned:
        assert table.lookup(key) is not None and table.is_pinned(key)
    fetch.release(pinned)
    table.check_invariants()


def test_stale_prefetches_are_dropped_and_counted(checkpoints):
    eng = load_cpu(checkpoints["olmoe"], cache_fraction=0.5)
    fetch, unit = eng.fetch, eng.store.unit_bytes
    right, wrong = SubExpertKey(1, 0, 0), SubExpertKey(1, 1, 0)
    fetch.prefetch(1, [right, wrong], step=1, current_layer=0)
    slots = fetch.acquire([right], step=1, layer=1)
    fetch.release([right])
    assert eng.cache.table.lookup(wrong) is None  # stale: discarded at its layer
    assert eng.cache.table.lookup(right) == slots[0]
    s = fetch.summary()
    assert s["prefetch_bytes_used"] == unit and s["prefetch_bytes_wasted"] == unit
    assert s["prefetch_recall"] == 1.0 and s["prefetch_precision"] == 0.5


def test_prefetch_pauses_while_its_copies_go_unused(checkpoints):
    eng = load_cpu(checkpoints["olmoe"], cache_fraction=0.5)
    fetch = eng.fetch
    wrong = [SubExpertKey(1, e, 0) for e in range(4, 6)]
    right = [SubExpertKey(1, 0, 0)]
    copied = []
    for step in range(40):
        copied.append(fetch.prefetch(1, wrong, step=step, current_layer=0))
        fetch.acquire(right, step=step, layer=1)
        fetch.release(right)
        for key in wrong:
            fetch.table.discard(key)
    assert copied[0] == 2 and sum(copied[1:]) < 2 * 39 / 4  # paused after a few misses, probing now and then
    assert max(copied[5:]) == 1  # a probe copies one unit
    assert fetch.summary()["prefetch_paused"] > 0
    assert any(copied[5:])  # probes keep the estimate fresh


def test_prefetch_off_and_bad_lookahead(checkpoints):
    eng = load_cpu(checkpoints["olmoe"], cache_fraction=0.25, prefetch=False)
    eng.generate_ids(IDS, max_new_tokens=4)
    s = eng.stats()
    assert not s["prefetch"] and s["prefetch_units"] == 0 and s["prefetch_recall"] is None
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ConfigError, match="lookahead"):
            load_cpu(checkpoints["olmoe"], lookahead=bad)


def test_copy_budget_and_sizing():
    from edgeprism.prefetch.predictor import copy_budget, size_prediction

    assert copy_budget(1, None, 0.0, 1e-3) is None and copy_budget(1, 1e-3, 0.0, None) is None  # unknown: no cut
    assert copy_budget(1, 1e-3, 0.0, 2.5e-4) == 4  # one layer of compute hides 4 copies
    assert copy_budget(2, 1e-3, 0.0, 2.5e-4) == 8  # two layers ahead: twice the time
    assert copy_budget(1, 1e-3, 5e-4, 2.5e-4) == 2  # copies already queued come first
    assert copy_budget(1, 1e-3, 5e-3, 2.5e-4) == 0
    cost = {7: 0, 3: 2, 9: 1, 4: 2}.__getitem__  # missing units per expert (7 is resident)
    assert size_prediction([7, 3, 9, 4], cost, cap=4, budget=None) == [7, 3, 9, 4]
    assert size_prediction([7, 3, 9, 4], cost, cap=2, budget=None) == [7, 3]
    assert size_prediction([7, 3, 9, 4], cost, cap=4, budget=3) == [7, 3, 9]
    assert size_prediction([7, 3, 9, 4], cost, cap=4, budget=1) == [7]  # 3 does not fit: nothing ranked below it
    assert size_prediction([7, 3, 9, 4], cost, cap=4, budget=0) == [7]  # resident ones cost nothing


def test_prefetch_sized_to_nothing_copies_nothing_and_still_scores(checkpoints, reference):
    """A copy far slower than a layer: prefetch copies nothing, the prediction is still scored, and
    the outputs do not change."""
    eng = load_cpu(checkpoints["olmoe"], cache_fraction=0.25)
    eng.decode_step.copy_unit_s = 1e6  # seconds: no layer hides such a copy
    eng.generate_ids(IDS, max_new_tokens=2)  # the first token's first layers have no layer time yet
    eng.reset_stats()
    assert eng.generate_ids(IDS, max_new_tokens=24) == reference["olmoe"][1]
    s = eng.stats()
    assert s["prefetch_units"] == 0 and s["prefetch_recall"] is not None
    assert eng.decode_step.layer_s is not None and eng.decode_step.layer_s > 0


def test_prediction_goes_idle_when_its_prefetches_copy_nothing(checkpoints, reference):
    """Predictions that copy nothing (here: a copy far slower than a layer, so every prefetch is sized
    to nothing): after IDLE_AFTER of them a layer predicts only every IDLE_PROBE-th token, and the
    outputs do not change. With copies that fit, the prefetches copy and prediction stays on."""
    from edgeprism.runtime import layerwise

    idle = load_cpu(checkpoints["olmoe"], cache_fraction=0.25)
    step = idle.decode_step
    step.copy_unit_s = 1e6  # seconds: no layer hides such a copy
    idle.generate_ids(IDS, max_new_tokens=layerwise.IDLE_AFTER + 2)  # the layers go idle
    idle.reset_stats()
    assert idle.generate_ids(IDS, max_new_tokens=24) == reference["olmoe"][1]
    s = idle.stats()
    assert s["prefetch_units"] == 0
    predicted = 24 * (step.M - 1)  # layers with a next MoE layer to predict, per token
    # the first IDLE_AFTER predictions of a request's prefill... then one token in IDLE_PROBE predicts
    assert s["prefetch_idle_skips"] >= predicted * (1 - 1 / layerwise.IDLE_PROBE) - 2 * (step.M - 1)
    assert s["prefetch_recall"] is not None  # the probes are still scored
    busy = load_cpu(checkpoints["olmoe"], cache_fraction=0.25)
    real = busy.fetch.prefetch
    busy.fetch.prefetch = lambda *a, **k: max(1, real(*a, **k))  # as if every prediction copied something
    assert busy.generate_ids(IDS, max_new_tokens=24) == reference["olmoe"][1]
    s = busy.stats()
    assert s["prefetch_idle_skips"] == 0 and s["prefetch_recall"] is not None
