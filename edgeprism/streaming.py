"""The text side of one generation: incremental detokenisation, stop strings, cancellation,
finish reasons and token counts.

`Engine.stream` returns a `TextStream` rather than a bare generator because an app needs more
than the pieces: a GUI's Stop button must end a generation from another thread (a generator can
only be closed by the thread iterating it), and an OpenAI-style server must report why the text
ended (`finish_reason`) and how many tokens it used. `Generation` runs a stream on a background
thread for event loops that must never block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

from edgeprism.errors import InputError
from edgeprism.models.tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "cancelled"]
OnToken = Callable[[str], None]


@dataclass(frozen=True)
class Completion:
    """The outcome of one generation.

    finish_reason: "stop" (end-of-sequence token or a stop string), "length" (`max_new_tokens` or
    the context window reached) or "cancelled" (`TextStream.cancel()`), as OpenAI's API names them.
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TextStream:
    """Iterator of the text pieces of one generation, with `cancel()`, `finish_reason` and usage.

    Iterating it runs the model in the iterating thread, one token per step, taking the engine's
    lock per token (so an abandoned stream blocks no one). `run()` instead holds the lock for the
    whole generation, so other calls queue behind it rather than supersede it.
    """

    def __init__(self, tokens: Iterator[int], tokenizer: Tokenizer, *, stops: list[str], eos: set[int],
                 prompt_tokens: int, lock: threading.RLock, on_token: OnToken | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None  # set once the last piece has been returned
        self._lock, self._on_token = lock, on_token
        self._cancelled = threading.Event()
        self._token_end: FinishReason | None = None  # why the token source ended, if it did
        self._parts: list[str] = []
        self._pieces = text_pieces(tokenizer, self._counted(tokens, eos), stops, eos)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        if self.finish_reason is not None:
            raise StopIteration
        try:
            piece = next(self._pieces)
        except StopIteration:
            self.finish_reason = self._token_end or "stop"  # no token-side reason: a stop string ended it
            raise
        self._parts.append(piece)
        if self._on_token is not None:
            self._on_token(piece)
        return piece

    def _counted(self, tokens: Iterator[int], eos: set[int]) -> Iterator[int]:
        """Count tokens and check for cancellation before each model step."""
        while not self._cancelled.is_set():
            tok = next(tokens, None)
            if tok is None:
                self._token_end = "length"
                return
            self.completion_tokens += 1
            if tok in eos:
                self._token_end = "stop"
            yield tok
        self._token_end = "cancelled"
        close = getattr(tokens, "close", None)  # the engine's token generator: free its frame now
        if close is not None:
            close()

    def cancel(self) -> None:
        """Stop before the next model step; safe from any thread. The stream then ends normally
        (no exception) with `finish_reason == "cancelled"`."""
        self._cancelled.set()

    def close(self) -> None:
        """Cancel and release the stream at once (only from the thread that iterates it)."""
        self.cancel()
        self._pieces.close()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    @property
    def text(self) -> str:
        """The text returned so far (all of it once the stream has ended)."""
        return "".join(self._parts)

    def run(self) -> Completion:
        """Generate to the end in this thread, holding the engine for the whole generation."""
        with self._lock:
            for _ in self:
                pass
        return self.completion()

    def completion(self) -> Completion:
        """The outcome; the stream must have ended (iterated to its end, `run()` or `close()`)."""
        if self.finish_reason is None:
            raise InputError("the stream has not ended yet: iterate it to the end or call run() first.")
        return Completion(self.text, self.finish_reason, self.prompt_tokens, self.completion_tokens)


class Generation:
    """A `TextStream` run to its end on a background thread, for GUI event loops that must not block.

    `on_token(piece)` is called on the worker thread: hand it to the GUI thread (a Qt signal,
    tkinter's `after`, asyncio's `call_soon_threadsafe`). `on_done(generation)` is called once at
    the end, also on the worker thread; `result()` then returns the `Completion` or raises the error.
    Generations submitted together run one after the other (each holds the engine while it runs).
    """

    def __init__(self, stream: TextStream, on_done: Callable[["Generation"], None] | None = None) -> None:
        self.stream = stream
        self._future: Future[Completion] = Future()
        if on_done is not None:
            self._future.add_done_callback(lambda _: on_done(self))
        self._thread = threading.Thread(target=self._work, name="edgeprism-generation", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        self._future.set_running_or_notify_cancel()
        try:
            self._future.set_result(self.stream.run())
        except BaseException as e:  # delivered to result(); the worker thread must not die silently
            self._future.set_exception(e)

    def cancel(self) -> None:
        """Stop at the next token; `result()` then has `finish_reason == "cancelled"`."""
        self.stream.cancel()

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end (TimeoutError after `timeout` seconds); raises what the generation raised."""
        return self._future.result(timeout)


def check_stops(stop: list[str] | str | None) -> list[str]:
    """`stop` as a list of non-empty strings (OpenAI accepts one string or a list)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise InputError("stop must be a non-empty string or a list of non-empty strings.")
    return stops


def text_pieces(tok: Tokenizer, tokens: Iterator[int], stops: list[str], eos: set[int]) -> Iterator[str]:
    """Incremental detokenisation: emit complete characters only, end before the first stop string.

    Text that could be the start of a stop string is held back until it is known not to be one.
    """
    ids: list[int] = []
    sent = 0  # characters already yielded
    for t in tokens:
        if t in eos:
            break
        ids.append(t)
        text = tok.decode(ids)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence: wait for the next token
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
        if cut is not None:
            if cut > sent:
                yield text[sent:cut]
            return
        safe = len(text) - _held_back(text, stops)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    text = tok.decode(ids)
    if len(text) > sent:
        yield text[sent:]


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    return max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
