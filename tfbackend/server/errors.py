"""Every error as OpenAI's error object, and the OpenAPI schema saying which statuses each route sends.

Every error a client can cause is a 4xx, never a 500: the official clients turn those into typed exceptions,
and a bad request must never look like a broken server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tfbackend.server.async_engine import EngineError, EngineUnavailable, QueueFull
from tfbackend.server.protocol import ErrorResponse, error_body

T = TypeVar("T")

# status -> description, for the OpenAPI schema (FastAPI would otherwise document a 422 nobody sends).
ERROR_STATUSES = {
    400: "Invalid request: OpenAI's error object says which field and why.",
    401: "Missing or wrong API key (when the server has one).",
    404: "Unknown model.",
    413: "Request body larger than --max-request-body-size.",
    429: "The waiting queue is full (--max-queued-requests); retry after the Retry-After header's seconds.",
    500: "The engine failed while running the request.",
    503: "The engine is not running (shutting down or failed); retry after the Retry-After header's seconds.",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def bad_request(fn: Callable[[], T]) -> T:
    """Run a request check whose ValueError is the client's fault (a 400)."""
    try:
        return fn()
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


def add_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    retry = {"Retry-After": str(retry_after_s)}

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI answers 422 with its own shape; OpenAI clients expect 400 and an error object."""
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", first.get("msg"))
            return APIError(400, f"the request body is not valid JSON: {reason}").response()
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        reason = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return APIError(400, f"{param or 'body'}: {reason}", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return APIError(429, str(exc), "rate_limit_error", code="queue_full", headers=retry).response()

    @app.exception_handler(EngineUnavailable)
    async def engine_unavailable(_: Request, exc: EngineUnavailable) -> JSONResponse:
        return APIError(503, str(exc), "server_error", code="engine_unavailable", headers=retry).response()

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return APIError(500, str(exc), "server_error").response()

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        """A bug of ours: still answer in OpenAI's shape (Starlette logs the traceback)."""
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()


def document_errors(app: FastAPI, statuses: dict[str, tuple[int, ...]]) -> None:
    """Make the OpenAPI schema list, per route, the error statuses it really sends (not FastAPI's 422).

    ``statuses``: route path -> its error statuses, on top of 500 that any route may send.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schemas["ErrorResponse"].pop("$defs", {}))
            for components in ("HTTPValidationError", "ValidationError"):
                schemas.pop(components, None)
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    responses = operation["responses"]
                    responses.pop("422", None)
                    for status in (*statuses.get(path, ()), 500):
                        responses[str(status)] = {
                            "description": ERROR_STATUSES[status],
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                        }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
