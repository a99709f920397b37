"""One log line and the per-adapter metrics for every HTTP request.

The middleware puts an empty `RequestRecord` into the request's state; inference routes take it (`RecordDep`) and
fill in the adapter and token counts; when the answer has gone out, the middleware logs the line and, for inference
requests, updates the metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import UNKNOWN_LABEL, Metrics

log = logging.getLogger("server.requests")

STATE_KEY = "loraswap_record"


@dataclass
class RequestRecord:
    adapter: str | None = None  # metrics label; None: not an inference request (no per-adapter metrics)
    tokens_in: int = 0
    tokens_out: int = 0


def inference_record(request: Request) -> RequestRecord:
    """The request's record, marked as an inference request: it counts under UNKNOWN_LABEL until the route has
    resolved the adapter (FastAPI runs this before it validates the body, so invalid requests count too)."""
    record: RequestRecord = getattr(request.state, STATE_KEY)
    record.adapter = UNKNOWN_LABEL
    return record


RecordDep = Annotated[RequestRecord, Depends(inference_record)]


class RequestTelemetry:
    """Pure ASGI middleware (not BaseHTTPMiddleware), so that a streamed answer is timed to its last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord()
        scope.setdefault("state", {})[STATE_KEY] = record
        status = 500  # if the app fails before it answers

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            seconds = time.perf_counter() - started
            if record.adapter is not None:
                self.metrics.observe_request(record.adapter, status, seconds, record.tokens_in, record.tokens_out)
            path = scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
            fields = {
                "method": scope["method"],
                "path": path,
                "status": status,
                "latency_ms": round(seconds * 1000, 1),
                "adapter": record.adapter,
                "tokens_in": record.tokens_in,
                "tokens_out": record.tokens_out,
            }
            log.info(
                "%s %s %d %.1f ms adapter=%s tokens=%d/%d",
                scope["method"], path, status, seconds * 1000, record.adapter, record.tokens_in, record.tokens_out,
                extra=fields,
            )
