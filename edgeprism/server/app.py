"""The OpenAI-compatible HTTP app: routes, request checks, SSE streaming and error bodies.

Everything that can be checked is checked before a request is queued (JSON, types, model,
sampling values, stop strings, prompt and max_tokens against the context window), so a bad request
gets a 4xx with OpenAI's error body and a streaming request that starts will not fail for the
caller's fault half-way. The engine only runs on the scheduler's worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from edgeprism.api import DEFAULT_MODEL, Engine
from edgeprism.errors import EdgeprismError, InputError
from edgeprism.server.errors import APIError, bad_request, from_library
from edgeprism.server.scheduler import Job, Scheduler, StartStream
from edgeprism.server.schemas import ChatRequest, CompletionRequest, parse_body, refuse_unsupported
from edgeprism.streaming import Completion, check_stops

log = logging.getLogger(__name__)
DEFAULT_MODEL_ID = "edgeprism-default"


def default_model_id(engine: Engine) -> str:
    """The id clients pass as `model`: the checkpoint directory's name (`edgeprism-default` for the embedded one)."""
    if engine.path is None:
        return "edgeprism"
    path = Path(engine.path).resolve()
    return DEFAULT_MODEL_ID if path == DEFAULT_MODEL.resolve() else path.name


@dataclass(frozen=True)
class Plan:
    """A checked request, ready for `Engine.stream`."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    options: dict[str, Any]  # keyword arguments of Engine.stream
    stream: bool
    include_usage: bool

    def starter(self, engine: Engine) -> StartStream:
        return lambda on_token: engine.stream(self.prompt, messages=self.messages, on_token=on_token, **self.options)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def sse(obj: dict[str, Any] | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "total_tokens": c.total_tokens}


class _Format:
    """OpenAI's response and chunk shapes for one request (one id and timestamp for all its chunks)."""

    prefix = "x"
    object = "x"
    chunk_object = "x"

    def __init__(self, model: str) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created, self.model = int(time.time()), model

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return self.envelope(self.chunk_object, [{"index": 0, "logprobs": None, **choice}])

    def usage_chunk(self, c: Completion) -> dict[str, Any]:
        return {**self.envelope(self.chunk_object, []), "usage": usage(c)}


class ChatFormat(_Format):
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def first(self) -> dict[str, Any] | None:
        return self.chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def piece(self, text: str) -> dict[str, Any]:
        return self.chunk({"delta": {"content": text}, "finish_reason": None})

    def last(self, c: Completion) -> dict[str, Any]:
        return self.chunk({"delta": {}, "finish_reason": c.finish_reason})

    def full(self, c: Completion) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                  "finish_reason": c.finish_reason}
        return {**self.envelope(self.object, [choice]), "usage": usage(c)}


class CompletionFormat(_Format):
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def first(self) -> dict[str, Any] | None:
        return None

    def piece(self, text: str) -> dict[str, Any]:
        return self.chunk({"text": text, "finish_reason": None})

    def last(self, c: Completion) -> dict[str, Any]:
        return self.chunk({"text": "", "finish_reason": c.finish_reason})

    def full(self, c: Completion) -> dict[str, Any]:
        choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        return {**self.envelope(self.object, [choice]), "usage": usage(c)}


Format = ChatFormat | CompletionFormat


class Server:
    """Request handling around one engine; `create_app` wires its methods to routes."""

    def __init__(self, engine: Engine, model_id: str, max_queue: int, max_body_bytes: int) -> None:
        self.engine, self.model_id = engine, model_id
        self.max_queue, self.max_body_bytes = max_queue, max_body_bytes
        self.created = int(time.time())
        self._scheduler: Scheduler | None = None  # started with the app (lifespan), stopped with it

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise APIError(503, "the server is not running (its lifespan has not started).", type="server_error")
        return self._scheduler

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self._scheduler = Scheduler(self.engine, self.max_queue)
        try:
            yield
        finally:
            self._scheduler.close()

    # ---- endpoints ---------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        req = parse_body(await self._body(request), ChatRequest)
        self._check(req)
        messages = [m.plain() for m in req.messages]
        plan = self._plan(req, None, messages, req.max_completion_tokens or req.max_tokens, default_max=None)
        return await self._respond(request, plan, ChatFormat(self.model_id))

    async def completions(self, request: Request) -> Response:
        req = parse_body(await self._body(request), CompletionRequest)
        self._check(req)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise bad_request(f"prompt has {len(prompt)} entries: send one prompt per request.", param="prompt")
            prompt = prompt[0]
        plan = self._plan(req, prompt, None, req.max_tokens, default_max=16)  # OpenAI's default for completions
        return await self._respond(request, plan, CompletionFormat(self.model_id))

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._model_card()

    async def health(self) -> JSONResponse:
        ok = self._scheduler is not None and self._scheduler.alive and not self.engine.closed
        body = {"status": "ok" if ok else "unavailable", "model": self.model_id}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(self) -> dict[str, Any]:
        s = self.scheduler
        k, stats = s.counters, s.counters.engine
        return {
            "model": self.model_id, "device": str(self.engine.device),
            "requests": {"running": int(s.running), "queued": max(0, s.admitted - int(s.running)),
                         "capacity": s.capacity, "completed": k.completed, "cancelled": k.cancelled,
                         "failed": k.failed, "rejected": k.rejected},
            "tokens": {"prompt": k.prompt_tokens, "completion": k.completion_tokens},
            "tokens_per_second": k.completion_tokens / k.busy_s if k.busy_s else None,
            "last_request_tokens_per_second": k.last_tokens_per_s,
            "cache": {key: stats.get(key) for key in ("hit_rate", "hits", "misses", "evictions", "bytes_h2d",
                                                        "cache_slots", "total_units")},
            "memory": self._memory(stats),
        }

    # ---- request checks ----------------------------------------------------------------
    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise self._too_large()
        return bytes(body)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes.", code="body_too_large")

    def _check(self, req: ChatRequest | CompletionRequest) -> None:
        self._check_model(req.model)
        refuse_unsupported(req)

    def _check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise APIError(404, f"the model {model_id!r} is not served here; this server serves {self.model_id!r} "
                                "(see GET /v1/models).", param="model", code="model_not_found")

    def _plan(self, req: ChatRequest | CompletionRequest, prompt: str | None, messages: list[dict[str, str]] | None,
              max_tokens: int | None, default_max: int | None) -> Plan:
        try:
            stops = check_stops(req.stop)
        except InputError as e:
            raise bad_request(str(e), param="stop") from e
        self._check_tradeoff(req)
        wanted = self._fit(prompt, messages, max_tokens, default_max)
        options = {"max_new_tokens": wanted, "temperature": 1.0 if req.temperature is None else req.temperature,
                   "top_p": 1.0 if req.top_p is None else req.top_p, "top_k": 0, "seed": req.seed, "stop": stops,
                   "quality": req.quality, "latency_ms": req.latency_ms}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Plan(prompt, messages, options, bool(req.stream), include_usage)

    def _check_tradeoff(self, req: ChatRequest | CompletionRequest) -> None:
        """`quality` / `latency_ms` (edgeprism's extensions): at most one, on a hybrid or direct engine."""
        asked = [name for name in ("quality", "latency_ms") if getattr(req, name) is not None]
        if len(asked) > 1:
            raise bad_request("give at most one of quality and latency_ms.", param="latency_ms")
        if asked and self.engine.config.schedule not in ("hybrid", "direct"):
            raise bad_request(f"{asked[0]} trades quality for speed by dropping cache misses; this server's "
                              "engine was loaded without that (start it with --schedule hybrid or direct).",
                              param=asked[0])

    def _fit(self, prompt: str | None, messages: list[dict[str, str]] | None, max_tokens: int | None,
             default_max: int | None) -> int:
        """New tokens to generate: `max_tokens` (default: `default_max`, else all the room left), and a
        400 when the prompt and those tokens do not fit in the context window."""
        field, context = ("messages" if messages is not None else "prompt"), self.engine.max_context
        try:
            n_prompt = self.engine.count_tokens(prompt, messages=messages)
        except InputError as e:
            raise bad_request(str(e), param=field) from e
        room = context - n_prompt
        if room <= 0:
            raise bad_request(f"the {field} take {n_prompt} tokens but the context window is {context} tokens; "
                              "shorten them.", param=field, code="context_length_exceeded")
        wanted = max_tokens or min(default_max or room, room)
        if wanted > room:
            raise bad_request(f"max_tokens={wanted} is too large: the {field} take {n_prompt} of the {context}-token "
                              f"context window, so at most {room} new tokens fit.", param="max_tokens",
                              code="context_length_exceeded")
        return wanted

    # ---- answering ---------------------------------------------------------------------
    async def _respond(self, request: Request, plan: Plan, fmt: Format) -> Response:
        job = Job(plan.starter(self.engine), asyncio.get_running_loop(), streaming=plan.stream)
        self.scheduler.submit(job)  # QueueFullError -> 429
        if plan.stream:
            return _JobStream(self._events(job, fmt, plan.include_usage), lambda: self.scheduler.abandon(job))
        try:
            return JSONResponse(fmt.full(await self._result(job, request)))
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            self.scheduler.abandon(job)  # no-op once the job has ended; frees the slot now otherwise

    async def _result(self, job: Job, request: Request) -> Completion:
        """The job's completion, or ClientGone as soon as the client disconnects."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                event = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if event not in done:
                    event.cancel()
                    raise ClientGone
                kind, value = event.result()
                if kind == "done":
                    return value
                if kind == "error":
                    raise _error_for(value)
        finally:
            gone.cancel()

    async def _events(self, job: Job, fmt: Format, include_usage: bool) -> AsyncIterator[str]:
        """SSE chunks in OpenAI's format. Starlette cancels this generator when the client disconnects."""
        first = fmt.first()
        if first is not None:
            yield sse(first)
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                yield sse(fmt.piece(value))
                continue
            if kind == "done":
                yield sse(fmt.last(value))
                if include_usage:
                    yield sse(fmt.usage_chunk(value))
            else:
                yield sse(_error_for(value).body())
            break
        yield sse("[DONE]")

    # ---- helpers -----------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgeprism",
                "max_context": self.engine.max_context}

    def _memory(self, stats: dict[str, Any]) -> dict[str, Any]:
        dev = self.engine.device
        on_gpu = dev.type == "cuda" and not self.engine.closed
        return {"vram_in_use_bytes": torch.cuda.memory_allocated(dev) if on_gpu else None,
                "vram_reserved_bytes": torch.cuda.memory_reserved(dev) if on_gpu else None,
                "budget_bytes": self.engine.plan.total, "expert_cache_bytes": stats.get("cache_bytes"),
                "resident_bytes": stats.get("resident_bytes"), "kv_cache_bytes": stats.get("kv_cache_bytes"),
                "host_pinned": stats.get("host_pinned")}


class _JobStream(StreamingResponse):
    """An SSE response that hands its job back when it ends, however it ends: finished, client gone
    (Starlette cancels the stream when it sees the disconnect) or failed."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_for(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EdgeprismError):
        return from_library(e)
    return APIError(500, f"internal error ({type(e).__name__}); see the server log.", type="server_error")


def _error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _handler(convert: Callable[[Any], APIError]) -> Callable[[Request, Exception], Any]:
    async def handle(request: Request, e: Exception) -> JSONResponse:
        err = convert(e)
        if err.status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, err.message)
        return _error_response(err)
    return handle


class _Guard:
    """ASGI middleware: an unexpected exception becomes OpenAI's 500 body.

    Starlette's own catch-all re-raises after answering, and uvicorn then drops the connection,
    which a client pooling keep-alive connections sees as a failure of its *next* request.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            if scope["type"] != "http" or started:
                raise
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            await _error_response(_error_for(e))(scope, receive, send)


def _http_error(e: HTTPException) -> APIError:
    what = {404: "no such endpoint", 405: "method not allowed"}.get(e.status_code, str(e.detail))
    return APIError(e.status_code, f"{what}: see GET /v1/models, POST /v1/chat/completions, POST /v1/completions.",
                    code="not_found" if e.status_code == 404 else None)


def create_app(engine: Engine, *, model_id: str | None = None, max_queue: int = 8,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """An OpenAI-compatible ASGI app serving `engine` (run it with uvicorn, or `edgeprism.server.serve`).

    model_id: the name clients pass as `model` (default: `default_model_id(engine)`);
    max_queue: requests that may wait behind the running one before new ones get 429;
    max_body_bytes: larger request bodies get 413.
    """
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise InputError(f"max_queue={max_queue!r}: must be an integer ≥ 0 (0 = no waiting, only the running request).")
    if max_body_bytes <= 0:
        raise InputError(f"max_body_bytes={max_body_bytes!r}: must be a positive number of bytes.")
    server = Server(engine, model_id or default_model_id(engine), max_queue, max_body_bytes)
    app = FastAPI(title="edgeprism", lifespan=server.lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", server.model, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])
    app.add_exception_handler(APIError, _handler(lambda e: e))
    app.add_exception_handler(EdgeprismError, _handler(from_library))
    app.add_exception_handler(HTTPException, _handler(_http_error))
    app.add_middleware(_Guard)
    return app
