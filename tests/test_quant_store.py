"""The quantized-expert disk cache: a second int8/int4 load reads it instead of quantizing, with
bit-identical results; a stale or truncated cache is ignored and rewritten; a failed write leaves
nothing behind."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from conftest import Variant, build_checkpoint

import edgeprism
import edgeprism.cache.quant_store as qs
from edgeprism.cache.host_store import HostStore
from edgeprism.cache.quant_store import QuantCache
from edgeprism.models.checkpoint import Checkpoint
from edgeprism.moe.quant import make_format
from edgeprism.refactor.artifact import Refactored

# hidden and expert width 128: int4 groups of 64 divide the units of G = 2
SHAPE = Variant("qwen3moe-int4", "qwen3_moe", {
    "hidden_size": 128, "intermediate_size": 64, "moe_intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "num_hidden_layers": 2})
IDS = [3, 17, 5, 99, 42, 7, 1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(SHAPE, tmp_path_factory.mktemp("qstore") / "m")


@pytest.fixture(autouse=True)
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEPRISM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "quant"


def load_logits(model: Path, expert_dtype: str, **kw: object) -> torch.Tensor:
    engine = edgeprism.load(model, device="cpu", dtype="fp32", expert_dtype=expert_dtype, groups=2, **kw)
    try:
        return engine.logits(IDS)
    finally:
        engine.close()


def no_quantizing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the experts were quantized again")

    monkeypatch.setattr(HostStore, "fill_expert", boom)


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
def test_second_load_reads_the_cache(model: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch,
                                     expert_dtype: str) -> None:
    first = load_logits(model, expert_dtype)
    files = cache_files(cache_root)
    assert [f.name for f in files] == [f"quant-{expert_dtype}{'-g64' if expert_dtype == 'int4' else ''}-G2.bin"]
    with monkeypatch.context() as m:
        no_quantizing(m)
        second = load_logits(model, expert_dtype)
    assert torch.equal(first, second)
    with monkeypatch.context() as m:  # quant_cache=False neither reads nor writes the cache
        no_quantizing(m)
        with pytest.raises(AssertionError, match="quantized again"):
            load_logits(model, expert_dtype, quant_cache=False)


def test_dense_units_and_other_formats_are_separate(model: Path, cache_root: Path) -> None:
    load_logits(model, "bf16")
    assert cache_files(cache_root) == []  # nothing to save for dense units
    load_logits(model, "int8")
    load_logits(model, "int4")
    assert [f.name for f in cache_files(cache_root)] == ["quant-int4-g64-G2.bin", "quant-int8-G2.bin"]


def rewrite_header(path: Path, **changes: object) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = {**json.loads(data[8:8 + n]), **changes}
    blob = json.dumps(header).encode()
    assert len(blob) <= n  # fits in place (JSON may end in spaces)
    path.write_bytes(data[:8] + blob + b" " * (n - len(blob)) + data[8 + n:])


@pytest.mark.parametrize("damage", ["header", "truncated", "empty"])
def test_a_stale_or_broken_cache_is_ignored_and_rewritten(model: Path, cache_root: Path, damage: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    first = load_logits(model, "int8")
    (path,) = cache_files(cache_root)
    good = path.read_bytes()
    if damage == "header":
        rewrite_header(path, quantizer="0" * 16)  # as if moe/quant.py had changed
    elif damage == "truncated":
        path.write_bytes(good[:-100])
    else:
        path.write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="edgeprism.cache.quant_store"):
        again = load_logits(model, "int8")
    assert ("quantizer differ" if damage == "header" else "quantizing again") in caplog.text
    assert torch.equal(first, again)
    assert path.read_bytes() == good  # rewritten


def test_a_changed_checkpoint_gets_its_own_cache(model: Path, cache_root: Path, tmp_path: Path) -> None:
    other = build_checkpoint(SHAPE, tmp_path / "other", seed=1)
    load_logits(model, "int8")
    load_logits(other, "int8")
    dirs = {f.parent.name for f in cache_files(cache_root)}
    assert len(dirs) == 2  # keyed by each checkpoint's fingerprint


def test_an_interrupted_write_leaves_nothing(model: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_midway(f: object, arena: torch.Tensor) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(qs, "_write_all", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        load_logits(model, "int8")
    assert cache_files(cache_root) == []  # no temporary file, no half cache under the real name
    monkeypatch.undo()
    monkeypatch.setenv("EDGEPRISM_CACHE_DIR", str(cache_root.parent))
    load_logits(model, "int8")
    assert len(cache_files(cache_root)) == 1


def test_cache_location(model: Path, tmp_path: Path) -> None:
    spec = Checkpoint(model).spec
    fmt = make_format("int4", spec.dim, spec.moe_intermediate // 2, torch.float32)
    store = HostStore(spec.moe_layers, spec.num_experts, 2, spec.dim, spec.moe_intermediate, torch.float32,
                      pin=False, fmt=fmt)
    cache = QuantCache.for_store(store, model, root=tmp_path)
    assert cache is not None and cache.path.parent.parent == tmp_path and cache.path.name == "quant-int4-g64-G2.bin"
    assert QuantCache.for_store(store, None) is None  # in-memory checkpoint: nowhere to key a cache
    assert not cache.load(store)  # no file yet
    empty = torch.zeros(0)
    art = Refactored(tmp_path / "art", {}, model, 2, torch.arange(spec.moe_intermediate).expand(2, 4, -1), empty,
                     empty, empty)
    beside = QuantCache.for_store(store, model, art)
    assert beside is not None and beside.path == tmp_path / "art" / "quant-int4-g64-G2.bin"  # inside the artifact
    flipped = Refactored(art.path, {}, model, 2, art.perm.flip(-1), empty, empty, empty)
    other = QuantCache.for_store(store, model, flipped)
    assert cache.header["perm"] is None and beside.header["perm"] is not None
    assert other is not None and other.header["perm"] != beside.header["perm"]  # another neuron order, another cache
