"""The CPU's share of zero-copy decode (`schedule="direct"`, `cpu_share=`): GPU and CPU read misses at once.

In direct decode the GPU reads every uncached unit over PCIe (~40-50 GB/s), while the host's DRAM
could feed its own cores at 80-90 GB/s (MEASURED.md). This module hands part of each layer's misses to
the CPU *inside* the token's CUDA graph, with no host step between layers:

1. `split` (in the graph, per MoE layer): of the layer's missed assignments (slot < 0, weight > 0)
   the first ⌊frac · misses⌋ are the CPU's. The layer's record — x [D], then (host row, weight) per
   assignment, weight 0 where the CPU has nothing to do — goes to pinned host RAM, then the token's
   sequence number into `gpu_flag[j]`. On a GPU one Triton kernel stores both through the mapping,
   fencing its stores at system scope before the flag; otherwise (and with
   EDGEPRISM_SHARE_SPLIT=torch) device ops and two copies on one stream, so the flag lands after the
   record. The GPU's own kernels then run with the CPU's
   units at weight 0 (they read nothing for them).
2. The CPU (`_swiglu_rows.c: swiglu_token_loop`, one ctypes call per token on a worker thread, the GIL
   released) waits for `gpu_flag[j]`, computes its units of layer j from the host arena straight into
   `y[j]` (fp32), and releases `cpu_flag[j]` (a store-release after y is written).
3. `merge` (in the graph): a kernel polls `cpu_flag[j]` over PCIe until it holds the sequence number,
   then adds `y[j]` to the GPU's output. A poll that outlasts `timeout_s` gives up, sets a status the
   host checks after the token (`DecodeSyncError`), so a broken protocol never hangs the GPU.

Hazards and what closes them: the record and y buffers of layer j are rewritten for the next token
only after the other side's flag for this token was seen (the CPU writes y[j] for token n+1 only after
gpu_flag[j] = n+1, which the GPU sets after it merged y[j] of token n; the GPU rewrites the record
only after cpu_flag[j] = n, i.e. after the CPU read it). Sequence numbers, not booleans, so a stale
flag of the previous token never matches.

`frac` is the knob: fixed (`cpu_share=0.4`) or, with `cpu_share=True`, a local search on measured
decode step times (`observe_step`), which may settle at 0 where the hand-off costs more than the CPU
saves (e.g. when nearly every unit is cached). Outputs equal the GPU-only path within dtype tolerance (the CPU sums in fp32 in another
order), so with an adaptive share they are not bit-reproducible from run to run.

Off the GPU (tests), the same protocol runs with host tensors: copies are synchronous and `merge`
polls from Python.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from edgeprism.errors import ConfigError, DecodeSyncError
from edgeprism.moe.quant import UnitFormat
from edgeprism.schedule import native
from edgeprism.schedule.cpu_experts import default_threads, native_layout

TIMEOUT_S = 5.0  # a side that waits this long for the other gives up (a bug, never a slow machine)
GPU_WAIT_POLLS = 8  # a layer whose merge polled more than this waited for the CPU (a poll ≈ 1 µs of PCIe)
ADAPT_STEP = 0.1  # how far `frac` moves per window in adaptive mode
ADAPT_WINDOW = 8  # decode steps per measurement window
ADAPT_TOLERANCE = 0.02  # a neighbour must be this much faster to move there (noise below it)
ADAPT_STALE = 12  # windows after which a share's measured step time is measured again
PATH_WINDOWS = 256  # `cpu_share_path` keeps the latest windows' shares (a long-lived engine's stats stay small)
# the CPU compute of a layer, barrier to barrier (_swiglu_rows.c): the units' rows and the inputs
# (deinterleaved or quantized x, int4), the gate/up rows, the activations' sums or quantization
# (int4), the down rows with the sum over units; `summary()["cpu_share_phase_s"]` reports each one's
# total seconds
PHASES = ("inputs", "gate_up", "activations", "down")


class CpuShare:
    """Pinned exchange buffers, flags and the worker thread of one engine's CPU share."""

    def __init__(self, store, fmt: UnitFormat, top_k: int, device: torch.device, frac: float | None,
                 threads: int | None = None, timeout_s: float = TIMEOUT_S) -> None:
        layout = native_layout(fmt)
        lib = native.load() if layout is not None else None
        if lib is None:
            raise ConfigError("cpu_share needs the native CPU expert kernel (a C compiler, and fp32, bf16, int8 or "
                              f"int4 experts; got {fmt.name}); set cpu_share=None or install a C compiler (cc/gcc).")
        self.lib, self.layout, self.fmt = lib, layout, fmt
        self.device = device
        self.layers = list(store.layers)
        self.index = {layer: j for j, layer in enumerate(self.layers)}
        M, D, A = len(self.layers), fmt.dim, top_k * store.groups
        self.M, self.D, self.A, self.rec = M, D, A, D + 2 * A
        self.adaptive = frac is None
        self.frac_value = 0.5 if frac is None else float(frac)
        self._window: list[float] = []  # adaptive mode: step times at the current frac
        self._last_time: float | None = None
        self._direction = 1  # the last move's direction: measure that way first
        self._seen: dict[float, tuple[float, int]] = {}  # frac -> (its window's step time, window number)
        self._windows = 0
        self.threads = threads or max(1, default_threads() - 1)  # one core for the CPU loop's host peer
        self.timeout_s = timeout_s
        cuda = device.type == "cuda"
        # host side (pinned, hence mapped into the GPU's address space, where there is a GPU)
        self.pub = torch.zeros(M, self.rec, dtype=torch.float32, pin_memory=cuda)
        self.y = torch.zeros(M, D, dtype=torch.float32, pin_memory=cuda)
        self.gpu_flag = torch.zeros(M, dtype=torch.int32, pin_memory=cuda)
        self.cpu_flag = torch.zeros(M, dtype=torch.int32, pin_memory=cuda)
        self.arenas = torch.tensor([store.arenas[layer].data_ptr() for layer in self.layers], dtype=torch.int64)
        self._keep = [store.arenas[layer] for layer in self.layers]  # the pointers above stay valid
        self.work = torch.empty(lib.swiglu_rows_work(layout.kind, A, D, fmt.group_inter, layout.group_size))
        self.rows = torch.zeros(A, dtype=torch.int64)
        self.w = torch.zeros(A, dtype=torch.float32)
        self.wait_ns = torch.zeros(M, dtype=torch.int64)
        self.busy_ns = torch.zeros(M, dtype=torch.int64)
        self.phase_ns = torch.zeros(len(PHASES), dtype=torch.int64)  # the loop adds to it; `finish` folds it
        # device side
        self.seq_dev = torch.zeros(1, dtype=torch.int32, device=device)
        self.frac = torch.full((), self.frac_value, dtype=torch.float32, device=device)
        self.polls = torch.zeros(M, dtype=torch.int32, device=device)
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        # on a GPU one Triton kernel writes the record and the flag into host RAM (EDGEPRISM_SHARE_SPLIT=torch:
        # device ops and two copies instead, ~4x the per-layer hand-off)
        self.fused = cuda and os.environ.get("EDGEPRISM_SHARE_SPLIT", "triton") != "torch"
        # the torch split assembles each record on the device before its copy (the fused kernel needs none)
        self.stage = None if self.fused else torch.zeros(M, self.rec, dtype=torch.float32, device=device)
        self.seq = 0
        self.armed = False  # set by the direct decode step around the runs that include the share
        # set while a latency target's controller moves the floor: two loops on one step time fight (the
        # share's search then holds its frac; measured on the H100 box, bench/results/2026-11-23-h100-cpu-share/)
        self.held = False
        self._pool: ThreadPoolExecutor | None = None
        self._running: Future[int] | None = None
        self.units = self.runs = 0  # CPU units computed, loops run
        self.busy_s = self.wait_s = 0.0  # the loops' time computing, and waiting for the GPU's flags
        self.phase_s = [0.0] * len(PHASES)  # the computing, by phase
        self.gpu_waits = 0  # layers whose merge waited for the CPU
        self.path: deque[float] = deque(maxlen=PATH_WINDOWS)  # adaptive mode: each window's share, in order

    # ----- inside the graph -----

    def split(self, layer: int, x: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
        """Publish layer `layer`'s CPU units and return the GPU's weights (the CPU's zeroed). x [1, D];
        slots, rows, weights [A]. Device ops and copies only (graph-safe)."""
        j = self.index[layer]
        if self.fused:
            from edgeprism.schedule import cpu_share_triton

            return cpu_share_triton.split(x, slots, rows, weights, self.frac, self.seq_dev, self.pub[j],
                                          self.gpu_flag[j:j + 1])
        w = weights.float()
        miss = (slots < 0) & (w != 0)
        rank = miss.cumsum(0) - 1
        cpu = miss & (rank.float() < (miss.sum().float() * self.frac).floor())
        w_cpu = torch.where(cpu, w, torch.zeros_like(w))
        stage = self.stage[j]
        stage[:self.D].copy_(x.reshape(-1))
        stage[self.D:].view(self.A, 2).copy_(torch.stack((rows.float(), w_cpu), 1))
        cuda = self.device.type == "cuda"
        self.pub[j].copy_(stage, non_blocking=cuda)
        self.gpu_flag[j:j + 1].copy_(self.seq_dev, non_blocking=cuda)  # after the record, same stream
        return torch.where(cpu, torch.zeros_like(weights), weights)

    def merge(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """y [1, D] plus the CPU's part of layer `layer`, once the CPU has released it."""
        j = self.index[layer]
        if self.device.type == "cuda":
            from edgeprism.schedule import cpu_share_triton

            return cpu_share_triton.merge(self.cpu_flag, self.y, j, self.seq_dev, y, self.polls, self.status,
                                          self.timeout_s)
        deadline = time.perf_counter() + self.timeout_s
        polls = 0
        while int(self.cpu_flag[j]) != int(self.seq_dev):
            polls += 1
            if time.perf_counter() > deadline:
                self.status.fill_(1)
                break
            time.sleep(0)
        self.polls[j] = polls
        return (y.float() + self.y[j]).to(y.dtype)

    # ----- around each run of the graph (host) -----

    def begin(self) -> None:
        """Start the CPU loop for the next run of the token (graph replay or eager run)."""
        self.finish()
        self.seq = self.seq % (2**31 - 2) + 1
        self.seq_dev.fill_(self.seq)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeprism-cpu-share")
        self._running = self._pool.submit(self._loop, self.seq)

    def _loop(self, seq: int) -> int:
        lay, fmt, ptr = self.layout, self.fmt, lambda t: t.data_ptr()
        return self.lib.swiglu_token_loop(
            ptr(self.gpu_flag), ptr(self.cpu_flag), seq, self.M, ptr(self.pub), self.rec, self.A, ptr(self.y),
            ptr(self.arenas), lay.kind, self._keep[0].shape[1] * self._keep[0].element_size(), *lay.offsets,
            self.D, fmt.group_inter, lay.group_size, ptr(self.work), ptr(self.rows), ptr(self.w), self.threads,
            int(self.timeout_s * 1e9), ptr(self.wait_ns), ptr(self.busy_ns), ptr(self.phase_ns))

    def finish(self) -> None:
        """Wait for the running CPU loop (its GPU side has finished: the caller read the logits) and
        fold in its counts; raise if either side timed out."""
        if self._running is None:
            return
        running, self._running = self._running, None
        n = running.result()
        if n == -1 - self.M:  # `abort`ed: the run failed and its caller has the error
            return
        if n < 0:
            raise DecodeSyncError(f"the CPU share of decode gave up waiting for the GPU at MoE layer {-n - 1}; "
                                  "the token's output is unreliable. Reload without cpu_share and report this.")
        if int(self.status.item()):
            self.status.zero_()
            raise DecodeSyncError("the GPU gave up waiting for the CPU share of decode; the token's output is "
                                  "unreliable. Reload without cpu_share and report this.")
        polls = self.polls.tolist()  # the run has finished: no wait
        waited = sum(p > GPU_WAIT_POLLS for p in polls)
        self.units += int(n)
        self.runs += 1
        self.busy_s += float(self.busy_ns.sum()) * 1e-9
        self.wait_s += float(self.wait_ns.sum()) * 1e-9
        self.phase_s = [a + b * 1e-9 for a, b in zip(self.phase_s, self.phase_ns.tolist(), strict=True)]
        self.phase_ns.zero_()
        self.gpu_waits += waited

    def abort(self) -> None:
        """After a run that failed: stop the CPU loop now (it would wait for flags that never come)."""
        if self._running is not None:
            self.gpu_flag.fill_(-self.seq)  # host memory: the loop sees it at its next poll
            self.finish()

    def observe_step(self, seconds: float) -> None:
        """Adaptive mode: one decode step's time (start to start). Every `ADAPT_WINDOW` steps the
        window's time — the mean of its steps without the slowest one — is recorded for the current
        `frac` (starting from 0.5) and decides the next, a local search over 0, 0.1, ..., 1 that
        remembers what it measured:

        - a neighbour (frac ± 0.1) measured in the last `ADAPT_STALE` windows and faster by more than
          `ADAPT_TOLERANCE`: move to the fastest such neighbour;
        - else a neighbour not measured lately: measure it (in the direction of the last move first);
        - else stay: the current frac is the fastest around, and it keeps being measured, so a change
          of conditions (routing, another load on the machine) shows and moves it again.

        At the optimum the search stays put, re-measuring each neighbour once per `ADAPT_STALE`
        windows. At 0 the decode step runs the graphs without the share and pays none of its
        per-layer hand-off. Steps much longer than the last window's time (a prefill or a pause in
        between) are left out.

        Why a mean: throughput is the mean step, and a median does not see a share whose steps are
        often slow. On the H100 box an adaptive run over 48 layers (median windows) ended at 0.9 with
        31 of its 128 steps over 1.5x the median: 50 tok/s on average, against 66 at a fixed 0.5 with
        the same p50. Dropping the window's slowest step keeps one pause from deciding."""
        if not self.adaptive or self.held:
            return
        if self._last_time is not None and seconds > 3 * self._last_time:
            return
        self._window.append(seconds)
        if len(self._window) < ADAPT_WINDOW:
            return
        kept = sorted(self._window)[:-1]
        typical = sum(kept) / len(kept)
        self._window.clear()
        self._windows += 1
        here = self.frac_value
        self.path.append(here)
        self._seen[here] = (typical, self._windows)
        self._last_time = typical
        near = [f for f in (round(here - ADAPT_STEP, 6), round(here + ADAPT_STEP, 6)) if 0.0 <= f <= 1.0]
        fresh = {f: self._seen[f][0] for f in near if f in self._seen
                 and self._windows - self._seen[f][1] < ADAPT_STALE}
        faster = [f for f in fresh if fresh[f] < typical * (1 - ADAPT_TOLERANCE)]
        if faster:
            nxt = min(faster, key=lambda f: fresh[f])
        else:
            unmeasured = sorted((f for f in near if f not in fresh), key=lambda f: (f - here) * self._direction < 0)
            if not unmeasured:
                return  # the fastest around: stay
            nxt = unmeasured[0]
        self._direction = 1 if nxt > here else -1
        self.set_frac(nxt)

    def hold(self) -> None:
        """Hold the share for a step under a latency target (the floor controller is then the one loop
        on step time), at the fastest share measured in the last `ADAPT_STALE` windows if the search
        has measured any (else where it is)."""
        self.held = True
        if not self.adaptive:
            return
        fresh = {f: m for f, (m, w) in self._seen.items() if self._windows - w < ADAPT_STALE}
        if fresh:
            best = min(fresh, key=lambda f: fresh[f])
            if best != self.frac_value:
                self._window.clear()
                self.set_frac(best)

    def set_frac(self, frac: float) -> None:
        self.frac_value = frac
        self.frac.fill_(frac)

    def summary(self, unit_bytes: int) -> dict[str, float | int | None]:
        return {"cpu_share": self.frac_value, "cpu_share_units": self.units,
                "cpu_share_bytes": self.units * unit_bytes, "cpu_share_busy_s": self.busy_s,
                "cpu_share_gbps": self.units * unit_bytes / self.busy_s / 1e9 if self.busy_s > 0 else None,
                "cpu_share_gpu_waits": self.gpu_waits, "cpu_share_runs": self.runs, "cpu_share_wait_s": self.wait_s,
                "cpu_share_path": list(self.path),
                "cpu_share_phase_s": dict(zip(PHASES, self.phase_s, strict=True))}

    def reset_stats(self) -> None:
        self.path.clear()
        self.units = self.runs = self.gpu_waits = 0
        self.busy_s = self.wait_s = 0.0
        self.phase_s = [0.0] * len(PHASES)

    def close(self) -> None:
        if self._running is not None:
            self._running.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
