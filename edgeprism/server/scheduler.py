"""One engine, many HTTP clients: a bounded FIFO of requests served one at a time by one worker thread.

Why this shape: the engine decodes one sequence at a time (a batch of one) and its calls must not
block the event loop, so one worker thread owns the engine while the loop only moves events. The
number of admitted requests (running + waiting) is bounded, so a burst gets fast 429s instead of
unbounded latency; a request whose client has gone is cancelled and gives back its slot at once,
and the worker stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeprism.api import Engine
from edgeprism.errors import EdgeprismError, EngineClosedError
from edgeprism.server.errors import QueueFullError
from edgeprism.streaming import Completion, OnToken, TextStream

log = logging.getLogger(__name__)

EventKind = Literal["piece", "done", "error"]
Event = tuple[EventKind, Any]  # ("piece", str) | ("done", Completion) | ("error", Exception)
StartStream = Callable[[OnToken | None], TextStream]


class Job:
    """One admitted request. Its events go from the worker thread to the event loop's queue."""

    def __init__(self, start: StartStream, loop: asyncio.AbstractEventLoop, streaming: bool) -> None:
        self.start, self.streaming = start, streaming
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.released = False  # guarded by Scheduler._lock
        self._loop = loop
        self._stream: TextStream | None = None

    def emit(self, kind: EventKind, value: Any) -> None:
        """From the worker thread; a closed loop means nobody is listening any more."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:
            pass

    def attach(self, stream: TextStream) -> None:
        self._stream = stream
        if self.cancelled.is_set():  # cancel() ran before the stream existed
            stream.cancel()

    def cancel(self) -> None:
        self.cancelled.set()
        if self._stream is not None:
            self._stream.cancel()


@dataclass
class Counters:
    """Request and token counts since the server started (written by the worker and the loop)."""

    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0  # wall time the worker spent generating
    last_tokens_per_s: float | None = None
    engine: dict[str, Any] = field(default_factory=dict)  # engine.stats() after the last request


class Scheduler:
    """Admits up to `max_queue` waiting requests plus the running one; serves them in order."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.capacity = max_queue + 1
        self.counters = Counters(engine=engine.stats())
        self.running = False
        self._admitted = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._current: Job | None = None
        self._closing = False
        self._worker = threading.Thread(target=self._work, name="edgeprism-server-worker", daemon=True)
        self._worker.start()

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise QueueFullError when `capacity` requests are already admitted."""
        with self._lock:
            if self._admitted >= self.capacity:
                self.counters.rejected += 1
                raise QueueFullError(f"the server is busy: its queue is full ({self.capacity - 1} waiting behind "
                                     "the running request); retry in a moment.")
            self._admitted += 1
        self._queue.put(job)

    def abandon(self, job: Job) -> None:
        """The client has gone: stop the job at its next token and free its slot now."""
        job.cancel()
        self._release(job)

    def _release(self, job: Job) -> None:
        with self._lock:
            if not job.released:
                job.released = True
                self._admitted -= 1

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                final = self._serve(job)
            except Exception as e:  # never let one request kill the worker
                log.exception("request failed outside generation")
                final = ("error", e)
            # book-keeping first, the last event after: a client that has its answer sees the
            # server's counters and free slot already updated
            self._release(job)
            if final is not None:
                job.emit(*final)

    def _serve(self, job: Job) -> Event | None:
        """Run one job; its final event (None when the job was cancelled before it started)."""
        if job.cancelled.is_set():
            self.counters.cancelled += 1
            return None
        if self._closing:
            return "error", EngineClosedError("the server is shutting down.")
        self._current, self.running = job, True
        start = time.perf_counter()
        try:
            stream = job.start(self._forward(job) if job.streaming else None)
            job.attach(stream)
            completion = stream.run()
        except Exception as e:
            self._failed(e)
            return "error", e
        finally:
            self._current, self.running = None, False
            self.counters.engine = self.engine.stats()
        self._record(completion, time.perf_counter() - start)
        return "done", completion

    @staticmethod
    def _forward(job: Job) -> OnToken:
        return lambda piece: job.emit("piece", piece)

    def _failed(self, e: Exception) -> None:
        self.counters.failed += 1
        if isinstance(e, EdgeprismError):
            log.warning("request failed: %s", e)
        else:
            log.exception("request failed")

    def _record(self, c: Completion, seconds: float) -> None:
        k = self.counters
        k.prompt_tokens += c.prompt_tokens
        k.completion_tokens += c.completion_tokens
        k.busy_s += seconds
        k.last_tokens_per_s = c.completion_tokens / seconds if seconds > 0 else None
        if c.finish_reason == "cancelled":
            k.cancelled += 1
        else:
            k.completed += 1

    def close(self, timeout: float = 10.0) -> None:
        """Cancel the running request, drop the waiting ones and stop the worker."""
        self._closing = True
        current = self._current
        if current is not None:
            current.cancel()
        self._queue.put(None)
        self._worker.join(timeout)
