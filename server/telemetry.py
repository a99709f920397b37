"""The request middleware: what every HTTP request goes through before and after its route.

- Its context (server/request_context.py): the request id (the client's X-Request-Id, or a new one), sent back in
  X-Request-Id and put on every log line; the server's deadline; and a watch on the connection, so the engine drops
  a request whose client went away.
- Draining (server/lifecycle.py): requests in flight are counted; once the server drains, new ones get 503.
- One log line and the per-adapter metrics: the middleware puts an empty `RequestRecord` into the request's state;
  inference routes take it (`RecordDep`) and fill in the adapter and token counts; when the answer has gone out, the
  middleware logs the line and, for inference requests, updates the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .lifecycle import ALWAYS_SERVED, Lifecycle
from .metrics import UNKNOWN_LABEL, Metrics
from .request_context import RequestContext, open_request, valid_request_id

log = logging.getLogger("server.requests")

STATE_KEY = "loraswap_record"
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer


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

    def __init__(self, app: ASGIApp, metrics: Metrics, lifecycle: Lifecycle, timeout_s: float | None):
        self.app = app
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent_id = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        context = RequestContext(valid_request_id(sent_id) or RequestContext().request_id, self.timeout_s)
        open_request(context)
        record = RequestRecord()
        scope.setdefault("state", {})[STATE_KEY] = record
        status = 500  # if the app fails before it answers
        answered = False  # the last byte of the body went out

        async def send_and_watch(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", context.request_id.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        started = time.perf_counter()
        probe = scope["path"] in ALWAYS_SERVED
        try:
            if self.lifecycle.draining and not probe:
                await self._refuse_draining(send_and_watch)
            elif probe:
                await self.app(scope, receive, send_and_watch)
            else:
                self.lifecycle.enter()
                try:
                    await self._watching_client(scope, receive, send_and_watch, context)
                finally:
                    self.lifecycle.leave()
        finally:
            seconds = time.perf_counter() - started
            if context.client_gone.is_set() and not answered:
                status = CLIENT_CLOSED  # a stream cut by its client says 200 on the wire: it was never answered
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
            log.log(
                logging.DEBUG if probe else logging.INFO,  # /health and /metrics polls would drown the rest
                "%s %s %d %.1f ms adapter=%s tokens=%d/%d",
                scope["method"], path, status, seconds * 1000, record.adapter, record.tokens_in, record.tokens_out,
                extra=fields,
            )

    async def _watching_client(self, scope: Scope, receive: Receive, send: Send, context: RequestContext) -> None:
        """Run the app; once it has read the request body, watch the connection: a disconnect sets
        `context.client_gone` (the engine then drops the request) and reaches the app as http.disconnect."""
        body_read = asyncio.Event()
        disconnected = asyncio.Event()

        def note(message: Message) -> Message:
            if message["type"] == "http.disconnect":
                context.client_gone.set()
                disconnected.set()
            elif message["type"] == "http.request" and not message.get("more_body", False):
                body_read.set()
            return message

        async def app_receive() -> Message:
            if body_read.is_set():  # the watcher reads the connection from now on
                await disconnected.wait()
                return {"type": "http.disconnect"}
            return note(await receive())

        async def watch() -> None:
            await body_read.wait()
            while not disconnected.is_set():
                note(await receive())

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, app_receive, send)
        finally:
            watcher.cancel()

    @staticmethod
    async def _refuse_draining(send: Send) -> None:
        body = json.dumps({"detail": "the server is shutting down; retry on another instance"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
