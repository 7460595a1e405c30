"""Per MoE layer of a decode token: which routed units run from the cache, which are copied in,
which run on the CPU and which are dropped — the engine side of `scheduler.plan`.

Three modes (`load(schedule=...)`):

- ``fetch``: every miss is copied over PCIe and computed on the GPU (no planner; the default path);
- ``cpu``: every miss is computed on the CPU from the host arena, where it already lives; resident
  and in-flight units still run on the GPU (the baseline that never copies on demand);
- ``hybrid``: `scheduler.plan` splits each layer's misses between PCIe and the CPU from the
  machine's `CostModel` and, when the generation call sets a quality floor (`keep` < 1) or a
  latency budget, drops the lowest-scored misses (never a resident unit).

Admission (hybrid): the plan is myopic — a unit computed on the CPU never enters the cache, so a
cold cache facing a fast CPU would stay cold. When the copy engine would sit idle while the CPU
works (plan's CPU finish after its copy finish), the highest-scored CPU units are copied into the
cache in that gap, for later tokens (`admissions`); they queue behind the layer's own copies and
the next layer's planner sees the busier copy engine. The ``cpu`` mode admits nothing: its cache
keeps what prefill left (a static placement, like a fixed set of GPU experts).

Online CPU price (hybrid): the calibrated CPU rate is measured alone, but in decode the CPU call
shares host memory bandwidth with the copy engine's DMA reads and the host thread (on the H100 box:
80 GB/s calibrated, 25–52 GB/s in hybrid decode), so a plan priced at the calibrated rate sends too
much to the CPU. Each CPU call's measured time (submission to result, so the hand-off to the worker
is included) feeds an exponentially weighted least-squares fit of time on bytes (`CPU_EMA`): the
per-call overhead and the rate, and the planner's `cost` is the calibrated model with those two (`calibrated` keeps the
original; a cost model passed to `load(cost=...)` is kept as given). On the H100 box a one-unit call
cost ~0.6 ms in decode against 0.18 ms calibrated. The fit runs after the call's result is handed
over (a done-callback on the worker), off the layer's critical path.

Exploration: a fit that priced the CPU out gets no more samples, so it could never see the CPU get
faster again (measured on the H100 box: at 8 GB the fit sent 0 units to the CPU, where CPU-only was
the fastest mode). After `PROBE_EVERY` planned layers that fetched misses but computed none on the
CPU, the lowest-weighted fetched miss of the next such layer goes to the CPU instead (one small call;
`stats.cpu_probes` counts them), which feeds the fit a fresh measurement.

Residency comes from the prefetcher's host-side model of the copy engine (`Prefetcher.residency`):
a unit whose copy was issued and has not landed yet is in flight, with its predicted ready time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from edgeprism.cache.host_store import HostStore
from edgeprism.cache.keys import SubExpertKey
from edgeprism.errors import InputError
from edgeprism.prefetch.prefetcher import Prefetcher
from edgeprism.schedule.cost import CostModel
from edgeprism.schedule.cpu_experts import CpuExperts
from edgeprism.schedule.scheduler import Action, Residency, RoutedUnit, plain_plan, plan

MODES = ("fetch", "cpu", "hybrid")
GPU_ACTIONS = (Action.HIT, Action.WAIT, Action.FETCH)
CPU_EMA = 0.1  # weight of the newest CPU call in the fit of the CPU price (older calls decay by 1 - CPU_EMA)
CPU_RATE_BOUNDS = (0.1, 2.0)  # the measured rate is kept within these multiples of the calibrated one
CPU_CALL_MAX_S = 2e-3  # the measured per-call overhead is kept within [0, this]
PROBE_EVERY = 32  # hybrid, learning: after this many planned layers with misses but no CPU unit, probe the CPU
_NO_PLAN = {Residency.RESIDENT: Action.HIT, Residency.INFLIGHT: Action.WAIT}  # misses: the CPU


@dataclass
class MissStats:
    """Counts of each action over routed units, and the CPU path's work and wall time."""

    actions: dict[str, int] = field(default_factory=lambda: {a.value: 0 for a in Action})
    cpu_calls: int = 0
    cpu_probes: int = 0  # fetched misses sent to the CPU to re-measure its price (exploration)
    admitted: int = 0  # CPU units also copied into the cache for later tokens
    cpu_bytes: int = 0  # bytes of stored unit rows the CPU path read
    cpu_s: float = 0.0  # wall time of the CPU calls, on the worker thread
    planned_s: float = 0.0  # sum of the plans' predicted layer latencies
    mass_kept: float = 0.0
    mass_routed: float = 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            **{f"units_{name}": n for name, n in self.actions.items()},
            "units_admitted": self.admitted, "cpu_calls": self.cpu_calls, "cpu_probes": self.cpu_probes,
            "cpu_bytes": self.cpu_bytes, "cpu_s": self.cpu_s,
            "cpu_gbps": self.cpu_bytes / self.cpu_s / 1e9 if self.cpu_s > 0 else None,
            "mass_kept": self.mass_kept / self.mass_routed if self.mass_routed > 0 else None,
        }


class MissScheduler:
    """Decides each routed unit's action for one layer and runs the CPU share of it.

    `keep` (mass floor in (0, 1]) and `budget_s` (per-layer latency budget, or None) are set per
    token by the generation call (directly, or by a `qos.QosController`).
    """

    def __init__(self, mode: str, cost: CostModel, cpu: CpuExperts, store: HostStore, fetch: Prefetcher, *,
                 learn: bool = True) -> None:
        if mode not in MODES:
            raise InputError(f"schedule={mode!r}: must be one of {MODES}.")
        self.mode, self.cost, self.cpu, self.store, self.fetch = mode, cost, cpu, store, fetch
        self.calibrated = cost  # `cost` moves with the measured CPU price (hybrid, `learn`); this does not
        self.learn = learn
        self._fit = [0.0] * 5  # decayed sums: weight, x, x², t, x·t (x = bytes in MB, t = seconds)
        self.keep, self.budget_s = 1.0, None
        self.stats = MissStats()
        self._gap_s = 0.0  # copy-engine idle time under the last plan's CPU call
        self._idle = False  # the copy engine had nothing queued and the last plan fetched nothing
        self._prices = (cost.copy_unit_s, cost.cpu_call_s, cost.cpu_unit_s)  # properties: computed once
        self._gpu_s = 0.0  # the GPU term of a layer (its k·G units), set by `set_units`
        self._pool: ThreadPoolExecutor | None = None
        self._since_cpu = 0  # planned layers with fetched misses and no CPU unit since the last CPU unit

    def set_units(self, n: int) -> None:
        """The number of units a decode layer computes (k·G): the GPU term of every plan."""
        self._gpu_s = self.cost.gpu_seconds(n)

    def decide(self, keys: Sequence[SubExpertKey], weights: Sequence[float]) -> list[Action]:
        """The action of each unit (in `keys` order); `weights` is each unit's routing weight.

        A unit's score for the quality floor is its weight (a unit's share of its expert is taken
        as equal across groups: `weights` repeat over an expert's groups)."""
        now = time.perf_counter()
        where = [self.fetch.residency(key, now) for key in keys]
        self._idle = self.fetch.copy_free_s(now) == 0.0
        total = sum(max(w, 0.0) for w in weights)
        self.stats.mass_routed += total
        missing = [k for k, (res, _) in zip(keys, where) if res is Residency.MISSING]
        inflight = any(res is Residency.INFLIGHT for res, _ in where)
        self._gap_s = 0.0
        if self.mode == "cpu" or not (missing or inflight):
            acts = [_NO_PLAN.get(res, Action.CPU) for res, _ in where]
            kept = total
            if self.mode == "hybrid":
                self.stats.planned_s += self._gpu_s
        elif not inflight and self.keep >= 1.0 and self.budget_s is None:  # the hot path: no `Plan` built
            c, a, b = self._prices
            fetched, copy_s, cpu_s, latency = plain_plan(len(missing), self.fetch.copy_free_s(now), c, a, b, self._gpu_s)
            fetch = set(sorted(missing)[:fetched]) if fetched > 0 else set()
            acts = [Action.HIT if res is Residency.RESIDENT else Action.FETCH if k in fetch else Action.CPU
                    for k, (res, _) in zip(keys, where)]
            kept = total
            self.stats.planned_s += latency
            self._gap_s = max(0.0, cpu_s - copy_s)
            self._idle = self._idle and fetched <= 0
        else:
            units = [RoutedUnit(k, max(float(w), 0.0), res, ready) for k, w, (res, ready) in zip(keys, weights, where)]
            p = plan(units, self.cost, keep=self.keep, budget_s=self.budget_s,
                     copy_free_s=max(self.fetch.copy_free_s(now), max((u.ready_s for u in units), default=0.0)))
            by_key = dict(p.actions)
            acts = [by_key[k] for k in keys]
            kept = p.kept_mass
            self.stats.planned_s += p.latency_s
            self._gap_s = max(0.0, p.cpu_s - p.copy_s)
            self._idle = self._idle and p.count(Action.FETCH) == 0
        if self.mode == "hybrid" and self.learn:
            acts = self._explore(keys, weights, acts)
        for a in acts:
            self.stats.actions[a.value] += 1
        self.stats.mass_kept += kept
        return acts

    def _explore(self, keys: Sequence[SubExpertKey], weights: Sequence[float], acts: list[Action]) -> list[Action]:
        """Send one fetched miss to the CPU when the CPU has had none for `PROBE_EVERY` such layers."""
        if Action.CPU in acts:
            self._since_cpu = 0
            return acts
        fetched = [i for i, a in enumerate(acts) if a is Action.FETCH]
        if not fetched:
            return acts
        self._since_cpu += 1
        if self._since_cpu < PROBE_EVERY:
            return acts
        self._since_cpu = 0
        probe = min(fetched, key=lambda i: (weights[i], keys[i]))
        self.stats.cpu_probes += 1
        return [Action.CPU if i == probe else a for i, a in enumerate(acts)]

    def admissions(self, keys: Sequence[SubExpertKey], acts: Sequence[Action],
                   weights: Sequence[float]) -> list[SubExpertKey]:
        """The CPU units of the last `decide` worth copying into the cache in the copy engine's idle
        gap: as many as fit in it, highest routing weight first (ties by key)."""
        if self.mode != "hybrid":
            return []
        fit = int(self._gap_s / max(self._prices[0], 1e-12))
        if self._idle:  # nothing queued and nothing fetched: one copy in flight costs no layer anything now
            fit = max(fit, 1)
        cpu = sorted((i for i, a in enumerate(acts) if a is Action.CPU), key=lambda i: (-weights[i], keys[i]))
        chosen = [keys[i] for i in cpu[:fit]]
        self.stats.admitted += len(chosen)
        return chosen

    def submit_cpu(self, x: torch.Tensor, keys: Sequence[SubExpertKey], weights: Sequence[float]) -> Future[torch.Tensor]:
        """Start the CPU path over `keys` (all of one layer) on its worker thread: x [1, D] on the host."""
        layer = keys[0].layer
        rows = [self.store.row(k) for k in keys]
        order = sorted(range(len(rows)), key=rows.__getitem__)  # adjacent rows read as runs
        w = torch.tensor([float(weights[i]) for i in order], dtype=torch.float32)
        arena, picked = self.store.arenas[layer], [rows[i] for i in order]
        nbytes = len(rows) * self.store.unit_bytes
        self.stats.cpu_calls += 1
        self.stats.cpu_bytes += nbytes
        submitted, took = time.perf_counter(), []

        def run() -> torch.Tensor:
            t0 = time.perf_counter()
            y = self.cpu(x, arena, picked, w)
            t1 = time.perf_counter()
            self.stats.cpu_s += t1 - t0
            took.append(t1 - submitted)  # the hand-off to the worker is part of the price
            return y

        def priced(_: Future) -> None:  # after the result is handed over: off the layer's critical path
            if took:
                self.observe_cpu(nbytes, took[0])

        if self._pool is None:  # one worker: a layer's CPU call is itself multi-threaded
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeprism-cpu-experts")
        pending = self._pool.submit(run)
        pending.add_done_callback(priced)
        return pending

    def observe_cpu(self, nbytes: int, seconds: float) -> None:
        """Fold one CPU call (bytes read, seconds from submission to result) into the price of the CPU
        path and reprice `cost` (hybrid only: the other modes do not plan).

        Exponentially weighted least squares of seconds on bytes gives the per-call overhead and the
        rate; while the calls seen so far are all about the same size the overhead stays at its
        current value and only the rate moves. Runs on the worker thread; `cost` and `_prices` are
        swapped whole."""
        if self.mode != "hybrid" or not self.learn or nbytes <= 0:
            return
        base, f, x = self.calibrated, self._fit, nbytes / 1e6
        for i, v in enumerate((1.0, x, x * x, seconds, x * seconds)):
            f[i] = (1.0 - CPU_EMA) * f[i] + CPU_EMA * v
        mx, mt = f[1] / f[0], f[3] / f[0]
        var = f[2] / f[0] - mx * mx
        call = self.cost.cpu_call_s
        if var > (0.25 * mx) ** 2:  # sizes spread enough to tell overhead from rate
            slope = (f[4] / f[0] - mx * mt) / var
            if slope > 0:
                call = min(max(mt - slope * mx, 0.0), CPU_CALL_MAX_S)
        lo, hi = (r * base.cpu_bytes_per_s for r in CPU_RATE_BOUNDS)
        rate = min(max(mx * 1e6 / max(mt - call, 1e-9), lo), hi)
        cost = dataclasses.replace(base, cpu_bytes_per_s=rate, cpu_call_s=call)
        self.cost, self._prices = cost, (cost.copy_unit_s, cost.cpu_call_s, cost.cpu_unit_s)

    def reset_stats(self) -> None:
        self.stats = MissStats()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
