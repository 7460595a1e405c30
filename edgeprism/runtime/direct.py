"""One decode token with zero-copy misses: the whole token is one CUDA graph.

With `schedule="direct"` no host decision sits between the MoE layers: each layer looks its units
up in a device-side map and the kernels read the uncached ones straight from pinned host RAM
(cache/direct.py). So the step is `DecodeStep`'s single graph per attention-length bucket,
bracketed by the cache's host work at the token boundary:

1. `before_step`: publish admissions whose copies have landed, send the map (the previous graph
   has finished: its logits were read).
2. replay the token's graph.
3. `after_step` for the previous token (its routing was copied to the host behind its graph):
   count hits and misses and admit hot missed units — host work that overlaps the graph now running.
4. `read_routing`: queue the copy of this token's routing behind its graph.

With a CPU share (`cpu_share=`, schedule/cpu_share.py) the graph also hands part of each layer's
misses to a CPU loop that runs alongside it; every run of the step (replay, or the warm-up run before
a capture) starts that loop first (`DecodeStep.before_run`).
"""

from __future__ import annotations

import time

import torch

from edgeprism.models.decoder import Decoder
from edgeprism.moe.offload import OffloadedExperts
from edgeprism.runtime.graphs import DecodeStep


class DirectDecode:
    """`DecodeStep` over a `DirectCache`: one graph per token, cache upkeep between tokens."""

    def __init__(self, model: Decoder, experts: OffloadedExperts, device: torch.device, use_graphs: bool) -> None:
        assert experts.direct is not None
        self.share = experts.direct.cpu_share
        self.exact = DecodeStep(model, device, use_graphs)
        self.model, self.device, self.experts, self.direct = model, device, experts, experts.direct
        # graphs by (drops misses under a floor < 1, carries the CPU share): captured on first use
        self._steps: dict[tuple[bool, bool], DecodeStep] = {(False, False): self.exact}
        self._last_start: float | None = None

    @property
    def use_graphs(self) -> bool:
        return self.exact.use_graphs

    @property
    def sharing(self) -> bool:
        """Whether the next step hands part of the misses to the CPU (a share above 0)."""
        return self.share is not None and self.share.frac_value > 0

    @property
    def step(self) -> DecodeStep:
        """The graphs for the current mode: exact or (quality floor < 1) dropping low-weighted
        misses, with or without the CPU share."""
        key = (self.direct.lossy, self.sharing)
        if key not in self._steps:
            begin = self.share.begin if key[1] else None
            self._steps[key] = DecodeStep(self.model, self.device, self.exact.use_graphs, begin)
        return self._steps[key]

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits [1, V] of `token` at position `pos` (the KV cache holds positions < pos)."""
        d = self.direct
        d.before_step()
        share = self.share
        if share is not None:
            now = time.perf_counter()
            if self._last_start is not None:
                share.observe_step(now - self._last_start)  # adaptive share: a local search on step times
            self._last_start = now
        if not self.sharing:
            if share is not None:
                share.finish()  # a loop of an earlier shared step (its graph has finished)
            out = self.step(token, pos)
        else:
            share.armed = True
            try:
                out = self.step(token, pos)
            except BaseException:
                share.abort()
                raise
            finally:
                share.armed = False
        # the previous token's routing, while this graph runs; its step on the clock every cache path
        # uses (the engine's forward-token count), so the policies see one timeline
        d.after_step(self.experts.step - 1)
        d.read_routing()
        return out
