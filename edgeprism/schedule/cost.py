"""What a unit costs on this machine: a host→device copy, a CPU computation, a GPU computation.

The scheduler (`scheduler.plan`) decides per routed unit between waiting for a copy, computing on the
CPU and dropping; it needs these three prices and nothing else. They depend on the machine (PCIe
generation, pinned or not, DRAM bandwidth, cores, GPU) and on the unit's size and format, so they are
measured once on the running machine by `calibrate` and cached on disk as JSON, keyed by everything
that changes them (`load_or_calibrate`; `recalibrate=True` measures again).

Formulas (all seconds; `unit_bytes` is one stored unit, the row the host arena holds):

- copy of n bytes: ``h2d_latency_s + n / bandwidth(n)``, where `bandwidth` interpolates the measured
  table ``h2d_sizes → h2d_bytes_per_s`` linearly in log(size) and is flat beyond its ends (PCIe moves
  small copies far slower than large ones: 19 GB/s at 256 KiB, 53 GB/s at ≥ 16 MiB on the H100 box);
- CPU path over a layer's n units (one call): ``cpu_call_s + n · unit_bytes / cpu_bytes_per_s``
  (0 for n = 0), the call's fixed cost including handing the [1, D] result back;
- GPU grouped computation of n units: ``gpu_call_s + n · gpu_unit_s``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgeprism.errors import InputError
from edgeprism.moe.quant import UnitFormat

if TYPE_CHECKING:
    from edgeprism.cache.host_store import HostStore

log = logging.getLogger(__name__)

COST_VERSION = 2  # 2: best of ROUNDS timing rounds
ROUNDS = 3
H2D_SIZES = (4096, 65536, 262144, 1 << 20, 4 << 20, 16 << 20)  # bytes per copy, measured at calibration


@dataclass(frozen=True)
class CostModel:
    """Prices of one unit on one machine; see the module docstring for the formulas."""

    unit_bytes: int
    h2d_latency_s: float
    h2d_sizes: tuple[int, ...]
    h2d_bytes_per_s: tuple[float, ...]
    cpu_call_s: float
    cpu_bytes_per_s: float
    gpu_call_s: float
    gpu_unit_s: float
    machine: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.unit_bytes <= 0:
            raise InputError(f"unit_bytes must be positive, got {self.unit_bytes}")
        if not self.h2d_sizes or len(self.h2d_sizes) != len(self.h2d_bytes_per_s):
            raise InputError("h2d_sizes and h2d_bytes_per_s must be non-empty and of equal length")
        if list(self.h2d_sizes) != sorted(set(self.h2d_sizes)) or self.h2d_sizes[0] <= 0:
            raise InputError(f"h2d_sizes must be positive and strictly increasing, got {self.h2d_sizes}")
        rates = (*self.h2d_bytes_per_s, self.cpu_bytes_per_s)
        if any(not 0 < r < math.inf for r in rates):
            raise InputError(f"bandwidths must be positive and finite, got {rates}")
        times = (self.h2d_latency_s, self.cpu_call_s, self.gpu_call_s, self.gpu_unit_s)
        if any(not (t >= 0 and math.isfinite(t)) for t in times):
            raise InputError(f"latencies must be finite and ≥ 0, got {times}")

    def h2d_bandwidth(self, nbytes: int) -> float:
        """Bytes/s of one copy of `nbytes` (log-size interpolation in the measured table)."""
        sizes, rates = self.h2d_sizes, self.h2d_bytes_per_s
        if nbytes <= sizes[0]:
            return rates[0]
        if nbytes >= sizes[-1]:
            return rates[-1]
        i = bisect.bisect_right(sizes, nbytes)
        t = (math.log(nbytes) - math.log(sizes[i - 1])) / (math.log(sizes[i]) - math.log(sizes[i - 1]))
        return rates[i - 1] + t * (rates[i] - rates[i - 1])

    def h2d_seconds(self, nbytes: int) -> float:
        """One host→device copy of `nbytes`."""
        if nbytes < 0:
            raise InputError(f"a copy cannot move {nbytes} bytes")
        return self.h2d_latency_s + nbytes / self.h2d_bandwidth(nbytes) if nbytes else 0.0

    @property
    def copy_unit_s(self) -> float:
        """One unit copied on its own (the scheduler's price of a fetch)."""
        return self.h2d_seconds(self.unit_bytes)

    @property
    def cpu_unit_s(self) -> float:
        """Marginal CPU time of one more unit in a layer's CPU call."""
        return self.unit_bytes / self.cpu_bytes_per_s

    def cpu_seconds(self, units: int) -> float:
        """The CPU path over `units` units of one layer (one call)."""
        if units < 0:
            raise InputError(f"cannot compute {units} units")
        return self.cpu_call_s + units * self.cpu_unit_s if units else 0.0

    def gpu_seconds(self, units: int) -> float:
        """The GPU's grouped computation of `units` units of one layer."""
        if units < 0:
            raise InputError(f"cannot compute {units} units")
        return self.gpu_call_s + units * self.gpu_unit_s if units else 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CostModel:
        d = dict(d)
        d["h2d_sizes"] = tuple(int(s) for s in d["h2d_sizes"])
        d["h2d_bytes_per_s"] = tuple(float(r) for r in d["h2d_bytes_per_s"])
        return cls(**d)


# ---- measuring ---------------------------------------------------------------------------------

def _timer(device: torch.device) -> Callable[[Callable[[], None], int], float]:
    """Seconds per call of fn, averaged over `reps` back-to-back calls after one warm-up, best of
    `ROUNDS` rounds (other processes on a shared machine only ever slow a round down):
    CUDA events on a GPU (device time, no host sync between calls), perf_counter on the CPU."""

    def cuda(fn: Callable[[], None], reps: int) -> float:
        fn()
        best = math.inf
        for _ in range(ROUNDS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()  # blocks in the driver, not in a Python spin (MEASURED.md: spin-wait hazard)
            best = min(best, start.elapsed_time(end) / 1e3 / reps)
        return best

    def cpu(fn: Callable[[], None], reps: int) -> float:
        fn()
        best = math.inf
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps)
        return best

    return cuda if device.type == "cuda" else cpu


def _measure_h2d(device: torch.device, sizes: Sequence[int], reps: int) -> tuple[float, list[float]]:
    """Latency (a 256-byte copy) and per-size bandwidth with that latency taken out."""
    pin = device.type == "cuda"
    timer = _timer(device)
    src = torch.empty(max(sizes), dtype=torch.uint8, pin_memory=pin)
    src.fill_(1)
    dst = torch.empty(max(sizes), dtype=torch.uint8, device=device)

    def copy(n: int) -> Callable[[], None]:
        return lambda: dst[:n].copy_(src[:n], non_blocking=pin)

    latency = timer(copy(256), reps)
    rates = []
    for n in sizes:
        t = timer(copy(n), max(5, reps * sizes[0] // n))
        rates.append(n / max(t - latency, t * 0.05, 1e-9))
    return latency, rates


def _affine_fit(t1: float, tn: float, n: int) -> tuple[float, float]:
    """(fixed, per unit) from the time of 1 and of n units; clamped to be non-negative."""
    per_unit = max((tn - t1) / (n - 1), tn / n * 0.05, 1e-12)
    return max(t1 - per_unit, 0.0), per_unit


def calibrate(fmt: UnitFormat, arenas: Sequence[torch.Tensor], device: torch.device | str, *,
              threads: int | None = None, units: int = 8, reps: int = 5) -> CostModel:
    """Measure a `CostModel` on this machine for units of `fmt` stored in `arenas` (host rows).

    The CPU path is timed on the arenas' real rows, cycling through them so that large models read
    from DRAM rather than the last-level cache; the GPU path is the format's grouped computation on
    `device`, timed with CUDA events (on a CPU "device" both run on the CPU: CI and laptops).
    """
    from edgeprism.schedule.cpu_experts import CpuExperts

    device = torch.device(device)
    arenas = [a for a in arenas if a.shape[0] >= 2]
    if not arenas:
        raise InputError("calibration needs an arena of at least two unit rows")
    units = min(units, max(a.shape[0] for a in arenas))
    arenas = [a for a in arenas if a.shape[0] >= units]
    latency, rates = _measure_h2d(device, H2D_SIZES, reps * 4)
    cpu_call, cpu_unit = _measure_cpu(CpuExperts(fmt, threads), fmt, arenas, units, reps)
    gpu_call, gpu_unit = _measure_gpu(fmt, arenas[0], device, units, reps)
    return CostModel(unit_bytes=fmt.unit_bytes, h2d_latency_s=latency, h2d_sizes=H2D_SIZES,
                     h2d_bytes_per_s=tuple(rates), cpu_call_s=cpu_call, cpu_bytes_per_s=fmt.unit_bytes / cpu_unit,
                     gpu_call_s=gpu_call, gpu_unit_s=gpu_unit, machine=machine_key(fmt, device, threads))


def _measure_cpu(path: object, fmt: UnitFormat, arenas: Sequence[torch.Tensor], units: int,
                 reps: int) -> tuple[float, float]:
    x = torch.randn(1, fmt.dim, dtype=fmt.compute_dtype)
    weights = torch.ones(units)
    calls = [(a, first) for a in arenas for first in range(0, a.shape[0] - units + 1, units)]
    state = {"i": 0}

    def run(n: int) -> Callable[[], None]:
        def fn() -> None:
            arena, first = calls[state["i"] % len(calls)]
            state["i"] += 1
            path(x, arena, range(first, first + n), weights[:n])  # type: ignore[operator]
        return fn

    timer = _timer(torch.device("cpu"))
    return _affine_fit(timer(run(1), reps), timer(run(units), reps), units)


def _measure_gpu(fmt: UnitFormat, arena: torch.Tensor, device: torch.device, units: int,
                 reps: int) -> tuple[float, float]:
    pool = arena[:units].to(device)
    parts = fmt.parts(pool)
    x = torch.randn(1, fmt.dim, dtype=fmt.compute_dtype, device=device)

    def run(n: int) -> Callable[[], None]:
        slots = torch.arange(n, device=device)
        tokens = torch.zeros(n, dtype=torch.long, device=device)
        w = torch.ones(n, device=device)
        return lambda: fmt.grouped(x, parts, slots, tokens, w)

    timer = _timer(device)
    return _affine_fit(timer(run(1), reps), timer(run(units), reps), units)


# ---- the on-disk cache ---------------------------------------------------------------------------

def machine_key(fmt: UnitFormat, device: torch.device | str, threads: int | None) -> dict[str, str]:
    """Everything a cost model depends on; a change in any of these means measuring again."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"version": str(COST_VERSION), "host": platform.node(), "gpu": gpu, "torch": torch.__version__,
            "format": fmt.name, "dim": str(fmt.dim), "group_inter": str(fmt.group_inter),
            "compute_dtype": str(fmt.compute_dtype), "unit_bytes": str(fmt.unit_bytes), "threads": str(threads)}


def default_cache_dir() -> Path:
    """`$EDGEPRISM_CACHE_DIR/cost`, else `$XDG_CACHE_HOME/edgeprism/cost`, else ~/.cache/edgeprism/cost."""
    root = os.environ.get("EDGEPRISM_CACHE_DIR")
    if root:
        return Path(root) / "cost"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "edgeprism" / "cost"


def cache_path(key: dict[str, str], cache_dir: Path | str | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"{key['host']}-{digest}.json"


def load_or_calibrate(fmt: UnitFormat, arenas: Sequence[torch.Tensor], device: torch.device | str, *,
                      threads: int | None = None, cache_dir: Path | str | None = None,
                      recalibrate: bool = False) -> CostModel:
    """The cached cost model of this machine and format, measuring it first if needed.

    An unreadable or mismatching cache file is measured again (and overwritten), with a log line.
    """
    key = machine_key(fmt, device, threads)
    path = cache_path(key, cache_dir)
    if not recalibrate and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("machine") == key:
                return CostModel.from_json(data)
            log.info("cost cache %s was measured for another machine; measuring again", path)
        except (ValueError, KeyError, TypeError, InputError) as e:
            log.warning("cost cache %s is unreadable (%s); measuring again", path, e)
    model = calibrate(fmt, arenas, device, threads=threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(model.to_json(), indent=1))
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one, never half
    log.info("measured the cost model of %s: %s", key["host"], path)
    return model


def for_store(store: HostStore, device: torch.device | str, **kwargs: object) -> CostModel:
    """`load_or_calibrate` for the units of a `HostStore` (its format, its arenas' rows)."""
    return load_or_calibrate(store.format, list(store.arenas.values()), device, **kwargs)  # type: ignore[arg-type]
