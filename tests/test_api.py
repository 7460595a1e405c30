"""The public API on the embedded default model: text calls, streaming, stop strings, chat,
threads, abandoned streams, CLI."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

import edgeprism
from edgeprism import errors


@pytest.fixture(scope="module")
def engine():
    return edgeprism.load(device="cpu", max_context=512)


def test_stream_pieces_add_up_to_generate(engine):
    text = engine.generate("The meaning of the word", max_new_tokens=24, temperature=0)
    pieces = list(engine.stream("The meaning of the word", max_new_tokens=24, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == text
    assert text.strip()


def test_text_matches_id_level_generation(engine):
    ids = engine.tokenizer.encode("Python is a programming language that")
    new = engine.generate_ids(ids, max_new_tokens=20)
    assert engine.generate("Python is a programming language that", max_new_tokens=20, temperature=0) == \
        engine.tokenizer.decode(new)


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate("Honor, n.", max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    b = engine.generate("Honor, n.", max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    assert a == b


def test_stop_string_cuts_the_text(engine):
    full = engine.generate("The read() system call", max_new_tokens=40, temperature=0)
    word = full.split()[2]
    cut = engine.generate("The read() system call", max_new_tokens=40, temperature=0, stop=[word])
    assert word not in cut
    assert full.startswith(cut) and len(cut) < len(full)


def test_chat_messages_use_the_template(engine):
    reply = engine.generate(messages=[{"role": "user", "content": "What is a file descriptor?"}],
                            max_new_tokens=12, temperature=0)
    assert isinstance(reply, str) and reply
    with pytest.raises(errors.InputError, match="exactly one"):
        engine.generate("x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(errors.InputError, match="messages"):
        engine.generate(messages=[{"content": "no role"}])


def test_empty_text_prompt(engine):
    with pytest.raises(errors.InputError, match="empty"):
        engine.generate("")


def test_abandoned_stream_does_not_block_the_next_call(engine):
    old = engine.stream("The meaning of the word", max_new_tokens=50, temperature=0)
    first = next(old)
    assert first
    expected = engine.generate("Honor, n.", max_new_tokens=8, temperature=0)
    again = engine.generate("Honor, n.", max_new_tokens=8, temperature=0)
    assert expected == again
    with pytest.raises(errors.GenerationInterrupted):
        list(old)


def test_threads_are_serialised(engine):
    prompts = [engine.tokenizer.encode(p) for p in ("The meaning of", "Python is", "Honor, n.", "The read()")]
    expected = [engine.generate_ids(p, max_new_tokens=10) for p in prompts]
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        results[i] = engine.generate_ids(prompts[i % 4], max_new_tokens=10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(8)] == expected * 2


def test_context_manager_closes(engine):
    with edgeprism.load(device="cpu", max_context=64) as eng:
        assert eng.generate_ids([1, 2, 3], max_new_tokens=2)
    assert not hasattr(eng, "model")


def test_cli_info_prints_budget_split():
    out = subprocess.run([sys.executable, "-m", "edgeprism.cli", "info", "--vram-gb", "0.5"],
                         capture_output=True, text=True, check=True).stdout
    assert "qwen3_moe" in out and "routed experts" in out and "expert cache" in out


def test_cli_error_is_clean(tmp_path):
    res = subprocess.run([sys.executable, "-m", "edgeprism.cli", "info", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr
