"""The on-disk format of a refactored model (version 1).

A directory with two files:

- ``refactor.json``: the manifest — format name and version, the source checkpoint (absolute path,
  path relative to the artifact, fingerprint), groups G, method and solver settings, always-on /
  dropped groups, calibration provenance (file, sha256, tokens), solver objective against `random`.
- ``refactor.safetensors``: per MoE layer (in order) and expert: ``perm`` [L, E, I] int64 neuron
  order (group g = perm[g·Ig:(g+1)·Ig]), ``importance`` [L, E, G] static group importance,
  ``core`` [L, E, G, c] int64 positions of each group's core neurons inside the group,
  ``core_scale`` [L, E, G] group importance ÷ core importance, ``frequency`` [L, E, I].

The weights are not copied: the host store applies the permutation while it fills its arena
from the source checkpoint (`HostStore.fill(perms=...)`), which costs nothing at load time, while
a permuted copy would double the disk footprint of a 60 GB model. The source is found by its
relative path first (artifact and model moved together), then its absolute path, and must match
the recorded fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgeprism.cache.host_store import HostStore
from edgeprism.config import ModelSpec
from edgeprism.errors import ArtifactError
from edgeprism.moe.gate import UnitGate

FORMAT = "edgeprism-refactor"
VERSION = 1
MANIFEST = "refactor.json"
TENSORS = "refactor.safetensors"
_SAMPLE = 1 << 16  # bytes hashed at the start, middle and end of each shard's data


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def fingerprint(model_dir: Path) -> str:
    """sha256 of config.json and, per safetensors shard, its name, size, header and three 64 KiB
    samples of its data: catches a different or re-saved checkpoint without reading 60 GB."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for shard in sorted(model_dir.glob("*.safetensors")):
        size = shard.stat().st_size
        h.update(f"{shard.name}:{size}".encode())
        with shard.open("rb") as f:
            head = f.read(8)
            h.update(head)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(f.read(min(header_len, size)))
            for at in (8 + header_len, (8 + header_len + size) // 2, max(0, size - _SAMPLE)):
                f.seek(at)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(directory: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write both files into `directory` (the caller renames it into place when complete)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / TENSORS))
    body = {"format": FORMAT, "version": VERSION, **manifest}
    (directory / MANIFEST).write_text(json.dumps(body, indent=2) + "\n")


@dataclass(frozen=True)
class Refactored:
    """A loaded artifact: where its source checkpoint is and how to regroup and score its experts."""

    path: Path
    manifest: dict[str, Any]
    source: Path
    groups: int
    perm: torch.Tensor  # [L, E, I] int64
    importance: torch.Tensor  # [L, E, G]
    core: torch.Tensor  # [L, E, G, c] int64, positions inside the group
    core_scale: torch.Tensor  # [L, E, G]

    @property
    def always_on(self) -> bool:
        return bool(self.manifest["always_on"])

    @property
    def dropped(self) -> bool:
        return bool(self.manifest["dropped"])

    def perms(self, moe_layers: list[int]) -> dict[tuple[int, int], torch.Tensor]:
        """`HostStore.fill` permutations: (layer, expert) -> [I]."""
        return {(layer, e): self.perm[i, e] for i, layer in enumerate(moe_layers) for e in range(self.perm.shape[1])}

    @classmethod
    def open(cls, path: str | os.PathLike, check_source: bool = True) -> Refactored:
        path = Path(path)
        manifest = _read_manifest(path)
        try:
            t = load_file(str(path / TENSORS))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{path / TENSORS} is missing or corrupt ({e}); re-run `edgeprism refactor`.") from e
        missing = {"perm", "importance", "core", "core_scale"} - set(t)
        if missing:
            raise ArtifactError(f"{path / TENSORS} lacks tensors {sorted(missing)}; re-run `edgeprism refactor`.")
        source = _find_source(path, manifest, check_source)
        art = cls(path, manifest, source, int(manifest["groups"]), t["perm"].long(), t["importance"].float(),
                  t["core"].long(), t["core_scale"].float())
        return art

    def check_spec(self, spec: ModelSpec) -> None:
        want = (len(spec.moe_layers), spec.num_experts, spec.moe_intermediate)
        if tuple(self.perm.shape) != want or self.importance.shape[-1] != self.groups:
            raise ArtifactError(f"artifact {self.path} has perm shape {list(self.perm.shape)} but its source model "
                                f"needs {list(want)}; it was made for another model.")
        sorted_perm = self.perm.sort(dim=-1).values
        if not torch.equal(sorted_perm, torch.arange(spec.moe_intermediate).expand_as(sorted_perm)):
            raise ArtifactError(f"artifact {self.path}: a neuron order is not a permutation; the file is corrupt.")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path} has no {MANIFEST}: not a refactored model (make one with `edgeprism refactor`).") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path / MANIFEST} is not valid JSON ({e}); re-run `edgeprism refactor`.") from e
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path / MANIFEST} is not an edgeprism refactor manifest (format={manifest.get('format')!r}).")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{path} is refactor format version {manifest.get('version')}; this edgeprism reads "
                            f"version {VERSION}: re-run `edgeprism refactor` with this version.")
    return manifest


def _find_source(path: Path, manifest: dict[str, Any], check: bool) -> Path:
    src = manifest["source"]
    candidates = [(path / src["relpath"]).resolve(), Path(src["path"])]
    found = next((c for c in candidates if (c / "config.json").is_file()), None)
    if found is None:
        raise ArtifactError(f"the source checkpoint of {path} is at neither {candidates[0]} nor {candidates[1]}; "
                            f"put it back or edit source.path in {path / MANIFEST}.")
    if check and fingerprint(found) != src["fingerprint"]:
        raise ArtifactError(f"the checkpoint at {found} is not the one {path} was made from (fingerprint differs); "
                            "re-run `edgeprism refactor` on it.")
    return found


def build_gate(art: Refactored, store: HostStore, moe_layers: list[int], device: torch.device,
               dtype: torch.dtype) -> UnitGate:
    """The `score` gate of an artifact: core neurons' w1/w3 rows (taken from the already permuted
    host store) and their ||w2 column|| × core scale, on the compute device."""
    from edgeprism.refactor.calibrate import expert_units

    gi, D = store.group_inter, store.dim
    w13: dict[int, torch.Tensor] = {}
    w2n: dict[int, torch.Tensor] = {}
    importance: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(moe_layers):
        rows13, rows2 = [], []
        for e in range(store.num_experts):
            units13, units2 = expert_units(store, layer, e)  # [G, 2Ig, D], [G, D, Ig]
            for g in range(store.groups):
                pos = art.core[i, e, g]
                rows13.append(torch.stack((units13[g, pos], units13[g, gi + pos]), dim=1))  # [c, 2, D]
                rows2.append(units2[g][:, pos].norm(dim=0) * art.core_scale[i, e, g])  # [c]
        c = art.core.shape[-1]
        w13[layer] = torch.stack(rows13).view(store.num_experts, store.groups, c, 2, D).to(device, dtype)
        w2n[layer] = torch.stack(rows2).view(store.num_experts, store.groups, c).to(device)
        importance[layer] = art.importance[i].to(device)
    return UnitGate(store.groups, importance, w13, w2n, always_on=art.always_on, dropped=art.dropped)
