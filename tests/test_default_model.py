"""Guards on the embedded default model, so a re-export or an engine change cannot silently break it.

Checks: the shipped files stay small, held-out perplexity stays near the value measured when this
test was written, greedy output is frozen in a golden file, logits equal transformers', and the
one-call API and the CLI work with no model argument.

The golden file is written by running this module as a script:
    python tests/test_default_model.py      # rewrites tests/golden/default_greedy.json
"""

from __future__ import annotations

import json
import math
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import edgeprism
from edgeprism.corpus import token_stream
from edgeprism.api import Engine

MODEL = edgeprism.DEFAULT_MODEL
GOLDEN = Path(__file__).parent / "golden" / "default_greedy.json"

EOS_ID = 0  # <|endoftext|>: training appended it after every document
PPL_TOKENS = 8192  # predicted tokens: the first 16 windows of the held-out stream
PPL_WINDOW = 512
# Measured 2026-11-23 with edgeprism on CPU, fp32 (torch 2.13.0+cpu): 21.785 over the first 8192
# predicted tokens of heldout.txt (split at blank lines, each document encoded alone and followed by
# <|endoftext|>, as in training), in non-overlapping windows of 512 inputs predicting the next 512.
# (train_report.json's 24.76 is over 131072 tokens of the full held-out split, a different mix.)
# Threshold = 21.785 * 1.05 = 22.87, rounded up.
PPL_MAX = 23.0
UNIGRAM_MARGIN = 20  # the model must beat the train unigram baseline (966.56) by at least this factor

# One prompt per corpus source (gcide, python docs, man pages). Along each greedy path the smallest
# top-1 minus top-2 logit gap was >= 0.0095 when recorded, far above fp32 reordering noise (~1e-5).
PROMPTS = ["Honor, n.", "Python is a programming language that", "The read() system call"]
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def engine() -> Engine:
    return edgeprism.load(device="cpu", dtype="fp32")


def heldout_ids(engine: Engine, n_tokens: int) -> list[int]:
    """The first `n_tokens` of the held-out token stream, built the way training built it."""
    ids = token_stream(engine.tokenizer, n_tokens, EOS_ID)
    assert len(ids) == n_tokens, "heldout.txt is shorter than the perplexity slice"
    return ids


def perplexity(engine: Engine, ids: list[int], window: int) -> float:
    """exp(mean NLL) over non-overlapping windows of `window` inputs, each predicting its next token."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        logits = engine.logits(chunk[:-1])
        nll += F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def greedy_record(engine: Engine) -> dict[str, Any]:
    samples = [{"prompt": p, "ids": engine.generate_ids(engine.tokenizer.encode(p), max_new_tokens=GREEDY_TOKENS),
                "text": engine.generate(p, max_new_tokens=GREEDY_TOKENS, temperature=0.0)} for p in PROMPTS]
    return {"max_new_tokens": GREEDY_TOKENS, "temperature": 0.0, "samples": samples}


def render(record: dict[str, Any]) -> bytes:
    """The one serialisation both the writer and the test use, so the comparison can be bytewise."""
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_golden() -> None:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_bytes(render(greedy_record(edgeprism.load(device="cpu", dtype="fp32"))))
    print(f"wrote {GOLDEN}")


# ---- tests -----------------------------------------------------------------------------------


def test_files_within_size_limits() -> None:
    files = [p for p in MODEL.iterdir() if p.is_file()]
    sizes = {p.name: p.stat().st_size for p in files}
    assert all(size < 16 * 2**20 for size in sizes.values()), sizes
    assert sum(sizes.values()) <= 40_000_000, sizes
    assert len([n for n in sizes if n.endswith(".safetensors")]) >= 1


def test_config_is_a_real_moe() -> None:
    config = json.loads((MODEL / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config.get("num_experts", config.get("num_local_experts", 0)) >= 8
    assert config["num_experts_per_tok"] >= 2
    assert config["num_hidden_layers"] >= 4


def test_heldout_perplexity(engine: Engine) -> None:
    ids = heldout_ids(engine, PPL_TOKENS + 1)
    ppl = perplexity(engine, ids, PPL_WINDOW)
    unigram = json.loads((MODEL / "train_report.json").read_text())["unigram_ppl"]
    assert ppl < PPL_MAX, f"held-out perplexity {ppl:.3f} >= {PPL_MAX}"
    assert ppl * UNIGRAM_MARGIN < unigram, f"perplexity {ppl:.3f} is not far below the unigram {unigram:.2f}"


def test_greedy_matches_golden(engine: Engine) -> None:
    golden = GOLDEN.read_bytes()
    record = greedy_record(engine)
    for got, want in zip(record["samples"], json.loads(golden)["samples"], strict=True):
        assert got == want
    assert render(record) == golden


def test_logits_match_transformers(engine: Engine) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32,
                                                            experts_implementation="eager").eval()
    ids = engine.tokenizer.encode("The read() system call reads up to count bytes from a file descriptor "
                                  "into the buffer; see also Honor, n. and the os module.")
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    got = engine.logits(ids)
    assert got.shape == expected.shape == (len(ids), 8192)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def english_like(text: str) -> bool:
    """Mostly ASCII letters and spaces, with a few real words: not empty, not byte soup."""
    letters = sum(c in string.ascii_letters or c == " " for c in text)
    words = [w for w in text.split() if w.isalpha()]
    return bool(text.strip()) and letters >= 0.7 * len(text) and len(words) >= 3


def test_one_call_generate_uses_default_model() -> None:
    text = edgeprism.generate("The meaning of the word", max_new_tokens=16, temperature=0)
    assert english_like(text), repr(text)


def test_cli_generate() -> None:
    cmd = [sys.executable, "-m", "edgeprism.cli", "generate", "The meaning of", "--max-new-tokens", "8",
           "--temperature", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), done.stderr


if __name__ == "__main__":
    write_golden()
