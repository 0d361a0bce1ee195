"""ASGI middleware that acts before a request body is parsed: the API key, and the body size limit.

Pure ASGI classes (not ``@app.middleware``) so that streaming responses still see client disconnects.
"""

from __future__ import annotations

import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tfbackend.server.errors import APIError

PUBLIC_PATHS = ("/health", "/metrics", "/version", "/docs", "/openapi.json", "/redoc")


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` on every route but the public ones, before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(PUBLIC_PATHS):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                error = APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                                 "authentication_error", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Answer 413 to a body over ``limit`` bytes, without reading (or keeping) more than that.

    A declared ``Content-Length`` over the limit is refused at once. A chunked body is read here up to the
    limit and handed on in one piece; the handler's later ``receive`` calls still see the disconnect.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await self._too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"the request body is larger than this server's limit of {self.limit} bytes",
                         code="request_too_large", headers={"Connection": "close"})
        await error.response()(scope, receive, send)
