"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Clients of OpenAI's API (the official SDKs, chat front-ends) read this body and the status code
to decide whether to show a message, fix the request or retry, so every 4xx/5xx of the server is
one of these, whatever raised it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeprism.errors import (
    EdgeprismError,
    EngineClosedError,
    GenerationInterrupted,
    InputError,
    TokenizerMissingError,
)


class QueueFullError(EdgeprismError, RuntimeError):
    """The server already holds as many requests as it may queue; the client should retry later."""


@dataclass
class APIError(Exception):
    """An error response: HTTP status plus OpenAI's error fields."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_library(e: EdgeprismError) -> APIError:
    """Map a typed library error to its HTTP status: the caller's fault is 4xx, ours is 5xx."""
    if isinstance(e, InputError):
        return bad_request(str(e))
    if isinstance(e, TokenizerMissingError):
        return APIError(422, str(e), code="tokenizer_missing")
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, (EngineClosedError, GenerationInterrupted)):
        return APIError(503, str(e), type="server_error", code="engine_unavailable")
    return APIError(500, str(e), type="server_error")
