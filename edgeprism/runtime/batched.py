"""Batched decode with continuous batching: several sequences share every expert unit they route to.

At batch 1 an offloaded MoE step copies each routed unit it misses for one token. Decoding B
sequences together runs each layer's attention per sequence (each against its own KV cache) and
then the MoE block once on the stacked [B, D] states, so a unit routed by several sequences is
acquired (copied in if missing) once for all of them: fewer expert bytes per token.

Sequences join and leave between steps (continuous batching): a finished one (end-of-sequence,
`max_new_tokens`, a stop condition, a full context window) leaves and the next queued prompt is
prefilled and joins. With a latency target the batch limit follows the measured step times
(`LatencyController`); every sequence gets one token per step, so a step's wall time is the
per-token latency each sequence sees.

KV caches are allocated per sequence, sized to its prompt + `max_new_tokens` (not `max_context`),
from what the engine's budget plan leaves over (`runtime/memory.py`). Prefill reuses the model's
chunked `forward` with the sequence's caches swapped in; the batch-1 decode paths (`DecodeStep`,
`LayerwiseDecode`, with graphs captured on the model's own caches) are never called here.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from edgeprism.errors import BudgetError, InputError
from edgeprism.models.decoder import KVCache
from edgeprism.models.tokenizer import Tokenizer
from edgeprism.runtime.memory import BudgetPlan, GiB, kv_cache_bytes
from edgeprism.sampling import Sampling, choose
from edgeprism.streaming import text_pieces

if TYPE_CHECKING:
    from edgeprism.api import Engine

log = logging.getLogger(__name__)

Clock = Callable[[], float]  # seconds, monotonic
Finished = Callable[[list[int]], bool]  # a sequence's new ids -> stop now (e.g. a stop string appeared)


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (the largest of fewer than 20 values)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class LatencyController:
    """The batch limit under a per-token latency target, from measured step times.

    Why this rule: a step's time grows with the batch (more distinct experts to fetch and run),
    and every sequence waits one step per token. After `window` steps at the current limit it
    shrinks when their p95 exceeds the target (in proportion to the excess, by at least one; step
    time is roughly linear in the batch at worst) and grows by one when the p95 is below
    `grow_below` x target and every one of those steps ran a full batch (otherwise the limit was
    not what set their time). Steps run with more sequences than the limit (admitted before a
    shrink) are not counted. The decision depends only on the timings: deterministic.
    """

    def __init__(self, target_ms: float, max_batch: int, window: int = 8, grow_below: float = 0.8) -> None:
        self.target_s, self.max_batch = target_ms / 1e3, max_batch
        self.window, self.grow_below = window, grow_below
        self.limit = max_batch  # throughput first: shrink within one window if the target is missed
        self._steps: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, batch) at this limit

    def observe(self, step_s: float, batch: int) -> int:
        """Record one step of `batch` sequences that took `step_s` seconds; return the new limit."""
        if batch > self.limit:
            return self.limit
        self._steps.append((step_s, batch))
        if len(self._steps) < self.window:
            return self.limit
        tail = p95([s for s, _ in self._steps])
        if tail > self.target_s:
            self._set(max(1, min(self.limit - 1, math.floor(self.limit * self.target_s / tail))))
        elif tail < self.grow_below * self.target_s and all(b == self.limit for _, b in self._steps):
            self._set(min(self.max_batch, self.limit + 1))
        return self.limit

    def _set(self, limit: int) -> None:
        if limit != self.limit:
            log.debug("batch limit %d -> %d", self.limit, limit)
            self.limit = limit
            self._steps.clear()  # judge the new limit on its own steps


@dataclass
class _Sequence:
    """One prompt in flight: its own KV caches, sampler and new tokens."""

    index: int  # position in the caller's list
    prompt: list[int]
    max_new: int
    caches: list[KVCache]  # one per layer, [Hkv, cache_len, hd] each
    gen: torch.Generator
    out: list[int] = field(default_factory=list)

    @property
    def pos(self) -> int:
        """Position of the next token fed (the last sampled one)."""
        return len(self.prompt) + len(self.out) - 1


@dataclass
class BatchResult:
    """New ids per prompt (input order) and the trace of the decode steps (prefill excluded)."""

    outputs: list[list[int]]
    step_seconds: list[float] = field(default_factory=list)
    step_batch: list[int] = field(default_factory=list)  # sequences decoded by each step
    limits: list[int] = field(default_factory=list)  # batch limit after each step
    decode_bytes_h2d: int = 0  # expert bytes copied to the device by the decode steps

    @property
    def decode_tokens(self) -> int:
        return sum(self.step_batch)


def _positive_int(n: Any) -> bool:
    return not isinstance(n, bool) and isinstance(n, int) and n > 0


def check_batch_args(prompts: Any, max_new_tokens: Any, max_batch: Any, latency_ms: Any) -> list[int]:
    """Typed errors for the batch-level arguments (each prompt is checked by the engine); returns
    the new-token limit of each prompt (`max_new_tokens` is one int for all or one per prompt)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError("prompts must be a non-empty list (one prompt per sequence).")
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    if len(limits) != len(prompts) or not all(_positive_int(n) for n in limits):
        raise InputError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer, or a list of one "
                         f"positive integer per prompt ({len(prompts)}).")
    if not _positive_int(max_batch):
        raise InputError(f"max_batch={max_batch!r}: must be a positive integer (sequences decoded at once).")
    if latency_ms is not None and (isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float))
                                   or not math.isfinite(latency_ms) or latency_ms <= 0):
        raise InputError(f"latency_ms={latency_ms!r}: must be a positive number of milliseconds per token, or None.")
    return limits


def stop_check(tokenizer: Tokenizer, stops: list[str]) -> Finished | None:
    """Ends a sequence once its text holds a stop string (None when there are none)."""
    if not stops:
        return None
    return lambda ids: any(s in tokenizer.decode(ids) for s in stops)


def texts(tokenizer: Tokenizer, outputs: list[list[int]], stops: list[str], eos: set[int]) -> list[str]:
    """Each sequence's text exactly as `Engine.generate` cuts it (at EOS or before a stop string)."""
    return ["".join(text_pieces(tokenizer, iter(ids), stops, eos)) for ids in outputs]


def spare_bytes(plan: BudgetPlan) -> int | None:
    """Device bytes the budget leaves after resident weights, the batch-1 KV cache, the workspace
    and the expert cache (None: no budget). The workspace reserve for one prefill chunk also covers
    a batch step's activations while the batch is at most `prefill_chunk` sequences."""
    if plan.total is None:
        return None
    return plan.total - plan.resident - plan.kv_cache - plan.workspace - plan.cache


class BatchedGeneration:
    """Continuous batching over one engine: admit, prefill, step the batch, retire; results in order.

    Call it with the engine's lock held. `counts` is the engine's token counter dict (its stats).
    """

    def __init__(self, engine: Engine, counts: dict[str, int], max_new_tokens: list[int], sampling: Sampling, *,
                 max_batch: int = 8, latency_ms: float | None = None, finished: Finished | None = None,
                 clock: Clock = time.perf_counter) -> None:
        self.engine, self.model, self.counts = engine, engine.model, counts
        self.max_new, self.sampling, self.max_batch = max_new_tokens, sampling, max_batch
        self.controller = LatencyController(latency_ms, max_batch) if latency_ms is not None else None
        self.finished, self.clock = finished, clock
        self.eos = engine.eos_ids

    @property
    def limit(self) -> int:
        return self.controller.limit if self.controller is not None else self.max_batch

    def cache_len(self, prompt: list[int], max_new: int) -> int:
        """KV positions a sequence writes: its prompt and every new token but the last (never fed)."""
        return min(len(prompt) + max_new - 1, self.engine.max_context)

    def check_budget(self, prompts: list[list[int]]) -> None:
        """Refuse (BudgetError) if the largest `max_batch` sequences' KV caches cannot be held at once."""
        spare = spare_bytes(self.engine.plan)
        if spare is None:
            return
        elem = torch.empty((), dtype=self.engine.dtype).element_size()
        sizes = sorted((kv_cache_bytes(self.engine.spec, self.cache_len(p, n), elem)
                        for p, n in zip(prompts, self.max_new, strict=True)), reverse=True)
        worst = sizes[:self.max_batch]
        if sum(worst) <= spare:
            return
        fit = next(n for n in range(len(worst), -1, -1) if sum(worst[:n]) <= spare)
        advice = f"pass max_batch={fit}, " if fit else "not even one fits: "
        raise BudgetError(
            f"{len(worst)} sequences decoded together need up to {sum(worst) / GiB:.4f} GiB of KV cache (prompt + "
            f"max_new_tokens positions each) but the budget leaves {max(0, spare) / GiB:.4f} GiB after the weights, "
            f"the batch-1 KV cache, the workspace and the expert cache; {fit} of them fit at once. "
            f"{advice}lower max_new_tokens, raise vram_gb or lower cache_fraction.")

    @torch.inference_mode()
    def run(self, prompts: list[list[int]]) -> BatchResult:
        """New token ids of every prompt (each stops at EOS, its `max_new_tokens` or `finished`)."""
        self.check_budget(prompts)
        self.engine.gate.keep = 1.0  # exact: batched decode never drops sub-experts
        result = BatchResult([[] for _ in prompts])
        queue, active = deque(enumerate(zip(prompts, self.max_new, strict=True))), []
        while queue or active:
            while queue and len(active) < self.limit:
                index, (prompt, max_new) = queue.popleft()
                seq = self._admit(index, prompt, max_new)
                if self._done(seq):  # done at its first token
                    self._retire(seq, result)
                else:
                    active.append(seq)
            if active:
                self._step(active, result)
                for seq in [s for s in active if self._done(s)]:
                    active.remove(seq)
                    self._retire(seq, result)
        return result

    def _admit(self, index: int, prompt: list[int], max_new: int) -> _Sequence:
        """Allocate the sequence's caches, prefill its prompt and sample its first token."""
        spec, eng = self.engine.spec, self.engine
        caches = [KVCache(spec.n_kv_heads, self.cache_len(prompt, max_new), spec.head_dim, eng.dtype, eng.device)
                  for _ in range(spec.n_layers)]
        seq = _Sequence(index, prompt, max_new, caches, self.sampling.generator())
        logits = self._prefill(seq)
        self.counts["prompt_tokens"] += len(prompt)
        self._sample(seq, logits)
        return seq

    def _prefill(self, seq: _Sequence) -> torch.Tensor:
        """The model's chunked prefill with this sequence's caches swapped in; logits [V] of the last token."""
        blocks, chunk = self.model.layers, self.engine.config.prefill_chunk
        own = [block.attn.cache for block in blocks]
        try:
            for block, cache in zip(blocks, seq.caches, strict=True):
                block.attn.cache = cache
            for i in range(0, len(seq.prompt), chunk):
                piece = seq.prompt[i:i + chunk]
                self._count_forward(len(piece))
                logits = self.model(torch.tensor(piece, dtype=torch.long, device=self.engine.device), i,
                                    last_only=True)  # [1, V]
        finally:
            for block, cache in zip(blocks, own, strict=True):
                block.attn.cache = cache
        return logits[-1]

    def _step(self, active: list[_Sequence], result: BatchResult) -> None:
        """One token for every active sequence; the experts of each layer run once for the batch."""
        t0, bytes0 = self.clock(), self.engine.cache.bytes_h2d
        self._count_forward(len(active))
        tokens = torch.tensor([s.out[-1] for s in active], dtype=torch.long, device=self.engine.device)
        with self.engine.experts.gather_tokens(len(active)):  # one grouped call per layer for the batch
            logits = self.model.forward_batch(tokens, [s.pos for s in active], [s.caches for s in active])  # [B, V]
        for seq, row in zip(active, logits, strict=True):
            self._sample(seq, row)  # a host read of each row: the step's time includes the GPU's work
        step_s = self.clock() - t0
        result.step_seconds.append(step_s)
        result.step_batch.append(len(active))
        result.decode_bytes_h2d += self.engine.cache.bytes_h2d - bytes0
        if self.controller is not None:
            self.controller.observe(step_s, len(active))
        result.limits.append(self.limit)

    def _count_forward(self, n: int) -> None:
        self.counts["forward_tokens"] += n
        self.engine.experts.step = self.counts["forward_tokens"]  # the cache policy's clock

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> None:
        seq.out.append(choose(logits, self.sampling, seq.gen))
        self.counts["tokens"] += 1

    def _done(self, seq: _Sequence) -> bool:
        if seq.out[-1] in self.eos or len(seq.out) >= seq.max_new:
            return True
        if self.finished is not None and self.finished(seq.out):
            return True
        if seq.pos >= self.engine.max_context:
            log.warning("context window of %d tokens is full; stopping sequence %d", self.engine.max_context, seq.index)
            return True
        return False

    def _retire(self, seq: _Sequence, result: BatchResult) -> None:
        result.outputs[seq.index] = seq.out  # its caches are freed with it
