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

import torch

from edgeprism.models.decoder import Decoder
from edgeprism.moe.offload import OffloadedExperts
from edgeprism.runtime.graphs import DecodeStep


class DirectDecode:
    """`DecodeStep` over a `DirectCache`: one graph per token, cache upkeep between tokens."""

    def __init__(self, model: Decoder, experts: OffloadedExperts, device: torch.device, use_graphs: bool) -> None:
        assert experts.direct is not None
        self.share = experts.direct.cpu_share
        self._begin = self.share.begin if self.share is not None else None
        self.exact = DecodeStep(model, device, use_graphs, self._begin)
        self._lossy: DecodeStep | None = None  # graphs with the in-graph dropping of misses (floor < 1)
        self.model, self.device, self.experts, self.direct = model, device, experts, experts.direct

    @property
    def use_graphs(self) -> bool:
        return self.exact.use_graphs

    @property
    def step(self) -> DecodeStep:
        """The exact graphs, or (quality floor < 1) the ones that drop low-weighted misses."""
        if not self.direct.lossy:
            return self.exact
        if self._lossy is None:
            self._lossy = DecodeStep(self.model, self.device, self.exact.use_graphs, self._begin)
        return self._lossy

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits [1, V] of `token` at position `pos` (the KV cache holds positions < pos)."""
        d = self.direct
        d.before_step()
        share = self.share
        if share is None:
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
