"""The text that ships with the package: held-out and calibration slices of the default model's corpus."""

from __future__ import annotations

from pathlib import Path

from edgeprism.models.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
HELDOUT = DATA / "heldout.txt"  # documents separated by blank lines
CALIB = DATA / "calib.txt"


def token_stream(tokenizer: Tokenizer, n_tokens: int, eos_id: int, path: Path = HELDOUT) -> list[int]:
    """The first `n_tokens` of `path` tokenised the way training did: each document, then EOS.

    Returns fewer tokens only if the file is shorter; callers decide whether that is an error.
    """
    ids: list[int] = []
    for doc in path.read_text(encoding="utf-8").split("\n\n"):
        if doc.strip():
            ids += tokenizer.encode(doc) + [eos_id]
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]
