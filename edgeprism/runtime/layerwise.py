"""One decode token with an offloaded expert cache: the host steps in once per MoE layer.

Which units a layer needs is known only after its router runs on the GPU, so an offloaded step
cannot be one CUDA graph. It is cut at the routers instead: segment j runs MoE layer j-1's experts
(from the slots the host chose), the dense layers in between, layer j's attention and its router.
The host then reads the routing (one small device→host copy), pins the units in the cache, starts
the copies of the misses and writes the slot ids, while the next-layer predictor (a small graph of
its own, launched right after the routing copy) runs on the GPU; then it prefetches the predicted
units of the next layers and launches segment j+1. Each segment is captured as a CUDA graph per
attention-length bucket, so the per-layer launch cost is one graph replay instead of ~100 kernel
launches (measured ~1 ms of host time per layer when eager).

Buffers between segments are static (graphs read and write fixed addresses) and double-buffered by
segment parity, so running a segment twice (its eager warm-up, then the graph) gives the same result.
"""

from __future__ import annotations

import time

import torch

from edgeprism.cache.keys import SubExpertKey
from edgeprism.models.decoder import Decoder
from edgeprism.moe.layer import MoEBlock
from edgeprism.moe.offload import OffloadedExperts
from edgeprism.moe.quant import Parts
from edgeprism.prefetch.predictor import NextLayerPredictor, copy_budget, size_prediction
from edgeprism.prefetch.prefetcher import Prefetcher
from edgeprism.runtime.graphs import BUCKET
from edgeprism.schedule.misses import GPU_ACTIONS, MissScheduler
from edgeprism.schedule.scheduler import Action

IDLE_AFTER = 8  # predictions in a row that copied nothing before a layer's prediction goes idle
IDLE_PROBE = 8  # an idle layer still predicts every IDLE_PROBE-th token (and leaves idle if that copies)


class LayerwiseDecode:
    """Decode step for a dynamic expert cache: graph segments between per-layer host decisions."""

    def __init__(self, model: Decoder, experts: OffloadedExperts, fetch: Prefetcher, device: torch.device,
                 use_graphs: bool, lookahead: int = 0, predict_experts: int | None = None,
                 sched: MissScheduler | None = None, copy_unit_s: float | None = None,
                 host_parts: dict[int, Parts] | None = None) -> None:
        self.model, self.experts, self.fetch, self.device = model, experts, fetch, device
        # With a scheduler and `host_parts` (views of the pinned host arenas), the misses the plan
        # sends to the GPU are read in place by the kernels (zero-copy, cache/direct.py) instead of
        # copied first, and a layer's GPU experts run as their own graph, launched before the host
        # waits for the CPU units: GPU reads and CPU compute overlap.
        self.host_parts = host_parts if sched is not None else None
        # prefetch sizing: one unit's copy time and an EMA of a layer's time (host clock between two
        # layers' routing reads, which the host waits for), so a prefetch copies only what it can hide
        self.copy_unit_s, self.layer_s, self._served_at = copy_unit_s, None, None
        self.sched = sched  # None: every miss is fetched (no planner, no CPU path in the graphs)
        self.use_graphs = use_graphs and device.type == "cuda"
        self.moe_layers = [i for i, b in enumerate(model.layers) if isinstance(b.ffn, MoEBlock)]
        spec = model.spec
        self.k, self.G, self.M = spec.top_k, experts.groups, len(self.moe_layers)
        self.lookahead = min(lookahead, self.M - 1)
        self.predict_experts = predict_experts or self.k
        self.predictor = None
        # idle prediction: per layer, predictions in a row whose prefetches copied nothing (all
        # predicted units resident, sized to nothing, or paused). Past IDLE_AFTER the layer predicts
        # only every IDLE_PROBE-th token: the predictor's graph, its read-back and the host's ranking
        # cost ~tens of µs a layer, which a cache that already holds what is predicted never repays.
        self._idle = [0] * self.M
        self.idle_after, self.idle_probe = IDLE_AFTER, IDLE_PROBE
        self._predict_now = False
        self.idle_skips = 0  # predictions skipped while idle (since the last reset_stats)
        if self.lookahead > 0:
            targets = [(model.layers[i].ffn_norm, model.layers[i].ffn) for i in self.moe_layers]
            self.predictor = NextLayerPredictor(targets, self.lookahead,
                                                min(spec.num_experts, max(self.predict_experts, 2 * self.k)))
        self._alloc(spec.dim, model.embed.weight.dtype)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # (segment, length) or ("predict", j)
        # Two memory pools: segments reuse one another's freed workspace (they never run at once);
        # interleaving the predictor's small captures into that pool fragmented it (measured +0.65
        # GiB at 12 layers), so the predictor graphs get a pool of their own.
        self.pools = {kind: torch.cuda.graph_pool_handle() for kind in ("segment", "predict")} if self.use_graphs else {}
        # One warm-up stream and one capture stream for all graphs: libraries keep per-stream state
        # (cuBLAS a workspace per stream), so a fresh stream per capture left memory behind each time.
        self.warmup_stream = torch.cuda.Stream(device) if self.use_graphs else None
        self.capture_stream = torch.cuda.Stream(device) if self.use_graphs else None

    def _alloc(self, dim: int, dtype: torch.dtype) -> None:
        dev, kG = self.device, self.k * self.G
        probe = self.model.layers[self.moe_layers[0]].ffn.route(torch.zeros(1, dim, dtype=dtype, device=dev))[0]
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.h = torch.zeros(2, 1, dim, dtype=dtype, device=dev)  # residual after attention, by parity
        self.xn = torch.zeros(2, 1, dim, dtype=dtype, device=dev)  # normed MoE input, by parity
        self.w_units = torch.zeros(2, kG, dtype=probe.dtype, device=dev)  # routing weight of each unit
        self.slots = torch.zeros(kG, dtype=torch.long, device=dev)  # written by the host every layer (-1: host row)
        self.rows = torch.zeros(kG, dtype=torch.long, device=dev)  # host-arena rows of the units read in place
        self.y_gpu = torch.zeros(1, dim, dtype=dtype, device=dev)  # the GPU units' output (split segments)
        self.unit_token = torch.zeros(kG, dtype=torch.long, device=dev)  # batch 1: every unit reads token 0
        C = self.predictor.num_candidates if self.predictor else 1
        self.route = torch.zeros(self.k, dtype=torch.long, device=dev)  # routed expert ids
        self.cand = torch.zeros(max(1, self.lookahead), C, dtype=torch.long, device=dev)  # predicted ids
        self.cand_p = torch.zeros(max(1, self.lookahead), C, dtype=torch.float32, device=dev)
        self.out = torch.zeros(1, self.model.spec.vocab_size, dtype=dtype, device=dev)
        pin = dev.type == "cuda"
        self.host_route = torch.zeros(self.route.shape, dtype=torch.long, pin_memory=pin)
        self.host_cand = torch.zeros(self.cand.shape, dtype=torch.long, pin_memory=pin)
        self.host_p = torch.zeros(self.cand_p.shape, dtype=torch.float32, pin_memory=pin)
        self.host_slots = torch.zeros(kG, dtype=torch.long, pin_memory=pin)
        self.host_rows = torch.zeros(kG, dtype=torch.long, pin_memory=pin)
        # numpy views of the two: filled from a list with no tensor built per layer
        self._slots_np, self._rows_np = self.host_slots.numpy(), self.host_rows.numpy()
        # the scheduler's buffers: per unit a 0/1 scale (0: computed on the CPU or dropped), the CPU
        # path's partial output added to the layer's, and the host copies of the routing it plans on
        self.unit_scale = torch.ones(kG, dtype=probe.dtype, device=dev)
        self.y_extra = torch.zeros(1, dim, dtype=dtype, device=dev)
        self.host_scale = torch.ones(kG, dtype=probe.dtype, pin_memory=pin)
        self.host_w = torch.zeros(kG, dtype=probe.dtype, pin_memory=pin)
        self.host_xn = torch.zeros(1, dim, dtype=dtype, pin_memory=pin)
        self.host_y = torch.zeros(1, dim, dtype=dtype, pin_memory=pin)
        self._extra_zero = True  # y_extra holds zeros (no CPU units in the layer last served)
        self.routed = torch.cuda.Event() if pin else None  # routing of the last segment is on the host
        self.compute: torch.cuda.Stream | None = None  # the running step's stream (looked up once a token)
        self.predicted = torch.cuda.Event() if pin else None  # so are the predictor's candidates

    # ----- one token -----

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits [1, V] of `token` at position `pos` (the KV cache holds positions < pos)."""
        self.token.fill_(token)
        self.pos.fill_(pos)
        length = min(self.model.max_len, (pos // BUCKET + 1) * BUCKET)
        held: list[SubExpertKey] = []
        # the copy engine keeps this step's compute stream (one lookup a token); the routing and
        # prediction events record on it too (None: on the current stream)
        self.compute = self.fetch.begin_step()
        try:
            for j in range(self.M + 1):
                self._run(j, length)
                if held:
                    self.fetch.release(held)  # copies into these slots now wait for segment j (a read mark)
                    held = []
                if j == self.M:
                    break
                held = self._serve_layer(j)
        finally:
            if held:  # an error mid-token: leave no unit pinned
                self.fetch.release(held)
            self.fetch.end_step()
        return self.out

    def _serve_layer(self, j: int) -> list[SubExpertKey]:
        """Host decisions after segment j: pin layer j's units, set its slots, prefetch ahead.

        The predictor runs on the GPU (its own small graph) while the host pins and fetches, so
        prediction adds almost nothing to the layer's critical path.
        """
        self.host_route.copy_(self.route, non_blocking=True)
        if self.sched is not None:
            self.host_w.copy_(self.w_units[j % 2], non_blocking=True)
            self.host_xn.copy_(self.xn[j % 2], non_blocking=True)
        if self.routed is not None:
            self.routed.record(self.compute)
        self._predict_now = self.predictor is not None and j + 1 < self.M and (  # the last layer has none ahead
            self._idle[j] < self.idle_after or self.experts.step % self.idle_probe == 0)
        if self._predict_now:
            self._run_predictor(j)
            self.host_cand.copy_(self.cand, non_blocking=True)
            self.host_p.copy_(self.cand_p, non_blocking=True)
            if self.predicted is not None:
                self.predicted.record(self.compute)
        if self.routed is not None:
            self.routed.synchronize()
        self._time_layer(j)
        layer, step, G = self.moe_layers[j], self.experts.step, self.G
        experts = self.host_route.tolist()
        keys = [SubExpertKey(layer, e, g) for e in experts for g in range(G)]
        if self.sched is not None:
            return self._serve_scheduled(j, keys, experts, step, layer)
        slots = self.fetch.acquire(keys, step, layer)
        # The pinned staging buffer is rewritten only after the next routing read, which follows
        # (on the compute stream) the copy below, so the copy never sees a half-written buffer.
        self._slots_np[:] = slots
        self.slots.copy_(self.host_slots, non_blocking=True)
        self._prefetch_or_skip(j, experts, step, layer)
        return keys

    def _serve_scheduled(self, j: int, keys: list[SubExpertKey], experts: list[int], step: int,
                         layer: int) -> list[SubExpertKey]:
        """`_serve_layer` with a scheduler: GPU units pinned and copied as usual, CPU units computed
        on the CPU worker meanwhile, dropped units left out; the others' positions get weight 0.

        The CPU result goes to `y_extra`, which the next segment adds to the layer's output. Its
        staging buffer, like `host_slots`, is rewritten only after the next routing read.
        """
        assert self.sched is not None
        weights = self.host_w.tolist()
        acts = self.sched.decide(keys, weights)
        self.fetch.settle(layer, keys)  # the prediction is scored against every routed unit
        in_place = self.host_parts is not None  # the plan's fetches are read from host RAM, not copied
        direct = [i for i, a in enumerate(acts) if in_place and a is Action.FETCH]
        gpu = [i for i, a in enumerate(acts) if a in GPU_ACTIONS and not (in_place and a is Action.FETCH)]
        cpu = [i for i, a in enumerate(acts) if a is Action.CPU]
        pending = self.sched.submit_cpu(self.host_xn, [keys[i] for i in cpu], [weights[i] for i in cpu]) if cpu else None
        held = [keys[i] for i in gpu]
        slots = self.fetch.acquire(held, step, layer) if held else []
        try:
            self._write_slots(gpu, slots, len(keys), [(i, self.experts.cache.store.row(keys[i])) for i in direct])
            if in_place:  # the GPU units run now, while the CPU computes its own
                self._replay(("experts", j), lambda: self._gpu_experts(j), "segment")
            self._prefetch_or_skip(j, experts, step, layer)  # prefetches go out while the CPU works
            self.fetch.admit(self.sched.admissions(keys, acts, weights), step, layer)  # behind the urgent copies
            if pending is not None:
                self.host_y.copy_(pending.result())  # blocks on the future (no spin-wait)
                self.y_extra.copy_(self.host_y, non_blocking=True)
                self._extra_zero = False
            elif not self._extra_zero:
                self.y_extra.zero_()
                self._extra_zero = True
        except BaseException:
            if held:  # the caller never sees them: leave no unit pinned
                self.fetch.release(held)
            raise
        return held

    def _write_slots(self, gpu: list[int], slots: list[int], n: int,
                     direct: list[tuple[int, int]] | None = None) -> None:
        """Slot ids and 0/1 scales of a layer's n unit positions; positions not computed on the GPU
        read a pinned slot (any slot if none) at weight 0 (pool slots always hold finite values;
        the kernels skip weight-0 units). `direct`: (position, host row) of units read in place
        (slot -1)."""
        filler = slots[0] if slots else 0
        host_slots, scale = [filler] * n, [0.0] * n
        for i, slot in zip(gpu, slots):
            host_slots[i], scale[i] = slot, 1.0
        if direct:
            rows = [0] * n
            for i, row in direct:
                host_slots[i], rows[i], scale[i] = -1, row, 1.0
            self._rows_np[:] = rows
            self.rows.copy_(self.host_rows, non_blocking=True)
        self._slots_np[:] = host_slots
        self.host_scale.copy_(torch.tensor(scale))
        self.slots.copy_(self.host_slots, non_blocking=True)
        self.unit_scale.copy_(self.host_scale, non_blocking=True)

    def _time_layer(self, j: int) -> None:
        """Update the layer-time EMA from the interval since the previous layer's routing landed."""
        now = time.perf_counter()
        if j > 0 and self._served_at is not None:
            dt = now - self._served_at
            self.layer_s = dt if self.layer_s is None else 0.9 * self.layer_s + 0.1 * dt
        self._served_at = now

    def _prefetch_or_skip(self, j: int, experts: list[int], step: int, layer: int) -> None:
        if self._predict_now:
            self._prefetch(j, experts, step, layer)
        elif self.predictor is not None:  # idle (or the last layer): the routing history still learns
            self.predictor.observe(j, experts)
            self.idle_skips += j + 1 < self.M

    def _prefetch(self, j: int, experts: list[int], step: int, layer: int) -> None:
        self.predictor.observe(j, experts)
        if self.predicted is not None:
            self.predicted.synchronize()
        cand, probs = self.host_cand.tolist(), self.host_p.tolist()
        table, copied = self.fetch.table, 0
        for d in range(1, self.lookahead + 1):
            if j + d >= self.M:
                break
            target = self.moe_layers[j + d]
            ranked = self.predictor.choose(j + d, probs[d - 1], cand[d - 1], len(cand[d - 1]))
            budget = copy_budget(d, self.layer_s, self.fetch.copy_free_s(time.perf_counter()), self.copy_unit_s)

            def missing(e: int, target: int = target) -> int:
                return sum(table.lookup(SubExpertKey(target, e, g)) is None for g in range(self.G))

            chosen = size_prediction(ranked, missing, self.predict_experts, budget)
            keys = [SubExpertKey(target, e, g) for e in chosen for g in range(self.G)]
            predicted = [SubExpertKey(target, e, g) for e in ranked[:self.predict_experts] for g in range(self.G)]
            copied += self.fetch.prefetch(target, keys, step, layer, predicted=predicted)
        self._idle[j] = 0 if copied else self._idle[j] + 1

    # ----- segments -----

    def _run(self, j: int, length: int) -> None:
        self._replay((j, length), lambda: self._segment(j, length), "segment")

    def _run_predictor(self, j: int) -> None:
        self._replay(("predict", j), lambda: self._predict(j), "predict")

    def _predict(self, j: int) -> None:
        """Candidates for the next MoE layers from the state after layer j's attention."""
        probs, cand = self.predictor.candidates(self.h[j % 2], j)  # [lookahead, C] x2
        self.cand_p.copy_(probs)
        self.cand.copy_(cand)

    def _replay(self, key: tuple, fn, pool: str) -> None:  # noqa: ANN001 - a zero-argument callable
        if not self.use_graphs:
            fn()
            return
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        # First use: run it eagerly on a side stream (warm-up, as capture requires; this computes
        # the real result), then capture it for later tokens (capture runs nothing).
        compute, side = torch.cuda.current_stream(self.device), self.warmup_stream
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            fn()
        compute.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pools[pool], stream=self.capture_stream):
            fn()
        self.graphs[key] = graph

    def _gpu_experts(self, j: int) -> None:
        """MoE layer j's GPU units (cached slots, or host rows read in place) into `y_gpu`."""
        assert self.host_parts is not None
        cur, cache = j % 2, self.experts.cache
        w = self.w_units[cur] * self.unit_scale  # [kG]
        y = cache.format.grouped_direct(self.xn[cur], cache.parts, self.host_parts[self.moe_layers[j]], self.slots,
                                        self.rows, self.unit_token, w)
        self.y_gpu.copy_(y)

    def _segment(self, j: int, length: int) -> None:
        """Experts of MoE layer j-1 -> dense layers -> attention and router of MoE layer j."""
        m, prev, cur = self.model, (j - 1) % 2, j % 2
        cos, sin, mask = m.decode_tables(self.pos, length)
        if j == 0:
            x, first = m.embed(self.token), 0  # [1, D]
        else:
            layer = self.moe_layers[j - 1]
            if self.host_parts is not None:
                y = self.y_gpu + self.y_extra  # the GPU units (their own graph, `_gpu_experts`) + the CPU's
            else:
                cache = self.experts.cache  # format: dense or quantized units (moe/quant.py)
                w = self.w_units[prev] if self.sched is None else self.w_units[prev] * self.unit_scale  # [kG]
                y = cache.format.grouped(self.xn[prev], cache.parts, self.slots, self.unit_token, w)  # [1, D]
                if self.sched is not None:
                    y = y + self.y_extra  # units computed on the CPU
            x, first = self.h[prev] + m.layers[layer].ffn.combine(self.xn[prev], y), layer + 1
        last = self.moe_layers[j] if j < self.M else len(m.layers)
        for block in m.layers[first:last]:
            x = block.decode(x, cos, sin, self.pos, mask)
        if j == self.M:
            self.out.copy_(m.lm_head(m.norm(x)))
            return
        block = m.layers[last]
        h = block.decode_attn(x, cos, sin, self.pos, mask)
        xn = block.ffn_norm(h)
        weights, ids = block.ffn.route(xn)  # [1, k] x2
        self.h[cur].copy_(h)
        self.xn[cur].copy_(xn)
        self.w_units[cur].copy_(weights.reshape(-1).repeat_interleave(self.G))
        self.route.copy_(ids.reshape(-1))
