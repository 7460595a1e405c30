"""Bad input gets a typed error whose message says what is wrong and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import edgeprism
from edgeprism import errors


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def load_cpu(path, **kw):
    return edgeprism.load(path, device="cpu", dtype="fp32", **kw)


def test_missing_directory(tmp_path):
    with pytest.raises(errors.ModelNotFoundError, match="does not exist"):
        load_cpu(tmp_path / "nope")


def test_missing_config(tmp_path, tiny_checkpoint):
    d = copy_ckpt(tiny_checkpoint, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(errors.ModelNotFoundError, match="config.json"):
        load_cpu(d)


def test_unknown_architecture(tmp_path, tiny_checkpoint):
    d = copy_ckpt(tiny_checkpoint, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.UnsupportedModelError, match="LlamaForCausalLM.*not supported"):
        load_cpu(d)


def test_invalid_json_config(tmp_path, tiny_checkpoint):
    d = copy_ckpt(tiny_checkpoint, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(errors.ConfigError, match="not valid JSON"):
        load_cpu(d)


def test_truncated_safetensors(tmp_path, tiny_checkpoint):
    d = copy_ckpt(tiny_checkpoint, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CheckpointError, match="corrupt or truncated"):
        load_cpu(d)


def test_corrupt_safetensors_header(tmp_path, tiny_checkpoint):
    d = copy_ckpt(tiny_checkpoint, tmp_path / "m")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(errors.CheckpointError, match="corrupt"):
        load_cpu(d)


def _rewrite(d: Path, edit) -> None:
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor(tmp_path, tiny_checkpoint):
    d = copy_ckpt(tiny_checkpoint, tmp_path / "m")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(errors.CheckpointError, match="experts.3.up_proj.weight.*missing"):
        load_cpu(d)


def test_wrong_tensor_shape(tmp_path, tiny_checkpoint):
    d = copy_ckpt(tiny_checkpoint, tmp_path / "m")

    def edit(t):
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 5)

    _rewrite(d, edit)
    with pytest.raises(errors.CheckpointError, match=r"o_proj.weight.*shape \[3, 5\]"):
        load_cpu(d)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return load_cpu(tiny_checkpoint, max_context=64)


def test_empty_prompt(engine):
    with pytest.raises(errors.InputError, match="empty"):
        engine.generate_ids([], max_new_tokens=4)


def test_prompt_longer_than_context(engine):
    with pytest.raises(errors.InputError, match="context window is 64"):
        engine.generate_ids([1] * 64, max_new_tokens=4)
    with pytest.raises(errors.InputError, match="context window"):
        engine.logits([1] * 100)


@pytest.mark.parametrize("n", [0, -3, 1.5, None])
def test_bad_max_new_tokens(engine, n):
    with pytest.raises(errors.InputError, match="max_new_tokens"):
        engine.generate_ids([1, 2], max_new_tokens=n)


def test_token_out_of_vocab(engine):
    with pytest.raises(errors.InputError, match="outside the vocabulary"):
        engine.logits([1, 999])


@pytest.mark.parametrize("kw,match", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                      ({"top_k": -2}, "top_k")])
def test_bad_sampling(engine, kw, match):
    with pytest.raises(errors.InputError, match=match):
        engine.generate_ids([1, 2], max_new_tokens=2, **kw)


@pytest.mark.parametrize("vram", [0, -1.0])
def test_nonpositive_vram(tiny_checkpoint, vram):
    with pytest.raises(errors.BudgetError, match="positive"):
        load_cpu(tiny_checkpoint, vram_gb=vram)


def test_budget_below_resident_minimum(tiny_checkpoint):
    with pytest.raises(errors.BudgetError, match="too small.*at least"):
        load_cpu(tiny_checkpoint, vram_gb=0.001)


def test_unknown_policy(tiny_checkpoint):
    with pytest.raises(errors.ConfigError, match="policy"):
        load_cpu(tiny_checkpoint, policy="fifo")


def test_text_call_without_tokenizer(engine):
    with pytest.raises(errors.TokenizerMissingError, match="no tokenizer.json"):
        engine.generate("hello")
    assert engine.generate_ids([1, 2, 3], max_new_tokens=2)  # id-level use still works


def test_bad_device_and_dtype(tiny_checkpoint):
    with pytest.raises(errors.InputError, match="dtype"):
        edgeprism.load(tiny_checkpoint, device="cpu", dtype="int3")
    with pytest.raises(errors.InputError, match="device"):
        edgeprism.load(tiny_checkpoint, device="tpu:9")


def test_all_errors_share_a_base():
    for name in ("ModelNotFoundError", "ConfigError", "UnsupportedModelError", "CheckpointError", "InputError",
                 "BudgetError", "TokenizerMissingError", "HostMemoryError", "CacheFullError", "ProfileError"):
        assert issubclass(getattr(errors, name), errors.EdgeprismError)
