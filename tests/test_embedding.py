"""Embedding the engine in an app: cancellable streams, finish reasons and usage, the callback and
background forms, threads, close(); and that the server extra stays optional."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

import edgeprism
from edgeprism import errors
from edgeprism.streaming import Completion, TextStream

QUESTION = [{"role": "user", "content": "What is a file descriptor?"}]  # greedy: no end-of-text for 200+ tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py; `engine` too


def test_stream_reports_finish_reason_and_usage(engine: edgeprism.Engine) -> None:
    stream = engine.stream("The read() system call", max_new_tokens=6, temperature=0)
    assert stream.finish_reason is None
    text = "".join(stream)
    assert stream.completion() == Completion(text, "length", engine.count_tokens("The read() system call"), 6)
    word = text.split()[1]
    cut = engine.stream("The read() system call", max_new_tokens=6, temperature=0, stop=word)
    assert "".join(cut) == text[:text.index(word)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("tail,stops,reason,text", [
    ([0], [], "stop", " hello world"),             # end-of-text token
    ([], [], "length", " hello world"),            # the token source ran out
    ([0], ["wor"], "stop", " hello "),             # a stop string
    ([], ["world!"], "length", " hello world"),    # a partial stop string is released at the end
])
def test_text_stream_finish_reasons(engine: edgeprism.Engine, tail: list[int], stops: list[str], reason: str,
                                    text: str) -> None:
    ids = engine.tokenizer.encode(" hello world") + tail
    stream = TextStream(iter(ids), engine.tokenizer, stops=stops, eos={0}, prompt_tokens=1, lock=threading.RLock())
    assert "".join(stream) == text and stream.finish_reason == reason


def test_cancel_while_iterating(engine: edgeprism.Engine) -> None:
    stream = engine.stream(messages=QUESTION, max_new_tokens=200, temperature=0)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 2:
            stream.cancel()
    assert stream.finish_reason == "cancelled" and stream.completion_tokens < 10
    assert engine.generate("Honor, n.", max_new_tokens=3, temperature=0)  # nothing left half-done


def test_submit_runs_in_the_background_and_cancels_from_another_thread(engine: edgeprism.Engine) -> None:
    first, done = threading.Event(), threading.Event()
    job = engine.submit(messages=QUESTION, max_new_tokens=200, temperature=0,
                        on_token=lambda piece: first.set(), on_done=lambda g: done.set())
    assert first.wait(120)
    job.cancel()
    completion = job.result(timeout=120)
    assert completion.finish_reason == "cancelled" and 1 <= completion.completion_tokens < 200
    assert done.wait(10) and job.done()


def test_callbacks_see_every_piece(engine: edgeprism.Engine) -> None:
    seen: list[str] = []
    text = engine.generate("The meaning of the word", max_new_tokens=12, temperature=0, on_token=seen.append)
    assert len(seen) > 1 and "".join(seen) == text
    pieces: list[str] = []
    job = engine.submit("The meaning of the word", max_new_tokens=12, temperature=0, on_token=pieces.append)
    assert job.result(timeout=120).text == text == "".join(pieces)


def test_submit_checks_arguments_before_starting(engine: edgeprism.Engine) -> None:
    with pytest.raises(errors.InputError, match="empty"):
        engine.submit("")
    with pytest.raises(errors.InputError, match="max_new_tokens"):
        engine.submit("x", max_new_tokens=-1)


def test_concurrent_text_calls_queue_instead_of_interrupting(engine: edgeprism.Engine) -> None:
    prompts = ["The meaning of", "Python is", "Honor, n.", "The read()"]
    expected = [engine.generate(p, max_new_tokens=5, temperature=0) for p in prompts]
    results: dict[int, str] = {}

    def work(i: int) -> None:  # mixes the three whole-generation forms
        p = prompts[i % 4]
        if i % 3 == 0:
            results[i] = engine.generate(p, max_new_tokens=5, temperature=0)
        elif i % 3 == 1:
            results[i] = engine.stream(p, max_new_tokens=5, temperature=0).run().text
        else:
            results[i] = engine.submit(p, max_new_tokens=5, temperature=0).result(timeout=120).text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [results[i] for i in range(8)] == expected * 2


def test_close_frees_the_engine_and_refuses_later_calls() -> None:
    with edgeprism.load(device="cpu", max_context=64) as eng:
        paused = eng.stream("The meaning of", max_new_tokens=5, temperature=0)
        next(paused)
    assert eng.closed and not any(hasattr(eng, a) for a in ("model", "cache", "store", "decode_step"))
    with pytest.raises(errors.GenerationInterrupted):
        list(paused)
    for call in (lambda: eng.generate("x"), lambda: eng.generate_ids([1, 2]), eng.stats):
        with pytest.raises(errors.EngineClosedError, match="closed"):
            call()
    eng.close()  # closing twice is harmless


def test_server_extra_is_optional() -> None:
    """`import edgeprism` works without fastapi/uvicorn, and `edgeprism serve` says what to install."""
    code = ("import sys; sys.modules['fastapi'] = sys.modules['uvicorn'] = None\n"
            "import edgeprism, edgeprism.cli\n"
            "sys.exit(edgeprism.cli.main(['serve']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "pip install 'edgeprism[server]'" in res.stderr and "Traceback" not in res.stderr
