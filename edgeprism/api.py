"""The front door: `load()` -> `Engine`, and one-call `generate()` / `stream()`.

An `Engine` is loaded once and reused: it owns the device weights, the pinned host store of
experts and the expert cache. Public calls are serialised by a lock so an app may call it from
several threads; a `stream` takes the lock per token, so an abandoned stream never blocks the
next call (it is superseded, and raises `GenerationInterrupted` if resumed). `generate`,
`TextStream.run` and `submit` hold the lock for the whole generation, so concurrent ones queue;
any stream can be cancelled from another thread (`streaming.py`).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from edgeprism.cache.host_store import HostStore
from edgeprism.cache.quant_store import QuantCache
from edgeprism.cache.vram_cache import ExpertCache
from edgeprism.config import EngineConfig
from edgeprism.errors import ConfigError, EngineClosedError, GenerationInterrupted, InputError, ModelNotFoundError
from edgeprism.models.checkpoint import Checkpoint, MemoryCheckpoint
from edgeprism.models.decoder import Decoder
from edgeprism.models.families import adapter_for
from edgeprism.models.tokenizer import Tokenizer, missing_tokenizer
from edgeprism.moe.gate import UnitGate
from edgeprism.moe.layer import MoEBlock
from edgeprism.moe.offload import OffloadedExperts
from edgeprism.moe.quant import make_format, triton_ready
from edgeprism.refactor.artifact import Refactored, build_gate, is_artifact
from edgeprism.prefetch.prefetcher import CudaCopies, InlineCopies, Prefetcher
from edgeprism.runtime.batched import BatchedGeneration, check_batch_args, stop_check, texts
from edgeprism.runtime.graphs import DecodeStep
from edgeprism.runtime.direct import DirectDecode
from edgeprism.schedule.cpu_share import CpuShare
from edgeprism.runtime.layerwise import LayerwiseDecode
from edgeprism.runtime.memory import GiB, BudgetPlan, free_device_bytes, plan_budget
from edgeprism.schedule.adaptive import AdaptiveCacheConfig
from edgeprism.schedule.cost import CostModel, for_store
from edgeprism.schedule.cpu_experts import CpuExperts
from edgeprism.schedule.misses import MissScheduler
from edgeprism.schedule.qos import FloorController, OperatingPoints, QosController
from edgeprism.sampling import Sampling, choose
from edgeprism.streaming import Generation, OnToken, TextStream, check_stops

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).parent / "default_model"
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
ADAPT_EVERY = 256  # decode tokens between re-solves of the adaptive cache shares


def resolve_model(model: str | os.PathLike | None) -> Path:
    if model is not None:
        return Path(model)
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ModelNotFoundError(f"no model given and the embedded default model is missing at {DEFAULT_MODEL}; "
                                 "pass model=PATH to a Hugging Face MoE checkpoint directory.")
    return DEFAULT_MODEL


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device={device!r} is not a device; use 'cuda', 'cuda:1' or 'cpu'.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu'.")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise InputError(f"dtype={dtype!r} is not supported; use 'bf16', 'fp16' or 'fp32'.")


RESIDENT = "every expert is resident"  # why the direct path has nothing to do (`Engine._direct_blocker`)
UNIT_BY_UNIT = "decode runs unit by unit (units exceed gather_limit)"


class Engine:
    """A loaded model ready to generate. Build it with `edgeprism.load()`."""

    def __init__(self, source: Checkpoint | MemoryCheckpoint, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, progress: Progress | None = None, refactored: Refactored | None = None,
                 cost: CostModel | None = None, recalibrate: bool = False) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        self.refactored = refactored  # a refactor artifact: neuron order and sub-expert gate data
        self.checkpoint, self.path = source, source.path
        self.spec = source.spec
        self.max_context = min(config.max_context, self.spec.max_position)
        if self.spec.moe_intermediate % config.groups:
            raise ConfigError(f"groups={config.groups} does not divide the expert intermediate size "
                              f"{self.spec.moe_intermediate}; pick a divisor so all sub-experts have equal size.")
        self.format = make_format(config.expert_dtype, self.spec.dim, self.spec.moe_intermediate // config.groups, dtype)
        self.plan = self._plan()
        log.info("%s", self.plan.describe())
        self.tokenizer_or_none = Tokenizer.from_dir(self.path) if self.path is not None else None
        self.store = self._host_store(progress)
        staging, reserved = self._staging_rows()
        self.cache = ExpertCache(self.store, self.plan.num_slots - staging - reserved, device, config.policy,
                                 extra_rows=staging)
        copies = CudaCopies(device) if device.type == "cuda" else InlineCopies()
        self.fetch = Prefetcher(self.cache, copies)
        self.experts = OffloadedExperts(self.cache, self.fetch, config.gather_limit)
        self._enable_direct()
        self.cost = self._cost_model(cost, recalibrate)
        self.sched = self._miss_scheduler(learn=cost is None)
        self.adaptive = self._adaptive_cache()
        self.model = self._build_decoder()
        self._direct_prefetch()
        self.gate = self._unit_gate()
        self.decode_step = self._decode_step()
        self.checkpoint.close()
        self._lock = threading.RLock()
        self._session = 0
        self._counts = {"tokens": 0, "prompt_tokens": 0, "forward_tokens": 0}

    # ---- loading -------------------------------------------------------------------------
    def _plan(self) -> BudgetPlan:
        vram = (int(self.config.vram_gb * GiB) if self.config.vram_gb is not None
                else free_device_bytes(self.device))
        return plan_budget(self.spec, elem=torch.empty((), dtype=self.dtype).element_size(),
                           groups=self.config.groups, max_context=self.max_context,
                           chunk=self.config.prefill_chunk, gather_limit=self.config.gather_limit,
                           vram_bytes=vram, cache_fraction=self.config.cache_fraction,
                           unit_bytes=self.format.unit_bytes)

    def _host_store(self, progress: Progress | None) -> HostStore:
        spec = self.spec
        store = HostStore(spec.moe_layers, spec.num_experts, self.config.groups, spec.dim, spec.moe_intermediate,
                          self.dtype, pin=self.config.pin_memory and self.device.type == "cuda", fmt=self.format,
                          pack_device=self.device if self.device.type == "cuda" else None)
        done = [0]

        def step(nbytes: int) -> None:
            done[0] += nbytes
            if progress is not None:
                progress(done[0], store.total_bytes)

        perms = self.refactored.perms(spec.moe_layers) if self.refactored is not None else None
        cache = QuantCache.for_store(store, self.path, self.refactored) if self.config.quant_cache else None
        if cache is None or not cache.load(store, progress=step):
            store.fill(self._read_expert, perms=perms, progress=step)
            if cache is not None:
                cache.save(store)
        return store

    def _unit_gate(self) -> UnitGate:
        """The sub-expert gate used when keep < 1: an artifact's core-neuron scorer, else uniform
        static shares (with G = 1: drop the lowest-weighted experts)."""
        spec = self.spec
        if self.refactored is not None:
            gate = build_gate(self.refactored, self.store, spec.moe_layers, self.device, self.dtype)
        else:
            flat = torch.ones(spec.num_experts, self.config.groups, device=self.device)
            gate = UnitGate(self.config.groups, {layer: flat for layer in spec.moe_layers})
        for block in self.model.layers:
            if isinstance(block.ffn, MoEBlock):
                block.ffn.unit_gate = gate
        return gate

    def _enable_direct(self) -> None:
        """schedule="direct": decode reads missed units from pinned host RAM inside its kernels."""
        if self.config.schedule != "direct":
            return
        blocker = self._direct_blocker()
        if blocker in (RESIDENT, UNIT_BY_UNIT):
            log.info("schedule='direct' has nothing to do: %s", blocker)
            return
        if self.device.type == "cuda" and not triton_ready():
            raise ConfigError("schedule='direct' needs Triton on a GPU (its kernels read host RAM); "
                              "install triton or use schedule='fetch'.")
        if blocker is not None:
            log.warning("schedule='direct': %s, so the GPU cannot read them in place; misses are fetched instead "
                        "(schedule='fetch')", blocker)
            return
        direct = self.experts.enable_direct(self.spec.top_k, admit_units=self.spec.top_k * self.config.groups)
        share = self.config.cpu_share
        if share is not None:
            direct.cpu_share = CpuShare(self.store, self.format, self.spec.top_k, self.device,
                                        frac=None if share is True else float(share), threads=self.config.cpu_threads)

    def _direct_blocker(self) -> str | None:
        """Why the direct path cannot run for this load (None: it can), from the plan and the host
        store, so it is known before the cache is built (prefetch's staging rows depend on it)."""
        cfg, plan = self.config, self.plan
        if plan.num_slots >= plan.total_units:  # the cache will be static (ExpertCache.preload_all)
            return RESIDENT
        if self.spec.top_k * cfg.groups * plan.unit_bytes > cfg.gather_limit:  # OffloadedExperts.can_gather
            return UNIT_BY_UNIT
        if self.device.type == "cuda" and not self.store.pinned:
            return "the experts could not be pinned"
        return None

    def _predict_experts(self) -> int:
        """Experts predicted per target layer: `predict_experts`, else top_k (layerwise) or 2
        (schedule="direct", whose staging copies only the best-ranked: bench/results/2026-11-24-h100-direct-prefetch/)."""
        default = min(2, self.spec.top_k) if self.config.schedule == "direct" else self.spec.top_k
        return min(self.spec.num_experts, self.config.predict_experts or default)

    def _stage_knobs(self) -> tuple[int, bool]:
        """Zero-copy prefetch's staging budget (units per layer; default one expert's G units) and
        where its copy forks (after the layer's experts, or `lookup`: beside them), from
        EDGEPRISM_STAGE_BUDGET / EDGEPRISM_STAGE_AFTER (tuning knobs, docs/architecture.md)."""
        raw = os.environ.get("EDGEPRISM_STAGE_BUDGET", "").strip()
        if raw and not raw.isdigit():
            raise ConfigError(f"EDGEPRISM_STAGE_BUDGET={raw!r}: must be a whole number of units staged per layer "
                              "(0 stages nothing); unset it for the default (one expert's units).")
        after = os.environ.get("EDGEPRISM_STAGE_AFTER", "experts").strip() or "experts"
        if after not in ("experts", "lookup"):
            raise ConfigError(f"EDGEPRISM_STAGE_AFTER={after!r}: must be 'experts' (the staging copy starts after "
                              "the layer's experts) or 'lookup' (beside them).")
        return (int(raw) if raw else self.config.groups), after == "experts"

    def _staging_rows(self) -> tuple[int, int]:
        """Zero-copy decode's prefetch: pool rows kept out of the cache for staging (two layers'
        predicted units: staging alternates by MoE-layer parity), and slots given up for its
        predictor matrices ([D, E] per MoE layer); (0, 0) when it will not run. Both come out of the
        planned slots, so the budget holds."""
        cfg, plan, spec = self.config, self.plan, self.spec
        if not (cfg.schedule == "direct" and cfg.prefetch) or self._direct_blocker() is not None:
            return 0, 0
        self._stage_knobs()  # a bad knob fails here, before anything is allocated
        if len(spec.moe_layers) < 2:
            log.info("prefetch=True has nothing to do: the model has one MoE layer")
            return 0, 0
        ahead = min(cfg.lookahead, len(spec.moe_layers) - 1)
        rows = (ahead + 1) * self._predict_experts() * cfg.groups
        elem = torch.empty((), dtype=self.dtype).element_size()
        predictors = (len(spec.moe_layers) - ahead) * spec.dim * spec.num_experts * elem
        reserved = -(-predictors // plan.unit_bytes)
        if plan.num_slots - rows - reserved < spec.top_k * cfg.groups:
            log.warning("prefetch=True is off: its %d staging rows and %d slots for predictors would leave the cache "
                        "fewer slots than one token's experts; raise vram_gb or lower predict_experts", rows, reserved)
            return 0, 0
        return rows, reserved

    def _direct_prefetch(self) -> None:
        """schedule="direct" with prefetch: each MoE layer predicts the next one's experts inside the
        graph (its router on this layer's input, the two norms' weights folded in) and stages the
        predicted units the cache lacks (cache/direct.py)."""
        direct = self.experts.direct
        if direct is None or self.cache.extra_rows == 0:
            return
        moe = self.spec.moe_layers
        ahead = min(self.config.lookahead, len(moe) - 1)
        predictors = {}
        with torch.no_grad():
            for layer, nxt in zip(moe, moe[ahead:]):
                cur_norm, nxt_block = self.model.layers[layer].ffn_norm, self.model.layers[nxt]
                # x = RMSNorm_l(h) = h / rms(h) · w_l, and the next router wants h / rms(h) · w_next:
                # gate_next(x · w_next / w_l) (where w_l = 0 the input carries nothing: ratio 0)
                w_cur = cur_norm.weight.float()
                ratio = torch.where(w_cur != 0, nxt_block.ffn_norm.weight.float() / w_cur, torch.zeros_like(w_cur))
                weight = nxt_block.ffn.gate.weight.float() * ratio[None, :]  # [E, D]
                predictors[layer] = (nxt, weight.t().contiguous().to(self.dtype))
        budget, after = self._stage_knobs()
        direct.enable_prefetch(predictors, self._predict_experts(), base=self.cache.num_slots,
                               budget=budget, after_experts=after, lookahead=ahead)

    def _cost_model(self, cost: CostModel | None, recalibrate: bool) -> CostModel | None:
        """This machine's prices (measured at first use and cached on disk, or `cost` as given), for
        the miss scheduler (`schedule` = "cpu" or "hybrid") and for sizing prefetches on a GPU. None
        when nothing uses them: every miss fetched without prefetch, nothing can miss (all experts
        resident), or decode goes unit by unit."""
        cfg = self.config
        if cfg.schedule == "direct" or (cfg.schedule == "fetch" and not (cfg.prefetch and self.device.type == "cuda")):
            return None
        if self.experts.slot_map is not None or not self.experts.can_gather(self.spec.top_k):
            log.info("schedule=%r / prefetch have nothing to do: %s", cfg.schedule, "every expert is resident"
                     if self.experts.slot_map is not None else "decode runs unit by unit (units exceed gather_limit)")
            return None
        if cost is None:
            cost = for_store(self.store, self.device, threads=cfg.cpu_threads, recalibrate=recalibrate)
        elif cost.unit_bytes != self.format.unit_bytes:
            raise ConfigError(f"the cost model prices units of {cost.unit_bytes} bytes but this model's units have "
                              f"{self.format.unit_bytes}; pass cost=None to measure it on this machine.")
        if self.device.type == "cuda":
            self.fetch.copy_cost = cost  # predicts when in-flight copies land
        return cost

    def _miss_scheduler(self, learn: bool) -> MissScheduler | None:
        """The decode-time scheduler of misses (`schedule` = "cpu" or "hybrid"); None = fetch them all.
        `learn`: reprice the CPU path from its measured calls (off when the caller gave the cost model)."""
        if self.config.schedule == "fetch" or self.cost is None:
            return None
        sched = MissScheduler(self.config.schedule, self.cost, CpuExperts(self.format, self.config.cpu_threads),
                              self.store, self.fetch, learn=learn)
        sched.set_units(self.spec.top_k * self.config.groups)  # a decode segment computes k·G unit slots
        return sched

    def _adaptive_cache(self) -> AdaptiveCacheConfig | None:
        """Per-layer cache quotas re-solved every `ADAPT_EVERY` decode tokens (opt-in: observing the
        routed units costs ~5 µs each on the host). Nothing to adapt when every expert is resident."""
        if not self.config.adaptive_cache or self.experts.slot_map is not None:
            return None
        miss_cost = self.cost.copy_unit_s if self.cost is not None else 1.0
        return AdaptiveCacheConfig(self.cache.table, self.spec.moe_layers, miss_cost=miss_cost,
                                   min_slots=self.spec.top_k * self.config.groups)

    def _decode_step(self) -> DecodeStep | LayerwiseDecode | DirectDecode:
        """All experts resident: one graph per token. Dynamic cache: graph segments per MoE layer,
        with prefetch. Units too large to gather: the plain eager step (unit by unit)."""
        cfg = self.config
        if self.experts.direct is not None:
            return DirectDecode(self.model, self.experts, self.device, cfg.cuda_graphs)
        if self.experts.slot_map is not None or not self.experts.can_gather(self.spec.top_k):
            return DecodeStep(self.model, self.device, cfg.cuda_graphs and self.experts.slot_map is not None)
        return LayerwiseDecode(self.model, self.experts, self.fetch, self.device, cfg.cuda_graphs,
                               lookahead=cfg.lookahead if cfg.prefetch else 0, predict_experts=cfg.predict_experts,
                               sched=self.sched, copy_unit_s=self._copy_unit_s(), host_parts=self._zero_copy_parts())

    def _zero_copy_parts(self) -> dict[int, Any] | None:
        """Views of the host arenas for the scheduled path's in-place reads (`zero_copy`); None where
        the GPU cannot read them (pageable memory, no Triton) or nothing is scheduled."""
        if self.sched is None or not self.config.zero_copy:
            return None
        if self.device.type == "cuda" and not (self.store.pinned and triton_ready()):
            log.info("zero_copy: the GPU cannot read the host arena in place (%s); misses are copied",
                     "not pinned" if not self.store.pinned else "no Triton")
            return None
        return {layer: self.store.parts(layer) for layer in self.store.layers}

    def _copy_unit_s(self) -> float | None:
        """One unit's copy time, which sizes prefetches: only where copies overlap compute (a GPU)."""
        return self.cost.copy_unit_s if self.cost is not None and self.device.type == "cuda" else None

    def _read_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ckpt, spec, ad = self.checkpoint, self.spec, adapter_for(self.spec)
        I, D = spec.moe_intermediate, spec.dim
        if not ckpt.has(ad.expert_name(layer, expert, 0)) and ckpt.has(ad.fused_expert_names(layer)[0]):
            gate_up_name, down_name = ad.fused_expert_names(layer)
            gate_up = ckpt.get(gate_up_name, (spec.num_experts, 2 * I, D))[expert]
            return gate_up[:I], gate_up[I:], ckpt.get(down_name, (spec.num_experts, D, I))[expert]
        shapes = ((I, D), (I, D), (D, I))
        return tuple(ckpt.get(ad.expert_name(layer, expert, w), shapes[w]) for w in range(3))  # type: ignore[return-value]

    def _build_decoder(self) -> Decoder:
        with torch.device("meta"):
            model = Decoder(self.spec, self.experts)
        ad = adapter_for(self.spec)
        state, shapes = {}, {name: tuple(p.shape) for name, p in model.state_dict().items()}
        fused_qkv = {}
        for i in range(len(model.layers)):
            # q, k and v projections in one device tensor (their parameters are views of it), so that
            # one-token decode runs one GEMV for the three (Attention.wqkv)
            for kind in ("weight", "bias"):
                names = [f"layers.{i}.attn.w{c}.{kind}" for c in "qkv"]
                if names[0] in shapes:
                    parts = [self._read_resident(ad, n, shapes[n], device="cpu") for n in names]
                    cat = torch.cat(parts).to(self.device)
                    state.update(zip(names, cat.split([p.shape[0] for p in parts]), strict=True))
                    fused_qkv[i, kind] = cat
        for name, shape in shapes.items():
            if name not in state:
                state[name] = self._read_resident(ad, name, shape)
        model.load_state_dict(state, assign=True, strict=True)
        for i, block in enumerate(model.layers):
            block.attn.wqkv = (fused_qkv[i, "weight"], fused_qkv.get((i, "bias")))
        model.setup_caches(self.max_context)
        return model.eval()

    def _read_resident(self, ad: Any, name: str, shape: tuple[int, ...], device: str | None = None) -> torch.Tensor:
        if name == "lm_head.weight" and self.spec.tie_embeddings:
            name = "embed.weight"
        if name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            hf = ad.hf_name(rest, int(layer))
        else:
            hf = ad.hf_name(name)
        return self.checkpoint.get(hf, shape).to(device=device or self.device, dtype=self.dtype)

    # ---- properties ----------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self.tokenizer_or_none is None:
            raise missing_tokenizer(self.path)
        return self.tokenizer_or_none

    @property
    def eos_ids(self) -> set[int]:
        ids = set(self.spec.eos_token_ids)
        if self.tokenizer_or_none is not None and self.tokenizer_or_none.eos_id is not None:
            ids.add(self.tokenizer_or_none.eos_id)
        return ids

    # ---- model calls ---------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True after `close()`: the weights and caches are gone."""
        return "model" not in self.__dict__

    def _require_open(self) -> None:
        if self.closed:
            raise EngineClosedError("this engine was closed (Engine.close()); load a new one with edgeprism.load().")

    def _check_ids(self, input_ids: Any) -> list[int]:
        self._require_open()
        if not isinstance(input_ids, (list, tuple)) or not all(isinstance(i, int) for i in input_ids):
            raise InputError("input_ids must be a list of ints.")
        if not input_ids:
            raise InputError("the prompt is empty: give at least one token.")
        if len(input_ids) >= self.max_context:
            raise InputError(f"the prompt has {len(input_ids)} tokens but the context window is {self.max_context}; "
                             "shorten the prompt or load with a larger max_context.")
        bad = [i for i in input_ids if not 0 <= i < self.spec.vocab_size]
        if bad:
            raise InputError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size}).")
        return list(input_ids)

    @torch.inference_mode()
    def _run(self, ids: list[int], start: int, last_only: bool, keep: float = 1.0) -> torch.Tensor:
        """Feed `ids` at positions start.. in prefill chunks; logits of every position or the last.

        keep < 1 runs eagerly through `Decoder.forward` (no CUDA graphs, no layerwise prefetch):
        the unit gate makes host decisions the graph-captured paths do not know about."""
        self._counts["forward_tokens"] += len(ids)
        self.experts.step = self._counts["forward_tokens"]
        self.gate.keep = keep
        if len(ids) == 1 and last_only and keep >= 1.0:
            if self.adaptive is not None and self._counts["forward_tokens"] % ADAPT_EVERY == 0:
                self.adaptive.update()
            return self.decode_step(ids[0], start)[-1]
        out: list[torch.Tensor] = []
        chunk = self.config.prefill_chunk
        for i in range(0, len(ids), chunk):
            piece = torch.tensor(ids[i:i + chunk], dtype=torch.long, device=self.device)
            logits = self.model(piece, start + i, last_only=last_only)  # [t, V] or [1, V]
            if not last_only:
                out.append(logits.float().cpu())
        return logits[-1] if last_only else torch.cat(out)

    def logits(self, input_ids: list[int], keep: float = 1.0) -> torch.Tensor:
        """[len(input_ids), vocab] float32 logits (CPU) of a fresh full-sequence forward."""
        ids, keep = self._check_ids(input_ids), check_keep(keep)
        with self._lock:
            self._session += 1
            return self._run(ids, 0, last_only=False, keep=keep)

    def _token_iter(self, ids: list[int], max_new_tokens: int, sampling: Sampling, keep: float = 1.0,
                    quality: float | None = None, latency_ms: float | None = None) -> Iterator[int]:
        """Check the arguments now (not at the first `next`), then return the token generator."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise InputError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer.")
        ids, keep, qos = self._check_ids(ids), check_keep(keep), self._qos(quality, latency_ms)
        return self._tokens(ids, max_new_tokens, sampling, keep, qos)

    def _qos(self, quality: float | None, latency_ms: float | None) -> QosController | FloorController | None:
        """The controller that sets the scheduler's quality floor and latency budget per token."""
        if quality is None and latency_ms is None:
            return None
        if self.config.schedule == "direct":
            if latency_ms is not None and quality is not None:
                raise InputError("give at most one of quality= and latency_ms=.")
            if self.experts.direct is None:
                return None  # nothing is read from the host: nothing to drop
            if latency_ms is not None:  # the per-token floor is the knob (no per-layer host step to budget)
                return FloorController(latency_ms=latency_ms, table=self.operating_points())
            return QosController(len(self.spec.moe_layers), quality=quality, table=self.operating_points())
        if self.config.schedule != "hybrid":
            raise InputError("quality= and latency_ms= trade quality for speed by dropping cache misses; load the "
                             "model with schedule='hybrid' (or 'direct').")
        if self.sched is None:
            return None  # nothing can miss (every expert resident): the fastest plan is already exact
        return QosController(len(self.spec.moe_layers), latency_ms=latency_ms, quality=quality,
                             table=self.operating_points())

    def operating_points(self) -> OperatingPoints | None:
        """The model's profiled quality/latency table for this budget (`edgeprism profile`), if any."""
        if self.path is None:
            return None
        path = OperatingPoints.default_path(self.path, self.config.vram_gb)
        if not path.is_file():
            return None
        return OperatingPoints.load(path)

    def _tokens(self, ids: list[int], max_new_tokens: int, sampling: Sampling, keep: float = 1.0,
                qos: QosController | FloorController | None = None) -> Iterator[int]:
        """Yield new token ids, taking the lock per token so a paused stream blocks no one."""
        gen, eos = sampling.generator(), self.eos_ids
        with self._lock:
            self._session += 1
            session = self._session
            logits = self._run(ids, 0, last_only=True, keep=keep)
            self._counts["prompt_tokens"] += len(ids)
        pos = len(ids)
        tok: int | None = None  # the token fed to the next step (None until the first is sampled)
        for _ in range(max_new_tokens):
            with self._lock:
                if self._session != session:
                    raise GenerationInterrupted("this stream was superseded by a newer call on the same engine; "
                                                "start a new stream.")
                if tok is not None:
                    if pos >= self.max_context:
                        log.warning("context window of %d tokens is full; stopping generation", self.max_context)
                        return
                    logits = self._step(tok, pos, keep, qos)
                    pos += 1
                tok = choose(logits, sampling, gen)
                self._counts["tokens"] += 1
            yield tok
            if tok in eos:
                return

    def _step(self, tok: int, pos: int, keep: float, qos: QosController | FloorController | None) -> torch.Tensor:
        """One decode step under this call's quality/latency settings; the controller sees its time."""
        sched, direct = self.sched, self.experts.direct
        if direct is not None:  # the floor of the in-graph dropping of misses (fixed, or a latency loop's)
            direct.set_floor(qos.targets()[0] if qos is not None else 1.0)
            share, latency = direct.cpu_share, qos is not None and qos.latency_s is not None
            if share is not None and latency:  # one controller at a time: the latency loop's floor, not the share's search
                share.hold()
            t0 = time.perf_counter()
            try:
                logits = self._run([tok], pos, last_only=True, keep=keep)
            finally:
                direct.set_floor(1.0)
                if share is not None:
                    share.held = False
            if qos is not None and qos.latency_s is not None:
                if logits.device.type == "cuda":
                    torch.cuda.current_stream(logits.device).synchronize()  # the step's time includes the GPU's
                qos.observe(time.perf_counter() - t0)
            return logits
        if sched is None:
            return self._run([tok], pos, last_only=True, keep=keep)
        sched.keep, sched.budget_s = qos.targets() if qos is not None else (1.0, None)
        t0, planned = time.perf_counter(), sched.stats.planned_s
        logits = self._run([tok], pos, last_only=True, keep=keep)
        if qos is not None:
            if logits.device.type == "cuda":
                torch.cuda.current_stream(logits.device).synchronize()  # the step's time includes the GPU's
            qos.observe(time.perf_counter() - t0, sched.stats.planned_s - planned)
        return logits

    def generate_ids(self, input_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int | None = None, keep: float = 1.0,
                     quality: float | None = None, latency_ms: float | None = None) -> list[int]:
        """New token ids only (the prompt is not repeated); stops at an end-of-sequence token.

        `keep` (here and in every generation call): fraction of the routed sub-experts' mass computed,
        in (0, 1]; 1 is exact, lower skips the least important sub-experts (fewer expert bytes per token).
        With `load(schedule="hybrid")` or `"direct"`, `quality` (in (0, 1]: perplexity ratio to the exact
        model, read from the profiled table of `edgeprism profile`, else used as the kept share of routed
        mass) lets decode drop the least important cache misses, and `latency_ms` instead holds the
        per-token latency near a target with the least quality loss (`schedule/qos.py`: a per-layer budget
        for "hybrid", the per-token floor for "direct"); give at most one."""
        sampling = Sampling(temperature, top_p, top_k, seed)
        with self._lock:
            return list(self._token_iter(input_ids, max_new_tokens, sampling, keep, quality, latency_ms))

    def generate_ids_batch(self, input_ids: list[list[int]], max_new_tokens: int | list[int] = 256,
                           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None, *,
                           latency_ms: float | None = None, max_batch: int = 8) -> list[list[int]]:
        """New token ids of several prompts decoded together, in input order (`runtime/batched.py`).

        The sequences of a step share its expert units (fewer bytes copied per token); finished ones
        leave and queued ones join, at most `max_batch` at once. With `latency_ms` the batch limit
        adapts so that the p95 time of a step (one token of every sequence) stays under it.
        `max_new_tokens` is one limit for all prompts or one per prompt. Each sequence gets what
        `generate_ids` gives it alone with the same arguments and seed (greedy: the same tokens, up
        to float rounding). Raises BudgetError if the sequences' KV caches cannot fit the budget."""
        limits = check_batch_args(input_ids, max_new_tokens, max_batch, latency_ms)
        prompts, sampling = [self._check_ids(ids) for ids in input_ids], Sampling(temperature, top_p, top_k, seed)
        with self._lock:
            self._session += 1
            return BatchedGeneration(self, self._counts, limits, sampling, max_batch=max_batch,
                                     latency_ms=latency_ms).run(prompts).outputs

    def generate_batch(self, prompts: list[str], *, max_new_tokens: int | list[int] = 256, temperature: float = 0.7,
                       top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                       stop: list[str] | str | None = None, latency_ms: float | None = None,
                       max_batch: int = 8) -> list[str]:
        """The continuations of several prompts decoded together (text-level `generate_ids_batch`);
        each one is cut as `generate` cuts it (end-of-sequence or before a stop string)."""
        limits = check_batch_args(prompts, max_new_tokens, max_batch, latency_ms)
        ids = [self._check_ids(self._prompt_ids(p, None)) for p in prompts]
        stops, sampling = check_stops(stop), Sampling(temperature, top_p, top_k, seed)
        with self._lock:
            self._session += 1
            outputs = BatchedGeneration(self, self._counts, limits, sampling, max_batch=max_batch,
                                        latency_ms=latency_ms, finished=stop_check(self.tokenizer, stops)).run(ids).outputs
        return texts(self.tokenizer, outputs, stops, self.eos_ids)

    def stream_ids(self, input_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, seed: int | None = None, keep: float = 1.0,
                   quality: float | None = None, latency_ms: float | None = None) -> Iterator[int]:
        """Yield new token ids one at a time (the id-level `stream`)."""
        return self._token_iter(input_ids, max_new_tokens, Sampling(temperature, top_p, top_k, seed), keep,
                                quality, latency_ms)

    def _prompt_ids(self, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InputError("give exactly one of prompt or messages.")
        tok = self.tokenizer
        text = tok.render_chat(messages) if messages is not None else prompt
        if not isinstance(text, str):
            raise InputError(f"prompt must be a string, got {type(text).__name__}.")
        if not text:
            raise InputError("the prompt is empty: give some text to continue.")
        return tok.encode(text)

    def count_tokens(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None) -> int:
        """Tokens the prompt (or the chat-templated `messages`) takes in the context window."""
        return len(self._prompt_ids(prompt, messages))

    def stream(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
               max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, stop: list[str] | str | None = None,
               on_token: OnToken | None = None, keep: float = 1.0, quality: float | None = None,
               latency_ms: float | None = None) -> TextStream:
        """Iterate the text pieces as they are decoded; arguments are checked here, before the first piece.

        The `TextStream` can be cancelled from any thread (`cancel()`), and tells why it ended
        (`finish_reason`) and how many tokens it used; `on_token(piece)` is called with each piece.
        """
        ids = self._prompt_ids(prompt, messages)
        tokens = self._token_iter(ids, max_new_tokens, Sampling(temperature, top_p, top_k, seed), keep, quality,
                                  latency_ms)
        return TextStream(tokens, self.tokenizer, stops=check_stops(stop), eos=self.eos_ids,
                          prompt_tokens=len(ids), lock=self._lock, on_token=on_token)

    def generate(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: list[str] | str | None = None,
                 on_token: OnToken | None = None, keep: float = 1.0, quality: float | None = None,
                 latency_ms: float | None = None) -> str:
        """The continuation of `prompt` (or the assistant's reply to `messages`) as text."""
        with self._lock:
            return self.stream(prompt, messages=messages, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed, stop=stop, on_token=on_token,
                               keep=keep, quality=quality, latency_ms=latency_ms).run().text

    def submit(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
               on_token: OnToken | None = None, on_done: Callable[[Generation], None] | None = None,
               **options: Any) -> Generation:
        """Generate on a background thread and return at once (for GUI event loops).

        `options` are those of `stream`. `on_token` and `on_done` run on the worker thread; the
        returned `Generation` has `cancel()`, `done()` and `result(timeout)` -> `Completion`.
        Arguments are checked here, so a bad call raises before any thread starts.
        """
        return Generation(self.stream(prompt, messages=messages, on_token=on_token, **options), on_done)

    # ---- stats and lifetime -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        self._require_open()
        table, spec = self.cache.table, self.spec
        routed = self._counts["forward_tokens"] * len(spec.moe_layers) * spec.top_k * self.config.groups
        dropped = int(self.gate.units_dropped)  # skipped by keep < 1: never copied nor computed
        direct = self.experts.direct
        if direct is not None:  # misses dropped under a quality floor (schedule="direct")
            dropped += direct.dropped
        hits, misses = table.hits, table.misses
        if self.experts.slot_map is not None:  # static cache: every computed unit is a hit (no counting on the hot path)
            hits += routed - dropped
        if self.sched is not None:  # units the scheduler kept off the cache were misses too (never resident)
            acts = self.sched.stats.actions
            dropped += acts["drop"]
            misses += acts["cpu"] + acts["drop"]
        # first: it folds in the last CPU loop, whose units `_zero_copy_units` leaves out
        share_stats = self._cpu_share_stats() if direct is not None and direct.cpu_share is not None else {}
        return {
            "units_computed": routed - dropped, "units_dropped": dropped,
            "expert_bytes_computed": (routed - dropped) * self.plan.unit_bytes,
            "hits": hits, "misses": misses, "evictions": table.evictions,
            "hit_rate": hits / max(1, hits + misses),
            "bytes_h2d": self.cache.bytes_h2d, "copies": self.cache.copies,
            "tokens": self._counts["tokens"], "prompt_tokens": self._counts["prompt_tokens"],
            "cache_slots": self.cache.num_slots, "cache_bytes": self.plan.cache,
            "resident_bytes": self.plan.resident, "kv_cache_bytes": self.plan.kv_cache,
            "unit_bytes": self.plan.unit_bytes, "total_units": self.plan.total_units,
            "expert_dtype": self.format.name,
            "host_pinned": self.store.pinned, "policy": self.config.policy, "groups": self.config.groups,
            "prefetch": (isinstance(self.decode_step, LayerwiseDecode) and self.decode_step.predictor is not None)
            or (direct is not None and direct.prefetching),
            **self.fetch.summary(),
            "prefetch_idle_skips": getattr(self.decode_step, "idle_skips", 0),
            "schedule": (self.config.schedule if self.sched is not None
                         else "direct" if self.experts.direct is not None else "fetch"),
            "zero_copy_bytes": self._zero_copy_units() * self.plan.unit_bytes,
            **({"units_drop": direct.dropped, "units_admitted": direct.admitted,
                "mass_kept": direct.mass_kept / direct.mass_routed if direct.mass_routed > 0 else None}
               if direct is not None else {}),
            **share_stats,
            **(self.sched.stats.as_dict() if self.sched is not None else {}),
            "adaptive_cache": self.adaptive.summary() if self.adaptive is not None else None,
        }

    def _cpu_share_stats(self) -> dict:
        share = self.experts.direct.cpu_share
        with self._lock:  # between tokens (a stream holds the lock per token), never mid-step
            share.finish()  # the last token's loop: its graph has finished (the caller has its logits)
            return share.summary(self.plan.unit_bytes)

    def _zero_copy_units(self) -> int:
        """Units the GPU read in place from host RAM (schedule="direct", or a plan's misses with zero_copy)."""
        direct = self.experts.direct
        if direct is not None:  # misses the kernels read: not those dropped, the CPU computed, or prefetch staged
            share = direct.cpu_share
            return max(0, direct.misses - direct.dropped - (share.units if share is not None else 0) - direct.staged_used)
        step = self.decode_step
        if isinstance(step, LayerwiseDecode) and step.host_parts is not None and self.sched is not None:
            return self.sched.stats.actions["fetch"]  # with zero_copy every planned fetch is read in place
        return 0

    def reset_stats(self) -> None:
        with self._lock:
            self.cache.table.reset_counters()
            self.cache.reset_copy_stats()
            self.fetch.reset_stats()
            if isinstance(self.decode_step, LayerwiseDecode):
                self.decode_step.idle_skips = 0
            self.gate.units_dropped = 0
            if self.sched is not None:
                self.sched.reset_stats()
            if self.experts.direct is not None:
                d = self.experts.direct
                d.hits = d.misses = d.admitted = d.dropped = d.staged_used = 0
                d.mass_kept = d.mass_routed = 0.0
                if d.cpu_share is not None:
                    d.cpu_share.finish()
                    d.cpu_share.reset_stats()
            self._counts = {"tokens": 0, "prompt_tokens": 0, "forward_tokens": 0}

    def close(self) -> None:
        """Free device memory and pinned RAM; the engine cannot be used afterwards."""
        with self._lock:
            self._session += 1
            if getattr(self, "sched", None) is not None:
                self.sched.close()
            direct = self.experts.direct if hasattr(self, "experts") else None
            if direct is not None and direct.cpu_share is not None:
                direct.cpu_share.close()
            for attr in ("decode_step", "model", "gate", "sched", "adaptive", "experts", "fetch", "cache", "store"):
                if hasattr(self, attr):
                    delattr(self, attr)
            if self.device.type == "cuda":
                gc.collect()  # graphs and streams can sit in reference cycles
                # cuBLAS keeps a workspace per stream it ran on (our copy, warm-up and capture
                # streams) until told otherwise; it is re-created on demand by the next user
                clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
                if clear is not None:
                    clear()
                torch.cuda.empty_cache()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_keep(keep: Any) -> float:
    """`keep` must be a number in (0, 1]: the fraction of routed sub-expert mass computed."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise InputError(f"keep={keep!r}: must be a number in (0, 1] (1 = exact, lower = fewer expert bytes).")
    return float(keep)


def load(model: str | os.PathLike | MemoryCheckpoint | None = None, vram_gb: float | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, *, policy: str = "lru", groups: int | None = None, max_context: int = 4096,
         prefill_chunk: int = 256, pin_memory: bool = True, cache_fraction: float | None = None,
         expert_dtype: str | torch.dtype | None = None,
         gather_limit: int = 256 * 2**20, cuda_graphs: bool = True, prefetch: bool = False, lookahead: int = 1,
         predict_experts: int | None = None, schedule: str = "fetch", cpu_threads: int | None = None,
         cost: CostModel | None = None, recalibrate: bool = False, adaptive_cache: bool = False,
         quant_cache: bool = True, zero_copy: bool = False, cpu_share: float | bool | None = None,
         progress: Progress | None = None) -> Engine:
    """Load a Hugging Face MoE checkpoint directory (None = the embedded default model), or an
    in-memory `MemoryCheckpoint`.

    `vram_gb` is everything the engine may allocate on the device (weights, KV cache for
    `max_context` tokens, workspace and expert cache); None uses what the device has free.
    `expert_dtype` is how routed experts are stored and moved: "bf16", "fp16", "fp32", or weight-only
    "int8" (per output channel) / "int4" (groups of 128 or 64) — 2-4x more units in the cache and
    2-4x fewer bytes per miss; None = `dtype`. Resident weights always use `dtype`. With
    `quant_cache` (default) the first int8/int4 load writes the quantized experts to a cache file
    (beside a refactored model, else under $EDGEPRISM_CACHE_DIR/quant) and later loads read it
    instead of quantizing again (`cache/quant_store.py`); False neither reads nor writes it.
    `model` may also be a refactored-model directory (`edgeprism refactor`): its source checkpoint
    is loaded with the artifact's neuron groups and sub-expert gate; `groups` then defaults to its G.
    With a dynamic cache (the experts do not all fit), `prefetch=True` predicts the experts of the
    next `lookahead` MoE layers from the current hidden state and copies `predict_experts` of them
    per layer (default: top_k; on a GPU no more than the copy engine can hide behind the layers before
    the target, from the machine's cost model — measured at the first load, cached) on a separate CUDA
    stream while the current layer computes. It is off
    by default: on every setup measured so far (bench/README.md) it moved tokens/s between −15% and +3%, because
    decode there was bound by per-layer overhead or by misses no predictor can foresee.
    `schedule` says what a decode step does with a unit that is not in the cache: "fetch" copies it
    in over PCIe; "cpu" computes it on the CPU from pinned RAM (`cpu_threads` threads, default CPUs − 1)
    while the GPU runs the cached ones; "hybrid" splits each layer's misses between the two from this
    machine's cost model (copy, CPU and GPU prices: measured at the first load and cached on disk
    under ~/.cache/edgeprism/cost, `recalibrate=True` measures again, `cost` gives one; a measured
    model's CPU price then follows the CPU calls' measured times in decode, a given one is kept as is), and lets
    generation calls trade quality for speed (`quality=`, `latency_ms=`). Prefill always fetches.
    "direct" keeps a device-side map of the cached units and lets the kernels read every other unit
    straight from pinned host RAM over PCIe (zero-copy, ~50 GB/s on an H100 box, as fast as a copy):
    a decode token is then one CUDA graph with no host step between layers, and hot misses are
    copied into the cache between tokens. With "direct", `prefetch=True` predicts the MoE layer
    `lookahead` ahead inside that graph and a side stream stages the best-ranked predicted experts the cache lacks
    (`predict_experts` predicted, default 2; one expert's units staged per layer) in pool rows taken
    from the cache; off by default, as it measured 0.96-1.01x (cache/direct.py). `cpu_share` (direct only) lets the CPU compute part of each
    layer's misses from the same pinned RAM inside that graph, while the GPU reads the rest: True adapts
    the share between tokens by a local search on measured step times (held while `latency_ms=` moves the
    floor), a number in [0, 1] fixes the fraction of the misses, None (default) is off
    (schedule/cpu_share.py; needs a C compiler).
    With "cpu"/"hybrid", `zero_copy=True` has the GPU read the
    misses the plan gives it in place too, and runs a layer's GPU units while the CPU computes its
    own; off by default, because units read in place never enter the cache, and with a skewed
    routing that cost ~20% against copying them in (bench/results/2026-11-23-h100-direct/).
    `adaptive_cache=True` gives each MoE layer a soft share of the expert cache, re-solved every 256
    decode tokens from the layers' measured LRU hit curves (MoEpic-style; schedule/adaptive.py).
    """
    if vram_gb is not None and (isinstance(vram_gb, bool) or not isinstance(vram_gb, (int, float))):
        raise InputError(f"vram_gb={vram_gb!r}: must be a number of GB or None.")
    refactored = None
    if not isinstance(model, MemoryCheckpoint) and model is not None and is_artifact(model):
        refactored = Refactored.open(model)
        if groups is not None and groups != refactored.groups:
            raise ConfigError(f"groups={groups} but the refactored model {model} has {refactored.groups} groups; "
                              "leave groups out (or refactor again with --groups).")
        groups, model = refactored.groups, refactored.source
    config = EngineConfig(vram_gb=vram_gb, policy=policy, groups=1 if groups is None else groups, max_context=max_context,
                          prefill_chunk=prefill_chunk, pin_memory=pin_memory, cache_fraction=cache_fraction,
                          expert_dtype=expert_dtype,
                          gather_limit=gather_limit, cuda_graphs=cuda_graphs, prefetch=prefetch,
                          lookahead=lookahead, predict_experts=predict_experts, schedule=schedule,
                          cpu_threads=cpu_threads, adaptive_cache=adaptive_cache, quant_cache=quant_cache,
                          zero_copy=zero_copy, cpu_share=cpu_share)
    dev = resolve_device(device)
    source = model if isinstance(model, MemoryCheckpoint) else Checkpoint(resolve_model(model))
    if refactored is not None:
        refactored.check_spec(source.spec)
    return Engine(source, config, dev, resolve_dtype(dtype, dev), progress, refactored, cost, recalibrate)


_engines: dict[tuple[str, float | None], Engine] = {}
_engines_lock = threading.Lock()


def _cached_engine(model: str | os.PathLike | None, vram_gb: float | None) -> Engine:
    """One engine per (model, budget); loading another closes the previous one to free its memory."""
    key = (str(resolve_model(model).resolve()), vram_gb)
    with _engines_lock:
        if key not in _engines:
            for old in _engines.values():
                old.close()
            _engines.clear()
            _engines[key] = load(model, vram_gb=vram_gb)
        return _engines[key]


def generate(prompt: str, model: str | os.PathLike | None = None, vram_gb: float | None = None,
             **sampling: Any) -> str:
    """Load (cached per model and budget) and generate a continuation of `prompt`."""
    return _cached_engine(model, vram_gb).generate(prompt, **sampling)


def stream(prompt: str, model: str | os.PathLike | None = None, vram_gb: float | None = None,
           **sampling: Any) -> Iterator[str]:
    """Like `generate`, yielding text pieces as they are decoded."""
    return _cached_engine(model, vram_gb).stream(prompt, **sampling)


__all__ = ["DEFAULT_MODEL", "Engine", "load", "generate", "stream"]
