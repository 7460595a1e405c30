"""How one expert unit is stored and computed: dense (bf16/fp16/fp32) or weight-only int8/int4.

At batch 1 an offloading engine is limited by the bytes of expert weights it moves and reads per
token, so units may be stored quantized: int8 (one scale per output channel) or int4 (one scale and
one minimum per group of 64/128 inputs). Every format packs a unit — ``w1 [Ig, D]``, ``w3 [Ig, D]``,
``w2 [D, Ig]`` — into one flat row with its scales inside, so a unit still moves in one copy and all
cache slots keep one size. Host arenas and the VRAM pool hold these rows: ``[S, row_numel]`` of the
storage dtype for dense formats (exactly the layout used before quantization existed), ``[S,
unit_bytes]`` uint8 for quantized ones. A format knows:

- `pack` (load time) and `parts` (views of a pool or arena as the unit's tensors, no copy);
- `dequantize` (the reference: units back to the compute dtype);
- the compute entry points used by `OffloadedExperts`: `grouped` (one batched call over the slots of a
  decode step: the Triton kernel on CUDA, dequantize-then-`grouped_swiglu` elsewhere), `unit`
  (prefill, one unit at a time) and `cpu_grouped` (experts computed by the CPU straight from the host
  arena, one call per layer).

Error bounds (per weight, `tests/test_quant.py`): int8 |w − ŵ| ≤ max|w_row| / 254; int4 |w − ŵ| ≤
(max − min of its group) / 30 + fp16 rounding of the group's scale and minimum (< 1% of a step +
2⁻¹¹·|min|).
"""

from __future__ import annotations

import abc
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from edgeprism.errors import ExpertDtypeError
from edgeprism.moe.kernels import grouped_swiglu, split_pool, swiglu_unit, unit_numel

log = logging.getLogger(__name__)

EXPERT_DTYPES = ("bf16", "fp16", "fp32", "int8", "int4")
_DENSE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {v: k for k, v in _DENSE.items()}
INT4_GROUP_SIZES = (128, 64)  # preferred first; the first that divides both D and Ig is used
ALIGN = 16  # bytes: every part of a quantized row starts on this boundary (vector loads, dtype views)
FP16_TINY = 2.0**-14  # smallest normal fp16: floor of an int4 step, so a flat group never divides by 0


@dataclass(frozen=True)
class DenseParts:
    w13: torch.Tensor  # [S, 2Ig, D]
    w2: torch.Tensor  # [S, D, Ig]


@dataclass(frozen=True)
class QuantParts:
    """Views of quantized rows. int8: q int8 [S, N, K], s fp32 [S, N], m None.
    int4: q uint8 [S, N, K/2] (low nibble = even k), s and m fp16 [S, N, K/group]."""

    q13: torch.Tensor
    s13: torch.Tensor
    q2: torch.Tensor
    s2: torch.Tensor
    m13: torch.Tensor | None = None
    m2: torch.Tensor | None = None


Parts = DenseParts | QuantParts


class UnitFormat(abc.ABC):
    """Base of the unit formats; `make_format` picks one. `dim`/`group_inter` are D and Ig."""

    name: str
    row_dtype: torch.dtype
    row_numel: int

    def __init__(self, dim: int, group_inter: int, compute_dtype: torch.dtype) -> None:
        self.dim, self.group_inter, self.compute_dtype = dim, group_inter, compute_dtype

    @property
    def quantized(self) -> bool:
        return self.row_dtype == torch.uint8

    @property
    def unit_bytes(self) -> int:
        return self.row_numel * torch.empty((), dtype=self.row_dtype).element_size()

    @property
    def dense_bytes(self) -> int:
        """Bytes of the same unit in the compute dtype (what the format saves against)."""
        return unit_numel(self.dim, self.group_inter) * torch.empty((), dtype=self.compute_dtype).element_size()

    @abc.abstractmethod
    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """w1, w3: [Ig, D]; w2: [D, Ig] (any float dtype, any device) -> one row [row_numel]."""

    @abc.abstractmethod
    def parts(self, pool: torch.Tensor) -> Parts:
        """Views of a pool or arena [S, row_numel] as the units' tensors (no copy)."""

    @abc.abstractmethod
    def dequantize(self, parts: Parts, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The units at `slots` [A] in the compute dtype: w13 [A, 2Ig, D], w2 [A, D, Ig] (reference)."""

    def grouped(self, x: torch.Tensor, parts: Parts, slots: torch.Tensor, tokens: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """sum over assignments a of weights[a] · unit_{slots[a]}(x[tokens[a]]): [T, D] (decode)."""
        w13, w2 = self.dequantize(parts, slots)
        return grouped_swiglu(x, w13, w2, torch.arange(slots.numel(), device=x.device), tokens, weights)

    def grouped_direct(self, x: torch.Tensor, parts: Parts, host: Parts, slots: torch.Tensor, rows: torch.Tensor,
                       tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`grouped` where an assignment with slots[a] < 0 reads its unit from row rows[a] of the host
        arena (`host`: this format's views of it) instead of the pool: zero-copy decode
        (`schedule="direct"`). On CUDA the Triton kernels read such rows over PCIe; this reference
        (CPU, tests) gathers both and gives bit-for-bit what `grouped` gives with every unit in the pool."""
        live = slots >= 0
        pool13, pool2 = self.dequantize(parts, slots.clamp(min=0))
        idx = rows.to(_parts_device(host))
        host13, host2 = (t.to(x.device) for t in self.dequantize(host, idx))
        w13 = torch.where(live[:, None, None], pool13, host13)
        w2 = torch.where(live[:, None, None], pool2, host2)
        return grouped_swiglu(x, w13, w2, torch.arange(slots.numel(), device=x.device), tokens, weights)

    def unit(self, x: torch.Tensor, parts: Parts, slot: int) -> torch.Tensor:
        """One unit on x [n, D] -> [n, D] (prefill)."""
        w13, w2 = self.dequantize(parts, torch.tensor([slot], device=x.device))
        return swiglu_unit(x, w13[0], w2[0])

    def cpu_grouped(self, x: torch.Tensor, parts: Parts, rows: torch.Tensor, tokens: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
        """`grouped` on the CPU over host-arena rows: one call per layer (the CPU-compute option)."""
        return self.grouped(x, parts, rows, tokens, weights)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, D={self.dim}, Ig={self.group_inter}, {self.unit_bytes} B/unit)"


class DenseFormat(UnitFormat):
    """Unquantized units in `storage` dtype; with storage == compute dtype this is the original path."""

    def __init__(self, dim: int, group_inter: int, compute_dtype: torch.dtype, storage: torch.dtype) -> None:
        super().__init__(dim, group_inter, compute_dtype)
        self.name, self.row_dtype = _NAMES[storage], storage
        self.row_numel = unit_numel(dim, group_inter)

    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return torch.cat((w1.reshape(-1), w3.reshape(-1), w2.reshape(-1))).to(self.row_dtype)

    def parts(self, pool: torch.Tensor) -> DenseParts:
        return DenseParts(*split_pool(pool, self.dim, self.group_inter))

    def dequantize(self, parts: Parts, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(parts, DenseParts)
        dt = self.compute_dtype
        return parts.w13.index_select(0, slots).to(dt), parts.w2.index_select(0, slots).to(dt)

    def grouped(self, x: torch.Tensor, parts: Parts, slots: torch.Tensor, tokens: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        assert isinstance(parts, DenseParts)
        if self.row_dtype == x.dtype:
            if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and triton_ready():
                # read each unit's weights once, straight from its slot: gather + bmm moved every
                # weight three times (measured 202 µs against ~40 µs per Qwen3 decode layer)
                from edgeprism.moe import quant_triton

                return quant_triton.grouped_dense(x, parts.w13, parts.w2, slots, tokens, weights)
            return grouped_swiglu(x, parts.w13, parts.w2, slots, tokens, weights)
        return super().grouped(x, parts, slots, tokens, weights)

    def grouped_direct(self, x: torch.Tensor, parts: Parts, host: Parts, slots: torch.Tensor, rows: torch.Tensor,
                       tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        assert isinstance(parts, DenseParts) and isinstance(host, DenseParts)
        if x.is_cuda and triton_ready():  # the kernel reads any float storage and accumulates in fp32
            from edgeprism.moe import quant_triton

            return quant_triton.grouped_dense(x, parts.w13, parts.w2, slots, tokens, weights,
                                              host=(host.w13, host.w2), rows=rows)
        return super().grouped_direct(x, parts, host, slots, rows, tokens, weights)

    def unit(self, x: torch.Tensor, parts: Parts, slot: int) -> torch.Tensor:
        assert isinstance(parts, DenseParts)
        return swiglu_unit(x, parts.w13[slot].to(x.dtype), parts.w2[slot].to(x.dtype))


def _parts_device(parts: Parts) -> torch.device:
    return parts.w13.device if isinstance(parts, DenseParts) else parts.q13.device


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _QuantFormat(UnitFormat):
    """A uint8 row of named parts, each 16-byte aligned: q13, q2, then the scales (and minimums)."""

    row_dtype = torch.uint8

    def __init__(self, dim: int, group_inter: int, compute_dtype: torch.dtype) -> None:
        super().__init__(dim, group_inter, compute_dtype)
        self.layout: dict[str, tuple[int, torch.dtype, tuple[int, int]]] = {}
        offset = 0
        for name, dtype, shape in self._part_specs():
            self.layout[name] = (offset, dtype, shape)
            offset = _align(offset + shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size())
        self.row_numel = offset

    @abc.abstractmethod
    def _part_specs(self) -> list[tuple[str, torch.dtype, tuple[int, int]]]:
        """(name, dtype, shape) of each part of a row, in row order."""

    @abc.abstractmethod
    def _quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """w [N, K] -> {"q": ..., "s": ..., "m": ...} for one matrix."""

    def pack(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        row = torch.zeros(self.row_numel, dtype=torch.uint8, device=w1.device)
        mats = {"13": torch.cat((w1, w3)), "2": w2}
        for suffix, w in mats.items():
            for kind, t in self._quantize(w).items():
                offset, dtype, shape = self.layout[kind + suffix]
                n = shape[0] * shape[1] * t.element_size()
                row[offset:offset + n].view(dtype).copy_(t.reshape(-1))
        return row

    def parts(self, pool: torch.Tensor) -> QuantParts:
        views: dict[str, torch.Tensor] = {}
        for name, (offset, dtype, shape) in self.layout.items():
            n = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
            views[name] = pool[:, offset:offset + n].view(dtype).unflatten(1, shape)
        return QuantParts(**views)


class Int8Format(_QuantFormat):
    """Symmetric int8, one fp32 scale per output channel: w ≈ q · s, q ∈ [-127, 127]."""

    name = "int8"

    def _part_specs(self) -> list[tuple[str, torch.dtype, tuple[int, int]]]:
        D, Ig = self.dim, self.group_inter
        return [("q13", torch.int8, (2 * Ig, D)), ("q2", torch.int8, (D, Ig)),
                ("s13", torch.float32, (2 * Ig, 1)), ("s2", torch.float32, (D, 1))]

    def parts(self, pool: torch.Tensor) -> QuantParts:
        p = super().parts(pool)
        return QuantParts(p.q13, p.s13.squeeze(-1), p.q2, p.s2.squeeze(-1))

    def _quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(("q", "s"), quantize_int8(w)))

    def dequantize(self, parts: Parts, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(parts, QuantParts)
        dt = self.compute_dtype
        return tuple(dequantize_int8(q.index_select(0, slots), s.index_select(0, slots)).to(dt)  # type: ignore[return-value]
                     for q, s in ((parts.q13, parts.s13), (parts.q2, parts.s2)))

    def grouped(self, x: torch.Tensor, parts: Parts, slots: torch.Tensor, tokens: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton_ready():
            from edgeprism.moe import quant_triton

            return quant_triton.grouped(x, parts, slots, tokens, weights, int4=False, group_size=0)
        return super().grouped(x, parts, slots, tokens, weights)

    def grouped_direct(self, x: torch.Tensor, parts: Parts, host: Parts, slots: torch.Tensor, rows: torch.Tensor,
                       tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton_ready():
            from edgeprism.moe import quant_triton

            assert isinstance(parts, QuantParts) and isinstance(host, QuantParts)
            return quant_triton.grouped(x, parts, slots, tokens, weights, int4=False, group_size=0, host=host, rows=rows)
        return super().grouped_direct(x, parts, host, slots, rows, tokens, weights)

    def cpu_grouped(self, x: torch.Tensor, parts: Parts, rows: torch.Tensor, tokens: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
        op = aten_op("_weight_int8pack_mm")
        if op is None or x.is_cuda:
            return super().cpu_grouped(x, parts, rows, tokens, weights)
        assert isinstance(parts, QuantParts)
        # torch's packed int8 CPU GEMV reads the arena rows in place (no gather, no dequantized copy)
        out = torch.zeros_like(x)
        for r, t, w in zip(rows.tolist(), tokens.tolist(), weights.tolist()):
            xt = x[t:t + 1]  # [1, D]
            gate, up = op(xt, parts.q13[r], parts.s13[r].to(x.dtype)).chunk(2, dim=-1)  # [1, Ig] x2
            y = op(torch.nn.functional.silu(gate) * up, parts.q2[r], parts.s2[r].to(x.dtype))  # [1, D]
            out[t] += (y[0] * w).to(x.dtype)
        return out


class Int4Format(_QuantFormat):
    """Asymmetric int4 per group of `group_size` inputs: w ≈ q · s + m, q ∈ [0, 15], s and m fp16."""

    name = "int4"

    def __init__(self, dim: int, group_inter: int, compute_dtype: torch.dtype, group_size: int) -> None:
        self.group_size = group_size
        super().__init__(dim, group_inter, compute_dtype)

    def _part_specs(self) -> list[tuple[str, torch.dtype, tuple[int, int]]]:
        D, Ig, gs = self.dim, self.group_inter, self.group_size
        return [("q13", torch.uint8, (2 * Ig, D // 2)), ("q2", torch.uint8, (D, Ig // 2)),
                ("s13", torch.float16, (2 * Ig, D // gs)), ("m13", torch.float16, (2 * Ig, D // gs)),
                ("s2", torch.float16, (D, Ig // gs)), ("m2", torch.float16, (D, Ig // gs))]

    def _quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(("q", "s", "m"), quantize_int4(w, self.group_size)))

    def dequantize(self, parts: Parts, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(parts, QuantParts) and parts.m13 is not None and parts.m2 is not None
        dt, gs = self.compute_dtype, self.group_size
        return tuple(dequantize_int4(q.index_select(0, slots), s.index_select(0, slots), m.index_select(0, slots),  # type: ignore[return-value]
                                     gs).to(dt)
                     for q, s, m in ((parts.q13, parts.s13, parts.m13), (parts.q2, parts.s2, parts.m2)))

    def grouped(self, x: torch.Tensor, parts: Parts, slots: torch.Tensor, tokens: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton_ready():
            from edgeprism.moe import quant_triton

            return quant_triton.grouped(x, parts, slots, tokens, weights, int4=True, group_size=self.group_size)
        return super().grouped(x, parts, slots, tokens, weights)

    def grouped_direct(self, x: torch.Tensor, parts: Parts, host: Parts, slots: torch.Tensor, rows: torch.Tensor,
                       tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton_ready():
            from edgeprism.moe import quant_triton

            assert isinstance(parts, QuantParts) and isinstance(host, QuantParts)
            return quant_triton.grouped(x, parts, slots, tokens, weights, int4=True, group_size=self.group_size,
                                        host=host, rows=rows)
        return super().grouped_direct(x, parts, host, slots, rows, tokens, weights)


# ---- quantizers (load time; run on whatever device the weights are on) -------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [N, K] -> q int8 [N, K], s fp32 [N]
    w = w.float()
    s = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # q: [..., N, K] int8; s: [..., N] -> fp32 [..., N, K]
    return q.float() * s[..., None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # w: [N, K] -> q uint8 [N, K/2] (k even in the low nibble), s fp16 [N, K/gs], m fp16 [N, K/gs]
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    s = ((hi - lo) / 15).clamp(min=FP16_TINY).half()
    m = lo.half()
    q = torch.round((g - m.float()[..., None]) / s.float()[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return q[:, 0::2] | (q[:, 1::2] << 4), s, m


def dequantize_int4(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor, group_size: int) -> torch.Tensor:
    # q: [..., N, K/2] uint8; s, m: [..., N, K/gs] -> fp32 [..., N, K]
    nibbles = torch.stack((q & 15, q >> 4), dim=-1).flatten(-2)  # [..., N, K]
    g = nibbles.unflatten(-1, (-1, group_size)).float()  # [..., N, K/gs, gs]
    return (g * s.float()[..., None] + m.float()[..., None]).flatten(-2)


# ---- choosing a format ----------------------------------------------------------------------

def make_format(expert_dtype: str | torch.dtype | None, dim: int, group_inter: int,
                compute_dtype: torch.dtype) -> UnitFormat:
    """The unit format for `expert_dtype` ("bf16", "fp16", "fp32", "int8", "int4", or "int4-g64" /
    "int4-g128" to force the group size; None = the model's dtype, unquantized)."""
    if expert_dtype is None or expert_dtype == compute_dtype:
        return DenseFormat(dim, group_inter, compute_dtype, compute_dtype)
    if isinstance(expert_dtype, torch.dtype) and expert_dtype in _NAMES:
        return DenseFormat(dim, group_inter, compute_dtype, expert_dtype)
    name = expert_dtype.lower() if isinstance(expert_dtype, str) else None
    if name in _DENSE:
        return DenseFormat(dim, group_inter, compute_dtype, _DENSE[name])
    if name == "int8":
        return Int8Format(dim, group_inter, compute_dtype)
    if name is not None and name.startswith("int4"):
        return Int4Format(dim, group_inter, compute_dtype, _int4_group(name, dim, group_inter))
    raise ExpertDtypeError(f"expert_dtype={expert_dtype!r} is not supported; use one of {', '.join(EXPERT_DTYPES)} "
                           "(or None for the model's dtype).")


def _int4_group(name: str, dim: int, group_inter: int) -> int:
    sizes = {"int4": INT4_GROUP_SIZES, "int4-g128": (128,), "int4-g64": (64,)}.get(name)
    if sizes is None:
        raise ExpertDtypeError(f"expert_dtype={name!r} is not supported; use int4, int4-g64 or int4-g128.")
    for gs in sizes:
        if dim % gs == 0 and group_inter % gs == 0:
            return gs
    raise ExpertDtypeError(f"int4 needs a group size in {sizes} dividing both the hidden size {dim} and the "
                           f"sub-expert width {group_inter}; use fewer groups, or expert_dtype='int8'.")


@functools.cache
def triton_ready() -> bool:
    """Whether the Triton kernels can run (Triton importable, CUDA present); checked once."""
    try:
        import triton  # noqa: F401
    except ImportError:
        log.info("triton is not installed: quantized experts use the torch dequantize-then-matmul path")
        return False
    return torch.cuda.is_available()


def aten_op(name: str) -> Any:
    """A private aten op if this torch has it (they come and go between versions), else None."""
    return getattr(torch.ops.aten, name) if hasattr(torch.ops.aten, name) else None
