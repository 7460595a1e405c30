"""When one-token decode uses the fused Triton kernels (`fused_triton.py`) instead of chains of torch ops.

They run for 16-bit activations on CUDA when Triton is installed; `EDGEPRISM_FUSED=0` turns them off
(the torch path, e.g. to compare). On the CPU they run only when asked for tests, under Triton's
interpreter (`EDGEPRISM_FUSED=interpret` and `TRITON_INTERPRET=1`, which must be set before Triton
is first imported), never by default. Prefill and batched decode keep the torch path.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _module() -> ModuleType | None:
    try:
        from edgeprism.models import fused_triton
    except ImportError:  # no Triton: the torch ops
        return None
    return fused_triton


def kernels(t: torch.Tensor) -> ModuleType | None:
    """The fused kernels module if one-token decode on activations like `t` should use it, else None."""
    return on(t.device) if t.dtype in _DTYPES else None


def on(device: torch.device) -> ModuleType | None:
    """The fused kernels module if one-token decode on `device` should use it (dtype aside), else None."""
    mode = os.environ.get("EDGEPRISM_FUSED", "1")
    if mode == "0":
        return None
    if device.type != "cuda" and not (mode == "interpret" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return _module()
