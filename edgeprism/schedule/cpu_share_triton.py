"""The GPU side of the CPU share (schedule/cpu_share.py), two small kernels per MoE layer, captured in the
decode graph: `split` picks the CPU's units and writes the layer's record and flag straight into pinned
host RAM; `merge` polls the CPU's flag there, then adds the CPU's partial output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(x_ptr, slots_ptr, rows_ptr, w_ptr, frac_ptr, seq_ptr, pub_ptr, flag_ptr, wgpu_ptr, D, A,
                  BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr):
    a = tl.arange(0, BLOCK_A)
    am = a < A
    slots = tl.load(slots_ptr + a, mask=am, other=0)
    w_in = tl.load(w_ptr + a, mask=am, other=0.0)
    w = w_in.to(tl.float32)
    rows = tl.load(rows_ptr + a, mask=am, other=0)
    mi = ((slots < 0) & (w != 0.0) & am).to(tl.int32)
    rank = tl.cumsum(mi, 0) - mi  # misses before this one
    n_cpu = tl.floor(tl.sum(mi, 0).to(tl.float32) * tl.load(frac_ptr))
    cpu = (mi > 0) & (rank.to(tl.float32) < n_cpu)
    tl.store(wgpu_ptr + a, tl.where(cpu, 0.0, w).to(wgpu_ptr.dtype.element_ty), mask=am)
    # the record, straight into pinned host RAM (mapped): x, then (row, weight) per assignment
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        dm = offs < D
        tl.store(pub_ptr + offs, tl.load(x_ptr + offs, mask=dm, other=0.0).to(tl.float32), mask=dm)
    tl.store(pub_ptr + D + 2 * a, rows.to(tl.float32), mask=am)
    tl.store(pub_ptr + D + 2 * a + 1, tl.where(cpu, w, 0.0), mask=am)
    # every thread fences its own stores at system scope, all meet at the barrier, then the flag:
    # the host never sees the flag before the record (the __threadfence_system() pattern)
    seq = tl.load(seq_ptr + a * 0)
    seq = tl.inline_asm_elementwise("fence.sc.sys; mov.b32 $0, $1;", "=r,r", [seq], dtype=tl.int32, is_pure=False,
                                    pack=1)
    tl.debug_barrier()
    tl.store(flag_ptr + a * 0, seq, mask=a == 0)


def split(x: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, frac: torch.Tensor,
          seq: torch.Tensor, pub: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """The CPU's units of one layer: record and flag written to host memory (pub [D + 2A], flag [1]);
    returns the GPU's weights [A] (the CPU's zeroed)."""
    A, D = slots.numel(), x.shape[-1]
    out = torch.empty_like(w)
    _split_kernel[(1,)](x.reshape(-1), slots, rows, w.contiguous(), frac, seq, pub, flag, out, D, A,
                        BLOCK_D=1024, BLOCK_A=max(16, triton.next_power_of_2(A)), num_warps=1)
    return out


@triton.jit
def _merge_kernel(flag_ptr, seq_ptr, yh_ptr, y_ptr, out_ptr, polls_ptr, status_ptr, max_polls, D,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    seq = tl.load(seq_ptr)
    # flag_ptr is host memory: every volatile load is a fresh read over PCIe (no cached copy)
    flag = tl.load(flag_ptr, volatile=True)
    n = 0
    while (flag != seq) & (n < max_polls):
        flag = tl.load(flag_ptr, volatile=True)
        n += 1
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    # read y only after the flag held seq: the CPU wrote y before its store-release of the flag
    yh = tl.load(yh_ptr + offs, mask=mask, other=0.0, volatile=True)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (y + yh).to(out_ptr.dtype.element_ty), mask=mask)
    if pid == 0:
        tl.store(polls_ptr, n)
        if flag != seq:
            tl.store(status_ptr, 1)


def merge(cpu_flag: torch.Tensor, y_host: torch.Tensor, j: int, seq: torch.Tensor, y: torch.Tensor,
          polls: torch.Tensor, status: torch.Tensor, timeout_s: float) -> torch.Tensor:
    """y [1, D] (device) + y_host[j] once cpu_flag[j] == seq; polls[j] = how many polls it took."""
    D = y.shape[-1]
    out = torch.empty_like(y)
    block = 1024
    # a poll is a PCIe round trip, ~1 µs: the timeout in polls is generous on any bus
    max_polls = int(timeout_s * 2e6)
    _merge_kernel[(triton.cdiv(D, block),)](cpu_flag[j:], seq, y_host[j], y.contiguous(), out, polls[j:], status,
                                           max_polls, D, BLOCK=block, num_warps=4)
    return out
