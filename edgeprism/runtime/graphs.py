"""CUDA graphs of the one-token decode step.

At batch 1 a decode step is hundreds of small kernels and the host cannot launch them as fast as
the GPU runs them (measured: ~1 ms of launch work per OLMoE layer against ~0.3 ms of GPU work).
When every expert is resident the step has no host decision left in it, so it is captured once
per attention-length bucket and replayed. Offloaded runs decide fetches on the host every layer
and run the same `Decoder.decode` eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgeprism.models.decoder import Decoder

BUCKET = 256  # attention length grows in steps of this many positions (one graph per step)


class DecodeStep:
    """Runs `Decoder.decode` from device-side token/position buffers, replaying graphs when enabled."""

    def __init__(self, model: Decoder, device: torch.device, use_graphs: bool,
                 before_run: Callable[[], None] | None = None) -> None:
        self.model, self.device = model, device
        # called before every run that executes the step (eager, warm-up, replay), not before a capture
        self.before_run = before_run
        self.use_graphs = use_graphs and device.type == "cuda"
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # one warm-up and one capture stream for every bucket's graph (cuBLAS keeps a workspace
        # per stream, so a fresh stream per capture would leave memory behind each time)
        self.warmup_stream = torch.cuda.Stream(device) if self.use_graphs else None
        self.capture_stream = torch.cuda.Stream(device) if self.use_graphs else None

    def length(self, pos: int) -> int:
        return min(self.model.max_len, (pos // BUCKET + 1) * BUCKET)

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits [1, V] of `token` at position `pos` (the KV cache holds positions < pos)."""
        self.token.fill_(token)
        self.pos.fill_(pos)
        length = self.length(pos)
        if not self.use_graphs:
            self._before_run()
            return self.model.decode(self.token, self.pos, length)
        if length not in self.graphs:
            self.graphs[length] = self._capture(length)
        graph, out = self.graphs[length]
        self._before_run()
        graph.replay()
        return out

    def _before_run(self) -> None:
        if self.before_run is not None:
            self.before_run()

    def _capture(self, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream (as CUDA graph capture requires); it rewrites the KV entry at
        # `pos` with the very values the replay will write, so it changes nothing.
        side = self.warmup_stream
        self._before_run()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.model.decode(self.token, self.pos, length)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream):
            out = self.model.decode(self.token, self.pos, length)
        return graph, out
