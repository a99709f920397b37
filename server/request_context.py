"""What the engine knows of the HTTP request it serves: its id (for log lines), its deadline, and whether its
client is still there. No torch and no HTTP here.

The middleware (server/telemetry.py) opens one context per request; FastAPI runs sync routes and streamed bodies in
worker threads with a copy of the caller's context variables, so the engine methods they call see it, and every job
they queue carries it to the engine thread. Outside a request (tests, scripts) a fresh context applies: a new id, no
deadline.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field

from .errors import DeadlineExceeded

MAX_ID_LENGTH = 128  # a longer X-Request-Id from the client is replaced, not truncated


@dataclass
class RequestContext:
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    timeout_s: float | None = None  # the server's limit; a request may lower it (limit_timeout)
    started: float = field(default_factory=time.monotonic)
    client_gone: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float | None:
        """time.monotonic() value past which the request's work is wasted."""
        return None if self.timeout_s is None else self.started + self.timeout_s

    def limit_timeout(self, seconds: float | None) -> None:
        """A request's own timeout lowers the server's, never raises it."""
        if seconds is not None:
            self.timeout_s = seconds if self.timeout_s is None else min(self.timeout_s, seconds)

    def expired(self) -> bool:
        deadline = self.deadline
        return deadline is not None and time.monotonic() >= deadline

    def deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request's deadline of {self.timeout_s:g} s passed before it was answered")


_current: ContextVar[RequestContext | None] = ContextVar("loraswap_request", default=None)


def current_request() -> RequestContext:
    """The context of the request being served in this thread, or a fresh one outside any request."""
    return _current.get() or RequestContext()


def open_request(context: RequestContext) -> None:
    """Make `context` current for this task (and the threads it starts): the middleware calls this per request."""
    _current.set(context)


def valid_request_id(value: str | None) -> str | None:
    """A client's X-Request-Id if it is safe to echo into headers and log lines (printable ASCII, bounded)."""
    if value and len(value) <= MAX_ID_LENGTH and value.isascii() and value.isprintable():
        return value
    return None


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record (`-` outside a request), for both log formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # the engine thread sets it from the job it serves
            context = _current.get()
            record.request_id = context.request_id if context is not None else "-"
        return True
