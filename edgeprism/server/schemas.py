"""Request bodies of the OpenAI endpoints, checked strictly: a wrong type is a 400, never coerced.

Fields OpenAI defines that change nothing here (`user`, `presence_penalty`, `metadata`...) are
accepted and ignored, so existing clients work unchanged; fields asking for something this server
cannot do (`n > 1`, `logprobs`, `echo`, `tools`) are refused by name in `refuse_unsupported`.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeprism.server.errors import APIError, bad_request

Role = Literal["system", "developer", "user", "assistant", "tool"]
MAX_STOPS = 4  # OpenAI's limit


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Role
    content: str | list[TextPart] | None = None

    def plain(self) -> dict[str, str]:
        """The message as the chat template wants it: role and one string of content."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's names and defaults)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOPS)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    tools: list[Any] | None = None
    # edgeprism extensions (a server started with --schedule hybrid or direct): see Engine.generate_ids
    quality: float | None = Field(None, gt=0, le=1)
    latency_ms: float | None = Field(None, gt=0)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


Req = TypeVar("Req", bound=_Common)


def parse_body(raw: bytes, model: type[Req]) -> Req:
    """JSON bytes -> a checked request, or a 400 that names the offending field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from e


def _validation_error(e: ValidationError) -> APIError:
    first = e.errors(include_url=False)[0]
    # keep the field path, drop pydantic's union-member tags ('str', 'list[TextPart]'...)
    path = [str(p) for p in first["loc"] if isinstance(p, int) or p in _FIELD_NAMES]
    param = ".".join(path) or None
    detail = first["msg"] if first["type"] != "missing" else "this field is required"
    return bad_request(f"{param or 'body'}: {detail}.", param=param, code="invalid_value")


_FIELD_NAMES = {name for m in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions)
                for name in m.model_fields}


def refuse_unsupported(req: _Common) -> None:
    """400 for options this server cannot honour, rather than silently ignoring them."""
    if req.n not in (None, 1):
        raise bad_request(f"n={req.n}: this server returns one choice per request; use n=1 (or leave it out).",
                          param="n", code="unsupported_value")
    if req.logprobs:
        raise bad_request("logprobs are not supported by this server.", param="logprobs", code="unsupported_value")
    if req.tools:
        raise bad_request("tools (function calling) are not supported by this server.", param="tools",
                          code="unsupported_value")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise bad_request("echo is not supported by this server.", param="echo", code="unsupported_value")
        if req.best_of not in (None, 1):
            raise bad_request("best_of is not supported; use best_of=1.", param="best_of", code="unsupported_value")
        if req.suffix:
            raise bad_request("suffix (insertion) is not supported by this server.", param="suffix",
                              code="unsupported_value")
