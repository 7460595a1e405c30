"""The CPU expert path: compute a layer's missed units on the CPU, from the host arena where they live.

At batch 1 a unit's GEMVs read each weight once, so the CPU path is bound by DRAM bandwidth (90+
GB/s on the H100 box's 16 cores) and can beat copying the unit over PCIe (~50 GB/s) and computing it
on the GPU. Getting there takes one call per layer, not one per unit: torch's per-call overhead
(~0.1 ms a GEMV) caps small experts at a quarter of the bandwidth (MEASURED.md). Three implementations
of the same math (`moe/kernels.grouped_swiglu`), chosen by `impl`:

- ``native`` (default where a C compiler exists): `_swiglu_rows.c`, one OpenMP call over any set of
  arena rows, fp32 accumulation, fp32, bf16, int8 (`Int8Format`) or int4 (`Int4Format`: packed
  nibbles, fp16 group scales and minimums) rows read in place — quantized rows are never dequantized
  to a copy, so the CPU reads ~2× (int8) or ~3.6–3.8× (int4) fewer bytes a unit than bf16;
- ``torch``: maximal runs of adjacent rows (a planner's CPU units are key-ordered, so an expert's
  groups form one run) as strided views, one `bmm` per projection per run — no gather copy;
- ``unit``: one `mv` per projection per unit (the baseline the others must beat).

Other rows (fp16; int8 and int4 without a compiler) go through their format's own `cpu_grouped`.

Threads: `max(1, CPUs − 1)` by default, leaving one core to the thread that issues copies and waits
on events (a spinning waiter made a 16-thread CPU FFN 14–80× slower on the H100 box). `submit` runs a
call on a worker thread, so the caller can issue the layer's copies meanwhile; both the native call
(ctypes) and torch ops release the GIL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgeprism.errors import InputError
from edgeprism.moe.quant import DenseFormat, Int4Format, Int8Format, UnitFormat
from edgeprism.schedule import native

IMPLS = ("auto", "native", "torch", "unit")
I4_LANES = 16  # `_swiglu_rows.c`: an int4 group is read 16 bytes (32 inputs) a step


def default_threads() -> int:
    """CPUs this process may run on, minus one for the copy/sync thread.

    Logical CPUs, not physical cores: cloud machines often expose each vCPU as a core, and the H100
    box's measurements (MEASURED.md: 15 of 16 threads) were taken that way. Override where SMT
    siblings share a core's bandwidth and fewer threads read faster (`bench/cpu_experts.py --threads`).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus - 1)


def runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """(first row, count) of each maximal run of consecutive rows, in the given order."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][0] + out[-1][1] == r:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((r, 1))
    return out


class CpuExperts:
    """A model's CPU expert path: `fmt` says how rows are stored; `threads` how many cores to use."""

    def __init__(self, fmt: UnitFormat, threads: int | None = None, impl: str = "auto",
                 int4_act: str | None = None) -> None:
        if impl not in IMPLS:
            raise InputError(f"impl must be one of {IMPLS}, got {impl!r}")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be ≥ 1, got {threads}")
        self.fmt, self.threads = fmt, threads or default_threads()
        self._layout = native_layout(fmt, int4_act)
        lib = native.load() if self._layout is not None and impl in ("auto", "native") else None
        if impl == "native" and lib is None:
            raise InputError("the native CPU expert kernel is unavailable (no C compiler, or rows that are not "
                             "fp32, bf16, int8 or int4 with groups of a multiple of 32); use impl='torch'")
        dense = isinstance(fmt, DenseFormat) and fmt.row_dtype == fmt.compute_dtype
        fallback = "format" if not dense else ("unit" if impl == "unit" else "torch")
        self.impl = "native" if lib is not None else fallback
        self._lib = lib
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, x: torch.Tensor, arena: torch.Tensor, rows: Sequence[int],
                 weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[i] · unit_{rows[i]}(x): x [1, D], arena [R, row_numel] (host), weights [n] -> [1, D]."""
        if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != self.fmt.dim:
            raise InputError(f"the CPU expert path takes one token x [1, {self.fmt.dim}], got {tuple(x.shape)}")
        if len(rows) != weights.numel():
            raise InputError(f"{len(rows)} rows but {weights.numel()} weights")
        if (arena.device.type != "cpu" or x.device.type != "cpu" or not arena.is_contiguous()
                or arena.dtype != self.fmt.row_dtype or arena.dim() != 2 or arena.shape[1] != self.fmt.row_numel):
            raise InputError(f"the CPU expert path reads a contiguous host arena [rows, {self.fmt.row_numel}] of "
                             f"{self.fmt.row_dtype} and a host x; got {arena.dtype} {tuple(arena.shape)} on "
                             f"{arena.device}, x on {x.device}")
        if not len(rows):
            return torch.zeros_like(x)
        if self.impl == "native":
            return self._native(x, arena, rows, weights)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # process-wide: the engine owns this setting
        if self.impl == "format":
            idx = torch.as_tensor(list(rows), dtype=torch.long)
            return self.fmt.cpu_grouped(x, self.fmt.parts(arena), idx, torch.zeros_like(idx), weights)
        if self.impl == "unit":
            return self._per_unit(x, arena, rows, weights)
        return self._runs(x, arena, rows, weights)

    def submit(self, x: torch.Tensor, arena: torch.Tensor, rows: Sequence[int],
               weights: torch.Tensor) -> Future[torch.Tensor]:
        """The same call on this path's worker thread (wait with `.result()`: it blocks, never spins)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeprism-cpu-experts")
        return self._pool.submit(self, x, arena, rows, weights)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _native(self, x: torch.Tensor, arena: torch.Tensor, rows: Sequence[int],
                weights: torch.Tensor) -> torch.Tensor:
        assert self._lib is not None and self._layout is not None
        D, Ig = self.fmt.dim, self.fmt.group_inter
        xf = x.float().contiguous()
        w = weights.float().contiguous()
        idx = torch.as_tensor(list(rows), dtype=torch.int64)
        if int(idx.min()) < 0 or int(idx.max()) >= arena.shape[0]:
            raise InputError(f"rows must lie in [0, {arena.shape[0]})")
        lay = self._layout
        work = torch.empty(self._lib.swiglu_rows_work(lay.kind, len(rows), D, Ig, lay.group_size))
        y = torch.empty(1, D)
        self._lib.swiglu_rows(arena.data_ptr(), lay.kind, arena.shape[1] * arena.element_size(), *lay.offsets,
                              idx.data_ptr(), w.data_ptr(), len(rows), D, Ig, lay.group_size, xf.data_ptr(),
                              work.data_ptr(), y.data_ptr(), self.threads)
        return y.to(x.dtype)

    def _runs(self, x: torch.Tensor, arena: torch.Tensor, rows: Sequence[int],
              weights: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(self.fmt.dim)
        i = 0
        for first, n in runs(rows):
            parts = self.fmt.parts(arena[first:first + n])  # strided views of n adjacent rows, no copy
            h = torch.bmm(parts.w13, x.t().expand(n, -1, 1)).squeeze(-1)  # [n, 2Ig]
            gate, up = h.chunk(2, dim=-1)  # [n, Ig] x2
            z = torch.bmm(parts.w2, (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [n, D]
            y += (z.float() * weights[i:i + n, None].float()).sum(0)
            i += n
        return y[None].to(x.dtype)

    def _per_unit(self, x: torch.Tensor, arena: torch.Tensor, rows: Sequence[int],
                  weights: torch.Tensor) -> torch.Tensor:
        parts = self.fmt.parts(arena)
        y = torch.zeros(self.fmt.dim)
        for r, w in zip(rows, weights.tolist()):
            gate, up = torch.mv(parts.w13[r], x[0]).chunk(2)  # [Ig] x2
            y += torch.mv(parts.w2[r], F.silu(gate) * up).float() * w
        return y[None].to(x.dtype)


INT4_ACTS = ("int8", "fp32")


def int4_activations(value: str | None = None) -> str:
    """How the native kernel feeds int4 rows: ``int8`` (default) quantizes each dot's inputs per chunk
    of 64 to int8 and runs integer dots (llama.cpp's Q8 trick: the CPU reads int4 rows at memory
    speed instead of converting every nibble to float); ``fp32`` keeps the inputs exact. `value`, else
    `EDGEPRISM_CPU_INT4_ACT`, else int8."""
    value = value or os.environ.get("EDGEPRISM_CPU_INT4_ACT") or "int8"
    if value not in INT4_ACTS:
        raise InputError(f"int4 activations for the CPU path must be one of {INT4_ACTS}, got {value!r} "
                         "(argument int4_act or EDGEPRISM_CPU_INT4_ACT)")
    return value


@dataclass(frozen=True)
class NativeLayout:
    """How `_swiglu_rows.c` reads a format's rows: `kind` 0-4 = fp32, bf16, int8, int4 rows, int4 rows
    with int8 activations; byte
    offsets in a row of w13, w2, their scales s13, s2 and minimums m13, m2 (0 where the kind has
    none); `group_size` of int4 (0 otherwise)."""

    kind: int
    offsets: tuple[int, int, int, int, int, int]
    group_size: int = 0


def native_layout(fmt: UnitFormat, int4_act: str | None = None) -> NativeLayout | None:
    """How the native kernel reads `fmt`'s rows, or None if it cannot. Dense rows are read in their
    storage dtype whatever the compute dtype (fp32 math); quantized rows in place, scales and all.
    int4 rows take int8 activations (`int4_activations`) where the group size is a multiple of 64."""
    D, Ig = fmt.dim, fmt.group_inter
    if isinstance(fmt, DenseFormat) and fmt.row_dtype in (torch.float32, torch.bfloat16):
        size = torch.empty((), dtype=fmt.row_dtype).element_size()
        return NativeLayout(0 if fmt.row_dtype == torch.float32 else 1, (0, 2 * Ig * D * size, 0, 0, 0, 0))
    if isinstance(fmt, Int8Format):
        at = {name: offset for name, (offset, _, _) in fmt.layout.items()}
        return NativeLayout(2, (at["q13"], at["q2"], at["s13"], at["s2"], 0, 0))
    if isinstance(fmt, Int4Format) and fmt.group_size % (2 * I4_LANES) == 0:
        at = {name: offset for name, (offset, _, _) in fmt.layout.items()}
        q8 = int4_activations(int4_act) == "int8" and fmt.group_size % 64 == 0
        return NativeLayout(4 if q8 else 3, (at["q13"], at["q2"], at["s13"], at["s2"], at["m13"], at["m2"]),
                            fmt.group_size)
    return None
