"""Lazy access to a Hugging Face checkpoint directory.

Tensors are read one at a time through safetensors' memory map, so loading never holds the model
twice in RAM: each tensor goes straight from the file into its final home (device parameter or
host-store arena) and the mapped pages can be dropped.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from edgeprism.config import ModelSpec
from edgeprism.errors import CheckpointError, ModelNotFoundError


class Checkpoint:
    """A model directory: its spec and a name -> shard index over its safetensors files."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelNotFoundError(f"model directory {str(self.path)!r} does not exist (or is not a directory); "
                                     "pass the folder that holds config.json and the *.safetensors files.")
        if not (self.path / "config.json").is_file():
            raise ModelNotFoundError(f"{self.path} has no config.json; pass a Hugging Face model directory.")
        self.spec = ModelSpec.from_json(self.path / "config.json")
        self._handles: dict[str, Any] = {}  # shard filename -> open safetensors handle (memory map)
        self._where = self._index()

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-save the checkpoint.") from e
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise ModelNotFoundError(f"{self.path} has neither model.safetensors nor model.safetensors.index.json; "
                                     "edgeprism reads safetensors checkpoints only (re-save with safe_serialization).")
        return {name: "model.safetensors" for name in self._open("model.safetensors").keys()}

    def _open(self, filename: str) -> Any:
        handle = self._handles.get(filename)
        if handle is not None:
            return handle
        file = self.path / filename
        if not file.is_file():
            raise CheckpointError(f"shard {file} named by the index is missing; re-download the checkpoint.")
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is corrupt or truncated ({e}); re-download or re-save it.") from e
        self._handles[filename] = handle
        return handle

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._shard(name)).get_slice(name).get_shape())

    def _shard(self, name: str) -> str:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.path}; "
                                  "the files do not match config.json (re-download or re-save).") from None

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one tensor (memory-mapped), checking its shape when one is expected."""
        handle = self._open(self._shard(name))
        if shape is not None:
            found = tuple(handle.get_slice(name).get_shape())
            if found != tuple(shape):
                raise CheckpointError(f"tensor {name!r} has shape {list(found)} but config.json implies "
                                      f"{list(shape)}; the weights do not match the config.")
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path} ({e}); the file is corrupt.") from e

    def close(self) -> None:
        self._handles.clear()


SYNTHETIC_POOL = 1 << 24  # random values shared by every synthetic tensor


class MemoryCheckpoint:
    """A checkpoint held in memory: a config dict and HF-named tensors (e.g. a transformers model's
    `state_dict()`), or random tensors made on demand when `tensors` is None (benchmarks of real
    geometries without writing tens of GB to disk). Same interface as `Checkpoint`."""

    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, seed: int = 0,
                 std: float = 0.02) -> None:
        self.path: Path | None = None
        self.spec = ModelSpec.from_dict(config, source="in-memory config")
        self._tensors, self._seed, self._std = tensors, seed, std
        self._pool: torch.Tensor | None = None

    def has(self, name: str) -> bool:
        if self._tensors is not None:
            return name in self._tensors
        return ".experts." in name and not name.endswith(("gate_up_proj", "down_proj"))  # per-expert layout

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if self._tensors is None:
            return self._random(name, shape)
        if name not in self._tensors:
            raise CheckpointError(f"tensor {name!r} is missing from the in-memory checkpoint.")
        t = self._tensors[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}.")
        return t

    def _random(self, name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        """Gaussian values cut from one 32 MB random pool at a name-dependent offset: drawing tens of
        GB of fresh random numbers would dominate benchmark set-up, and repeats do not matter there."""
        if shape is None:
            raise CheckpointError(f"a synthetic checkpoint needs the shape of {name!r}.")
        if "norm" in name:
            return torch.ones(shape)
        if self._pool is None:
            gen = torch.Generator().manual_seed(self._seed)
            self._pool = torch.randn(SYNTHETIC_POOL, generator=gen).to(torch.bfloat16) * self._std
        n = math.prod(shape)
        start = zlib.crc32(name.encode()) % SYNTHETIC_POOL
        reps = (start + n + SYNTHETIC_POOL - 1) // SYNTHETIC_POOL
        flat = self._pool.repeat(reps) if reps > 1 else self._pool
        return flat[start:start + n].view(shape)

    def close(self) -> None:
        """Nothing to release: the tensors belong to the caller."""
