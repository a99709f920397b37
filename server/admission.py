"""Admission control: a bound on the work the engine holds, so that a burst is refused at once (429 with
Retry-After) instead of queueing without limit. No torch here.

Two bounds, on what admitted requests still hold (queued or decoding): rows, and tokens (each row's prompt plus the
most it may generate, which is what its KV cache can grow to). A request that would cross either bound is refused,
unless nothing else is admitted (a lone request larger than a bound would otherwise never run; the encoder's own
limits bound it). The engine checks the gate before it loads an adapter (`check`: full already?) and reserves the
exact amount when it queues the job (`reserve`), so a refusal costs no model work; while the gate is full, the HTTP
edge refuses inference requests before it even parses them (server/api.py, `ShedWhenFull`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .errors import Overloaded


@dataclass
class Ticket:
    """What one admitted request holds; release() once its job is answered (idempotent)."""

    gate: AdmissionGate
    rows: int
    tokens: int
    released: bool = False

    def release(self, *_ignored: object) -> None:  # also a Future done-callback
        self.gate._release(self)


class AdmissionGate:
    def __init__(self, max_rows: int, max_tokens: int, retry_after_s: int = 1):
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.retry_after_s = retry_after_s
        self.rows = 0  # held by admitted requests
        self.tokens = 0
        self._lock = threading.Lock()

    def check(self) -> None:
        """Refuse at once if the engine is full already (before any work is done for the request)."""
        with self._lock:
            self._refuse_if_over(1, 1)

    def full(self) -> Overloaded | None:
        """The refusal any new request would get now, if the engine is full (the HTTP edge sheds load with it
        before it parses a request)."""
        try:
            self.check()
        except Overloaded as refusal:
            return refusal
        return None

    def reserve(self, rows: int, tokens: int) -> Ticket:
        with self._lock:
            self._refuse_if_over(rows, tokens)
            self.rows += rows
            self.tokens += tokens
        return Ticket(self, rows, tokens)

    def _refuse_if_over(self, rows: int, tokens: int) -> None:
        if self.rows == 0:
            return
        if self.rows + rows > self.max_rows:
            raise Overloaded(f"the server is full: {self.rows} rows in flight, at most {self.max_rows}; retry later",
                             self.retry_after_s)
        if self.tokens + tokens > self.max_tokens:
            raise Overloaded(f"the server is full: {self.tokens} tokens in flight, at most {self.max_tokens}; "
                             "retry later", self.retry_after_s)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if not ticket.released:
                ticket.released = True
                self.rows -= ticket.rows
                self.tokens -= ticket.tokens
