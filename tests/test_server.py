"""The OpenAI-compatible server, started for real (uvicorn on a loopback port) with the embedded
default model, driven by the official `openai` client and by raw HTTP for malformed input."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import edgeprism
from edgeprism.server import DEFAULT_MODEL_ID, BackgroundServer

MODEL = DEFAULT_MODEL_ID
QUESTION = [{"role": "user", "content": "What is a file descriptor?"}]  # greedy: no end-of-text for 200+ tokens
README = Path(__file__).resolve().parents[1] / "README.md"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py; `engine` too


@pytest.fixture(scope="module")
def server(engine: edgeprism.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(engine, max_queue=3) as srv:
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll until `condition()` holds; fail the test if it does not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---- happy paths through the official client ------------------------------------------------
def test_health_and_models(client: openai.OpenAI, http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok", "model": MODEL}
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_matches_the_engine(client: openai.OpenAI, engine: edgeprism.Engine) -> None:
    expected = engine.generate(messages=QUESTION, max_new_tokens=10, temperature=0)
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == engine.count_tokens(messages=QUESTION)
    assert reply.usage.completion_tokens == 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 10


def test_completion_with_stop(client: openai.OpenAI, engine: edgeprism.Engine) -> None:
    prompt = "The read() system call"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert full.choices[0].text == engine.generate(prompt, max_new_tokens=12, temperature=0)
    assert full.choices[0].finish_reason == "length"
    word = full.choices[0].text.split()[2]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert word not in cut.choices[0].text and full.choices[0].text.startswith(cut.choices[0].text)


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    texts = [client.completions.create(model=MODEL, prompt="Honor, n.", max_tokens=8, temperature=0.9, top_p=0.9,
                                       seed=11).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1] and texts[0]


def test_chat_streaming_adds_up_to_the_full_reply(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_completion_streaming(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="Python is", max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Python is", max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


# ---- bad requests: OpenAI-style 4xx, server unharmed ------------------------------------------
def chat(**fields: Any) -> dict[str, Any]:
    """A request that yields exactly max_tokens tokens: greedy (the server's default temperature, 1.0,
    samples, and a sampled end-of-text made a count check flaky: 1 token instead of 4, once in CI)."""
    return {"model": MODEL, "messages": QUESTION, "max_tokens": 4, "temperature": 0, **fields}


BAD_REQUESTS = [
    ("malformed-json", b'{"model": "edgeprism-default", "messages": [', 400, None),
    ("not-an-object", b'[1, 2]', 400, None),
    ("not-utf8", b'\xff\xfe{}', 400, None),
    ("unknown-model", chat(model="gpt-4o"), 404, "model"),
    ("missing-model", {"messages": QUESTION}, 400, "model"),
    ("negative-max-tokens", chat(max_tokens=-5), 400, "max_tokens"),
    ("zero-max-tokens", chat(max_tokens=0), 400, "max_tokens"),
    ("huge-max-tokens", chat(max_tokens=10**9), 400, "max_tokens"),
    ("string-max-tokens", chat(max_tokens="8"), 400, "max_tokens"),
    ("bool-max-tokens", chat(max_tokens=True), 400, "max_tokens"),
    ("string-temperature", chat(temperature="hot"), 400, "temperature"),
    ("temperature-range", chat(temperature=5), 400, "temperature"),
    ("top-p-range", chat(top_p=0), 400, "top_p"),
    ("messages-not-list", chat(messages="hi"), 400, "messages"),
    ("no-messages", chat(messages=[]), 400, "messages"),
    ("content-not-text", chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("unknown-role", chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    ("stream-not-bool", chat(stream="yes"), 400, "stream"),
    ("empty-stop", chat(stop=[""]), 400, "stop"),
    ("n-above-one", chat(n=2), 400, "n"),
    ("prompt-over-context", chat(messages=[{"role": "user", "content": "word " * 400}]), 400, "messages"),
    ("quality-range", chat(quality=1.5), 400, "quality"),
    ("latency-range", chat(latency_ms=0), 400, "latency_ms"),
    ("both-targets", chat(quality=0.9, latency_ms=50), 400, "latency_ms"),
    ("quality-without-hybrid", chat(quality=0.9), 400, "quality"),
]


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_chat_request(http: httpx.Client, body: Any, status: int, param: str | None) -> None:
    r = (http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
         if isinstance(body, bytes) else http.post("/v1/chat/completions", json=body))
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize("fields,param", [({"prompt": ["a", "b"]}, "prompt"), ({"prompt": ""}, "prompt"),
                                          ({"prompt": 42}, "prompt"), ({"prompt": "x", "echo": True}, "echo")])
def test_bad_completion_request(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    r = http.post("/v1/completions", json={"model": MODEL, "max_tokens": 4, **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_transport_level_errors(http: httpx.Client) -> None:
    too_big = http.post("/v1/chat/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
    assert http.get("/v1/nothing-here").status_code == 404 and "error" in http.get("/v1/nothing-here").json()
    assert http.get("/v1/chat/completions").status_code == 405
    assert http.get("/health").status_code == 200


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, n=3)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="llama", messages=QUESTION, max_tokens=4)


def test_an_internal_error_is_a_500_and_the_server_lives_on(
        engine: edgeprism.Engine, client: openai.OpenAI, http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(engine, "stream", broken)  # fails on the worker thread
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    with pytest.raises(openai.APIError, match="internal error"):
        list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, stream=True))
    monkeypatch.setattr(engine, "count_tokens", broken)  # fails in the request handler
    r = http.post("/v1/chat/completions", json=chat())
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert http.get("/health").status_code == 200  # same keep-alive connection, still served
    monkeypatch.undo()
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4


# ---- queueing, 429 and disconnects ---------------------------------------------------------
def metrics(http: httpx.Client) -> dict[str, Any]:
    return http.get("/metrics").json()


def test_metrics_report_throughput_cache_and_memory(http: httpx.Client) -> None:
    before = metrics(http)
    reply = http.post("/v1/completions", json={"model": MODEL, "prompt": "Python is", "max_tokens": 3})
    assert reply.status_code == 200
    m = metrics(http)
    assert m["tokens"]["completion"] == before["tokens"]["completion"] + 3
    assert m["requests"]["completed"] == before["requests"]["completed"] + 1
    assert m["model"] == MODEL and m["requests"]["capacity"] == 4
    assert m["tokens"]["completion"] > 0 and m["tokens_per_second"] > 0
    assert 0 <= m["cache"]["hit_rate"] <= 1
    assert {"vram_in_use_bytes", "expert_cache_bytes", "kv_cache_bytes"} <= set(m["memory"])


def test_full_queue_gives_429_and_a_disconnect_frees_the_slot_at_once(engine: edgeprism.Engine) -> None:
    with BackgroundServer(engine, max_queue=0) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat(max_tokens=200, temperature=0, stream=True)) as r:
            lines = r.iter_lines()  # keep a reference: dropping the iterator closes the connection
            next(line for line in lines if re.search(r'"content":"[^"]', line))  # generating now
            busy = http.post("/v1/chat/completions", json=chat())
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
        # the client hung up mid-stream: the slot is free again and the generation stopped early
        wait_for(lambda: metrics(http)["requests"]["cancelled"] == 1 and metrics(http)["requests"]["running"] == 0)
        m = metrics(http)
        assert m["requests"]["queued"] == 0 and m["requests"]["rejected"] == 1
        assert m["tokens"]["completion"] < 200
        again = http.post("/v1/chat/completions", json=chat())
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(engine: edgeprism.Engine) -> None:
    with BackgroundServer(engine, max_queue=0) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        with pytest.raises(httpx.ReadTimeout):  # httpx closes the connection
            http.post("/v1/chat/completions", json=chat(max_tokens=200, temperature=0), timeout=1.0)
        wait_for(lambda: metrics(http)["requests"]["cancelled"] == 1 and metrics(http)["requests"]["running"] == 0)
        assert metrics(http)["tokens"]["completion"] < 200
        assert http.post("/v1/chat/completions", json=chat()).status_code == 200


def test_disconnect_while_queued_skips_the_request(engine: edgeprism.Engine) -> None:
    with BackgroundServer(engine, max_queue=1) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat(max_tokens=200, stream=True)) as running:
            lines = running.iter_lines()  # keep a reference: dropping the iterator closes the connection
            next(line for line in lines if line)
            with http.stream("POST", "/v1/chat/completions", json=chat(max_tokens=200, stream=True)) as queued:
                assert queued.status_code == 200
                wait_for(lambda: metrics(http)["requests"]["queued"] == 1)
            wait_for(lambda: metrics(http)["requests"]["queued"] == 0)  # slot given back before the worker sees it
        wait_for(lambda: metrics(http)["requests"]["cancelled"] == 2 and metrics(http)["requests"]["running"] == 0)
        assert metrics(http)["requests"]["completed"] == 0


def ask(client: openai.OpenAI, streaming: bool) -> str:
    """One short chat request: "ok", "429", or what went wrong."""
    try:
        if streaming:
            stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0,
                                                    stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream)
        else:
            text = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3,
                                                  temperature=0).choices[0].message.content
        return "ok" if text else "empty"
    except openai.RateLimitError:
        return "429"
    except Exception as e:  # recorded, and fails the test
        return f"{type(e).__name__}: {e}"


def test_concurrent_clients_get_answers_or_429(server: BackgroundServer, http: httpx.Client) -> None:
    before = metrics(http)["requests"]
    outcomes: list[str] = []  # list.append is atomic

    def one_client(i: int) -> None:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            for j in range(5):
                outcomes.append(ask(client, streaming=(i + j) % 2 == 0))

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(outcomes) == 40 and set(outcomes) <= {"ok", "429"}, outcomes
    after = metrics(http)["requests"]
    assert after["completed"] - before["completed"] == outcomes.count("ok") > 0
    assert after["rejected"] - before["rejected"] == outcomes.count("429")
    assert after["running"] == 0 and after["queued"] == 0
    assert http.get("/health").json()["status"] == "ok"


# ---- the CLI command and the README, as written -----------------------------------------------
def readme_section(title: str) -> tuple[str, str]:
    """The bash command and the Python snippet of a README section."""
    section = README.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return command, snippet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_server_command_and_client_snippet_work(tmp_path: Path) -> None:
    command, snippet = readme_section("Local server")
    argv = shlex.split(command)
    assert argv[:2] == ["edgeprism", "serve"]
    port, log = free_port(), tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "edgeprism.cli", *argv[1:], "--port", str(port),
                             "--max-context", "256"], stderr=log.open("w"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=120)
        out = StringIO()
        with redirect_stdout(out):
            exec(snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), {})
        assert len(out.getvalue().strip()) > 10
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does: a graceful shutdown
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 130 and "Traceback" not in log.read_text(), log.read_text()  # 130: stopped by SIGINT, cleanly


def test_quality_and_latency_reach_a_hybrid_engine() -> None:
    from edgeprism.schedule.cost import CostModel

    probe = edgeprism.load(device="cpu", max_context=256, cache_fraction=0.3)
    unit_bytes = probe.stats()["unit_bytes"]
    probe.close()
    cost = CostModel(unit_bytes=unit_bytes, h2d_latency_s=1e-5, h2d_sizes=(4096,), h2d_bytes_per_s=(1e9,),
                     cpu_call_s=1e-5, cpu_bytes_per_s=2e9, gpu_call_s=1e-5, gpu_unit_s=1e-6)
    with edgeprism.load(device="cpu", max_context=256, cache_fraction=0.3, schedule="hybrid", cost=cost) as eng, \
            BackgroundServer(eng, max_queue=1) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for extra in ({"quality": 0.8}, {"latency_ms": 0.001}):
            eng.reset_stats()
            r = http.post("/v1/chat/completions", json=chat(max_tokens=12, **extra))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]
            s = eng.stats()
            assert s["units_drop"] > 0 and s["mass_kept"] >= 0.5  # the scheduler dropped misses for this request


def test_quality_and_latency_reach_a_direct_engine() -> None:
    with edgeprism.load(device="cpu", max_context=256, cache_fraction=0.3, schedule="direct") as eng, \
            BackgroundServer(eng, max_queue=1) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for extra in ({"quality": 0.7}, {"latency_ms": 0.001}):  # an unreachable latency: the floor goes down
            eng.reset_stats()
            r = http.post("/v1/chat/completions", json=chat(max_tokens=12, **extra))
            assert r.status_code == 200, r.text
            s = eng.stats()
            assert s["schedule"] == "direct" and s["units_drop"] > 0 and s["mass_kept"] >= 0.5 - 1e-6, extra
