"""The GPU side of the CPU share's merge (schedule/cpu_share.py): poll a flag in pinned host RAM, then
add the CPU's partial output. One small kernel per MoE layer, captured in the decode graph."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
