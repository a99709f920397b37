"""A bound on every request body, applied while it streams in and before anything parses it (413 beyond).

Multipart uploads (adapters, fine-tuning files) have larger bounds of their own, checked by their routes' form
parsers as the parts arrive; every other body (JSON) is read here up to `max_body_bytes`, then handed to the app.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# (method, path) of the routes that bound their own (multipart) bodies; the value names their setting
OWN_BOUNDS = {("POST", "/adapters"): "max_upload_bytes", ("POST", "/v1/files"): "max_file_bytes"}


class BoundedBody:
    """Pure ASGI middleware: a declared Content-Length over the bound is refused before a byte is read; a body that
    streams past it is refused as soon as it does. The body read is replayed to the app unchanged."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, error_content: Callable[[str, str], dict]):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.error_content = error_content  # (path, message) -> the JSON body of the 413, in the route's shape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in OWN_BOUNDS:
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, f"the request body is {int(declared)} bytes, over the limit "
                               f"of {limit} (setting max_body_bytes)")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it as it would
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > limit:
                await self._refuse(scope, receive, send, f"the request body is over the limit of {limit} bytes "
                                   "(setting max_body_bytes)")
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        if chunks and chunks[-1]["type"] != "http.request":
            replay = [chunks[-1]]

        async def replayed() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        """413, and the connection closed: the rest of the body is never read."""
        response = JSONResponse(status_code=413, content=self.error_content(scope["path"], message),
                                headers={"Connection": "close"})
        await response(scope, receive, send)
