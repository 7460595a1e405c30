"""`refactor()`: checkpoint + calibration text -> a refactored-model artifact directory.

Everything that can be checked before the slow part is (model supported, G valid, calibration
file readable, output location writable); the artifact is written into a temporary directory next
to `out` and renamed into place only when complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprism.errors import InputError, OutputError
from edgeprism.models.checkpoint import Checkpoint
from edgeprism.refactor import artifact
from edgeprism.refactor.calibrate import LayerStats, calibrate, calibration_ids
from edgeprism.refactor.partition import (
    METHODS,
    NeuronStats,
    Partition,
    check_groups,
    partition,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (experts done, experts total)


@dataclass(frozen=True)
class RefactorOptions:
    groups: int
    method: str = "anneal"
    seed: int = 0
    iters: int = 20000  # solver swap proposals per expert (deterministic budget)
    budget_s: float | None = None  # wall-clock cap for the whole solve (stops early, recorded)
    always_on: bool = False
    dropped: bool = False
    split: float = 0.5  # topbottom: top segment fraction (MoEpic)
    core: int = 4  # core neurons per group for the score gate
    calib_tokens: int = 16384
    window: int = 256


def refactor(model_dir: str | os.PathLike, out: str | os.PathLike, options: RefactorOptions,
             calib: str | os.PathLike | None = None, device: str | None = "cpu",
             progress: Progress | None = None) -> Path:
    """Calibrate, partition every expert, write the artifact at `out`; returns `out`."""
    from edgeprism.api import load  # the engine runs the calibration text

    out = Path(out)
    _check_options(options)
    _check_out(out)
    if artifact.is_artifact(model_dir):
        raise InputError(f"{model_dir} is already a refactored model; refactor its source checkpoint instead.")
    spec = Checkpoint(model_dir).spec  # a missing or unsupported model fails here, before any work
    check_groups(spec.moe_intermediate, options.groups)
    if calib is not None and not Path(calib).is_file():
        raise InputError(f"calibration file {str(calib)!r} does not exist; pass a UTF-8 text file "
                         "(or leave --calib out to use the built-in text).")
    engine = load(model_dir, device=device, dtype="fp32", groups=1)
    try:
        eos = spec.eos_token_ids[0] if spec.eos_token_ids else None
        ids = calibration_ids(engine.tokenizer, Path(calib) if calib is not None else None, options.calib_tokens, eos)
        layers = calibrate(engine, ids, window=options.window, seed=options.seed)
        tensors, solver = solve_layers(layers, spec.num_experts, len(spec.moe_layers), options, progress)
        return write_artifact(out, Path(engine.path), options, calib, len(ids), tensors, solver)
    finally:
        engine.close()


def write_artifact(out: Path, source: Path, options: RefactorOptions, calib: str | os.PathLike | None,
                   calib_tokens: int, tensors: dict[str, torch.Tensor], solver: dict[str, Any]) -> Path:
    """Write into a temporary directory next to `out`, then rename it into place (all or nothing)."""
    _check_out(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        artifact.write(tmp, _manifest(source, out, options, calib, calib_tokens, solver), tensors)
        if out.exists():
            raise OutputError(f"{out} appeared while refactoring; remove it or choose another --out.")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_options(o: RefactorOptions) -> None:
    if o.method not in METHODS:
        raise InputError(f"method={o.method!r}: use one of {', '.join(METHODS)}.")
    if o.iters < 0 or o.core < 1 or o.calib_tokens < 64 or not 0 < o.split < 1:
        raise InputError("need iters ≥ 0, core ≥ 1, calib_tokens ≥ 64 and 0 < split < 1.")
    if o.budget_s is not None and o.budget_s <= 0:
        raise InputError(f"budget_s={o.budget_s}: must be positive seconds.")


def _check_out(out: Path) -> None:
    if out.exists():
        raise OutputError(f"{out} already exists; remove it or choose another --out (nothing was written).")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"the parent directory {parent} of --out does not exist; create it first.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {parent} (permission denied); choose a writable --out.")


def solve_layers(layers: Iterable[LayerStats], num_experts: int, num_layers: int, o: RefactorOptions,
                 progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Partition every expert of every layer's statistics: the artifact's tensors and a solver summary."""
    total, done = num_experts * num_layers, 0
    start = time.monotonic()
    results: list[list[tuple[Partition, NeuronStats, float]]] = []
    for layer_stats in layers:
        row = []
        for e in range(num_experts):
            stats = layer_stats.expert(e)
            budget = None
            if o.budget_s is not None:
                budget = max(0.0, o.budget_s - (time.monotonic() - start)) / (total - done)
            seed = o.seed * 1_000_003 + layer_stats.layer * 1009 + e
            part = partition(stats, o.groups, o.method, seed=seed, iters=o.iters, budget_s=budget,
                             always_on=o.always_on, dropped=o.dropped, split=o.split)
            rand = partition(stats, o.groups, "random", seed=seed)
            row.append((part, stats, rand.objective))
            done += 1
            if progress is not None:
                progress(done, total)
        results.append(row)
    return _tensors(results, o), _solver_summary(results, o, time.monotonic() - start)


def core_neurons(stats: NeuronStats, members: np.ndarray, count: int) -> np.ndarray:
    """Positions (inside the group) of its `count` most co-activated members."""
    within = stats.coact[np.ix_(members, members)].sum(1)
    return np.argsort(-within, kind="stable")[:count]


def _tensors(results: list[list[tuple[Partition, NeuronStats, float]]], o: RefactorOptions) -> dict[str, torch.Tensor]:
    perm, imp, core, scale, freq = [], [], [], [], []
    for row in results:
        for part, stats, _ in row:
            size = len(part.perm) // o.groups
            groups = part.perm.reshape(o.groups, size)
            cores = np.stack([core_neurons(stats, g, min(o.core, size)) for g in groups])  # [G, c]
            core_imp = np.array([stats.importance[g[c]].sum() for g, c in zip(groups, cores)])
            perm.append(part.perm)
            imp.append(part.importance)
            core.append(cores)
            scale.append(part.importance / np.maximum(core_imp, 1e-30))
            freq.append(stats.frequency)
    L, E = len(results), len(results[0])

    def t(xs: list[np.ndarray], dt: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.stack(xs)).to(dt)

    return {"perm": t(perm, torch.int64).view(L, E, -1), "importance": t(imp, torch.float32).view(L, E, -1),
            "core": t(core, torch.int64).view(L, E, o.groups, -1), "core_scale": t(scale, torch.float32).view(L, E, -1),
            "frequency": t(freq, torch.float32).view(L, E, -1),
            "objective": torch.tensor([[p.objective for p, _, _ in row] for row in results], dtype=torch.float64),
            "random_objective": torch.tensor([[r for _, _, r in row] for row in results], dtype=torch.float64)}


def _solver_summary(results: list[list[tuple[Partition, NeuronStats, float]]], o: RefactorOptions,
                    seconds: float) -> dict[str, Any]:
    parts = [p for row in results for p, _, _ in row]
    obj = sum(p.objective for p in parts)
    rand = sum(r for row in results for _, _, r in row)
    return {"objective": obj, "random_objective": rand, "gain_over_random": obj / rand if rand else None,
            "iterations": sum(p.iterations for p in parts), "iterations_budget": o.iters * len(parts),
            "stopped_by_time": any(p.iterations < o.iters for p in parts) and o.method in ("anneal", "genetic"),
            "seconds": round(seconds, 2)}


def _manifest(source: Path, out: Path, o: RefactorOptions, calib: str | os.PathLike | None, calib_tokens: int,
              solver: dict[str, Any]) -> dict[str, Any]:
    from edgeprism import __version__
    from edgeprism.corpus import CALIB

    calib_path = Path(calib) if calib is not None else CALIB
    source = source.resolve()
    return {
        "source": {"path": str(source), "relpath": os.path.relpath(source, out.resolve()),
                   "fingerprint": artifact.fingerprint(source)},
        "groups": o.groups, "method": o.method, "always_on": o.always_on, "dropped": o.dropped,
        "options": asdict(o),
        "calibration": {"file": "builtin:calib.txt" if calib is None else str(calib_path.resolve()),
                        "sha256": artifact.file_sha256(calib_path), "tokens": calib_tokens, "window": o.window},
        "solver": solver,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "edgeprism_version": __version__,
    }

