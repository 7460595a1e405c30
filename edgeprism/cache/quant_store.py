"""A disk cache of quantized host arenas, so that only the first int8/int4 load quantizes.

Loading with ``expert_dtype="int8"|"int4"`` packs every expert unit at load time
(`HostStore.fill`): minutes on a CPU for a 30B model. After that first load the arenas are written
to one file, and later loads read them straight into the (pinned) store — a sequential read at disk
speed, no checkpoint decode and no quantizer.

One file per (format, groups): ``quant-<format>[-g<group size>]-G<groups>.bin``, inside a refactor
artifact's directory when the model is one (its neuron order is part of what was quantized), else
under ``$EDGEPRISM_CACHE_DIR/quant/<source fingerprint>/`` (`default_cache_dir`'s conventions). The
file is an 8-byte little-endian header length, a JSON header, padding to 4 KiB, then each MoE
layer's arena in `HostStore.layers` order. The header records what the bytes depend on: unit
format and shapes, the artifact's neuron permutation, the source checkpoint's fingerprint
(`refactor.artifact.fingerprint`: config.json, shard names, sizes, headers and data samples) and a
digest of the quantizer's source (`moe/quant.py`), so a changed checkpoint, artifact or quantizer
is never served stale bytes. A header that differs, or a file of the wrong size, is ignored with a
log line and rewritten by the load that follows. Writes go to a temporary file renamed into place,
so a crash or an exception never leaves a partial cache under the real name. Not detected: bytes
flipped inside a file of the right size (no checksum: hashing would cost as much as reading).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgeprism.cache.host_store import HostStore
from edgeprism.moe import quant
from edgeprism.refactor.artifact import Refactored, fingerprint
from edgeprism.schedule.cost import default_cache_dir

log = logging.getLogger(__name__)

FORMAT, VERSION = "edgeprism-quant-arenas", 1
ALIGN = 4096  # the arenas start on a page boundary (direct reads, mmap)
_CHUNK = 256 << 20  # bytes read or written per call: progress reports, and no multi-GiB single syscall


def quantizer_digest() -> str:
    """Digest of `moe/quant.py`: a change to packing or rounding invalidates every cache."""
    return hashlib.sha256(Path(quant.__file__).read_bytes()).hexdigest()[:16]


def expected_header(store: HostStore, source: Path, refactored: Refactored | None) -> dict[str, Any]:
    """What a cache file for `store`, filled from `source` (through `refactored`'s order), must record."""
    fmt = store.format
    perm = None
    if refactored is not None:
        perm = hashlib.sha256(refactored.perm.contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"format": FORMAT, "version": VERSION, "unit_format": fmt.name,
            "group_size": getattr(fmt, "group_size", 0), "dim": fmt.dim, "group_inter": fmt.group_inter,
            "groups": store.groups, "num_experts": store.num_experts, "layers": store.layers,
            "unit_bytes": store.unit_bytes, "perm": perm, "source": fingerprint(source),
            "quantizer": quantizer_digest()}


class QuantCache:
    """The cache file of one store: `load` it into the store, or `save` the store into it."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path, self.header = path, header

    @classmethod
    def for_store(cls, store: HostStore, source: Path | None, refactored: Refactored | None = None,
                  root: Path | None = None) -> QuantCache | None:
        """The cache of a quantized store filled from checkpoint directory `source`; None where there
        is nothing to cache (dense units, or an in-memory checkpoint with no directory)."""
        if not store.format.quantized or source is None:
            return None
        header = expected_header(store, Path(source), refactored)
        gs = f"-g{header['group_size']}" if header["group_size"] else ""
        name = f"quant-{header['unit_format']}{gs}-G{store.groups}.bin"
        if refactored is not None:
            return cls(refactored.path / name, header)
        base = Path(root) if root is not None else default_cache_dir().parent / "quant"
        return cls(base / header["source"][:16] / name, header)

    def load(self, store: HostStore, progress: Callable[[int], None] | None = None) -> bool:
        """Read the arenas into `store`; False (after a log line) if the file is missing, stale or
        truncated — the caller then quantizes and `save`s."""
        try:
            with self.path.open("rb") as f:
                start = self._check(f, store)
                if start is None:
                    return False
                f.seek(start)
                for layer in store.layers:
                    _read_exact(f, store.arenas[layer], progress)
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            log.warning("quantized-expert cache %s is unreadable (%s); quantizing again", self.path, e)
            return False
        log.info("read quantized experts from %s", self.path)
        return True

    def _check(self, f: Any, store: HostStore) -> int | None:
        """Byte offset of the arenas if the file's header and size match, else None (logged)."""
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("no header")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(min(n, 1 << 20)))
        if header != self.header:
            diff = sorted(k for k in self.header.keys() | header.keys() if header.get(k) != self.header.get(k))
            log.info("quantized-expert cache %s is stale (%s differ); quantizing again", self.path, ", ".join(diff))
            return None
        start = _data_offset(n)
        size = os.fstat(f.fileno()).st_size
        if size != start + store.total_bytes:
            log.warning("quantized-expert cache %s has %d bytes, expected %d (truncated?); quantizing again",
                        self.path, size, start + store.total_bytes)
            return None
        return start

    def save(self, store: HostStore) -> bool:
        """Write `store`'s arenas to the cache (temporary file + rename). A failure to write (disk
        full, read-only directory) is logged and returns False: the cache only saves time."""
        blob = json.dumps(self.header).encode()
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.path.parent).free
            if free < store.total_bytes + (1 << 30):
                log.warning("not caching quantized experts in %s: %.1f GiB free, %.1f GiB needed",
                            self.path.parent, free / 2**30, store.total_bytes / 2**30)
                return False
            with tmp.open("wb") as f:
                f.write(struct.pack("<Q", len(blob)) + blob)
                f.write(b"\0" * (_data_offset(len(blob)) - 8 - len(blob)))
                for layer in store.layers:
                    _write_all(f, store.arenas[layer])
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
        except OSError as e:
            log.warning("could not write the quantized-expert cache %s (%s); the next load quantizes again",
                        self.path, e)
            return False
        finally:
            tmp.unlink(missing_ok=True)  # only there if the write failed or was interrupted
        log.info("wrote quantized experts to %s (%.2f GiB)", self.path, store.total_bytes / 2**30)
        return True


def _data_offset(header_len: int) -> int:
    return -(-(8 + header_len) // ALIGN) * ALIGN


def _flat_bytes(arena: torch.Tensor) -> memoryview:
    return memoryview(arena.view(-1).numpy()).cast("B")  # the arena's own memory, no copy


def _read_exact(f: Any, arena: torch.Tensor, progress: Callable[[int], None] | None) -> None:
    view = _flat_bytes(arena)
    for at in range(0, len(view), _CHUNK):
        part = view[at:at + _CHUNK]
        got = 0
        while got < len(part):
            n = f.readinto(part[got:])
            if not n:
                raise ValueError("file ended early")
            got += n
        if progress is not None:
            progress(len(part))


def _write_all(f: Any, arena: torch.Tensor) -> None:
    view = _flat_bytes(arena)
    for at in range(0, len(view), _CHUNK):
        f.write(view[at:at + _CHUNK])
