"""The FastAPI app: OpenAI-compatible routes over an AsyncEngine, plus /health and /metrics.

Every error a client can cause is answered with OpenAI's error object and a 4xx status, never a 500: the
official clients turn those into typed exceptions, and a bad request must never look like a broken server.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tfbackend.outputs import CompletionOutput, RequestOutput
from tfbackend.server import protocol
from tfbackend.server.async_engine import AsyncEngine, EngineError, Prompt, RequestStream
from tfbackend.server.metrics import CONTENT_TYPE
from tfbackend.server.protocol import ChatCompletionRequest, CompletionRequest

T = TypeVar("T")


@dataclass
class ServerState:
    engine: AsyncEngine
    served_model_names: list[str]  # the first one is reported in responses
    model_path: str
    max_model_len: int
    tokenizer: Any  # HF tokenizer or None
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(protocol.error_body(self.message, self.type, self.param, self.code), self.status)


def build_app(state: ServerState, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.shutdown()

    app = FastAPI(title="tfbackend", lifespan=lifespan)
    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.is_alive:
            return APIError(503, "the engine thread has stopped", "server_error").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        data = [
            {"id": name, "object": "model", "created": state.created, "owned_by": "tfbackend",
             "root": state.model_path, "max_model_len": state.max_model_len}
            for name in state.served_model_names
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        model = _check_model(state, body.model)
        prompts = _bad_request_on_value_error(body.prompts)
        return await _generate(state, model, body, prompts, _CompletionShape(body.logprobs))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        model = _check_model(state, body.model)
        prompt = _chat_prompt(state.tokenizer, body)
        k = (body.top_logprobs or 0) if body.logprobs else None
        return await _generate(state, model, body, [prompt], _ChatShape(k))

    return app


# ---------------------------------------------------------------------------------------------- helpers


def _check_model(state: ServerState, model: str | None) -> str:
    if model is not None and model not in state.served_model_names:
        raise APIError(404, f"The model `{model}` does not exist. Served: {', '.join(state.served_model_names)}",
                       param="model", code="model_not_found")
    return model or state.served_model_names[0]


def _bad_request_on_value_error(fn: Callable[[], T]) -> T:
    """Run a request-body check whose ValueError is the client's fault."""
    try:
        return fn()
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


def _chat_prompt(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    """Render the chat template and tokenize it without adding special tokens: the template already has them."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions")
    messages = [message.to_template() for message in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises its own TemplateError for conversations a template refuses
        raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from exc
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def _generate(
    state: ServerState,
    model: str,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[Prompt],
    shape: _Shape,
) -> Response:
    """Run the prompts and answer with one JSON body or, for ``stream: true``, server-sent events."""
    params = _bad_request_on_value_error(body.sampling_params)
    request_id = f"{shape.id_prefix}-{uuid.uuid4().hex}"
    try:
        stream = await state.engine.generate([f"{request_id}-{i}" for i in range(len(prompts))], prompts, params)
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    header = {"id": request_id, "object": shape.object, "created": int(time.time()), "model": model}
    if body.stream:
        events = _stream_events(stream, shape, header, params.n, len(prompts), body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async with stream:
        final: dict[int, RequestOutput] = {index: output async for index, output in stream}
    choices = [
        shape.choice(index * params.n + completion.index, completion)
        for index in sorted(final)
        for completion in final[index].outputs
    ]
    return JSONResponse({**header, "choices": choices, "usage": _usage(final)})


def _usage(outputs: dict[int, RequestOutput]) -> dict:
    prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs.values())
    completion_tokens = sum(len(c.token_ids) for output in outputs.values() for c in output.outputs)
    return protocol.usage(prompt_tokens, completion_tokens)


async def _stream_events(
    stream: RequestStream, shape: _Shape, header: dict, n: int, num_prompts: int, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per choice delta, a usage chunk if asked, then ``[DONE]``.

    Leaving this generator early (the client disconnected and Starlette cancelled it) exits ``async with
    stream``, which aborts the engine requests.
    """
    chunk_header = {**header, "object": shape.chunk_object}
    if include_usage:
        chunk_header["usage"] = None  # as OpenAI: every chunk but the last has "usage": null
    sent: dict[int, tuple[int, int]] = {}  # choice index -> (tokens, characters) already sent
    finished: set[int] = set()
    last: dict[int, RequestOutput] = {}
    async with stream:
        try:
            for index in range(num_prompts * n):
                if (opening := shape.opening(index)) is not None:
                    yield _sse({**chunk_header, "choices": [opening]})
            async for prompt_index, output in stream:
                last[prompt_index] = output
                for completion in output.outputs:
                    index = prompt_index * n + completion.index
                    tokens, chars = sent.get(index, (0, 0))
                    if index in finished or (len(completion.text) == chars and not completion.finished):
                        continue  # nothing new to show (e.g. the detokenizer holds back a partial character)
                    yield _sse({**chunk_header, "choices": [shape.delta(index, completion, tokens, chars)]})
                    sent[index] = (len(completion.token_ids), len(completion.text))
                    if completion.finished:
                        finished.add(index)
            if include_usage:
                yield _sse({**chunk_header, "choices": [], "usage": _usage(last)})
        except EngineError as exc:
            yield _sse(protocol.error_body(str(exc), "server_error", code="500"))
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------------------- shapes


class _Shape:
    """How one endpoint spells choices; the chat and legacy completions APIs differ only here."""

    id_prefix: str
    object: str
    chunk_object: str

    def __init__(self, top_logprobs: int | None) -> None:
        self.top_logprobs = top_logprobs  # None: no logprobs requested

    def opening(self, index: int) -> dict | None:
        """A chunk to send for each choice before any text, if the API has one."""
        return None

    def choice(self, index: int, completion: CompletionOutput) -> dict:
        raise NotImplementedError

    def delta(self, index: int, completion: CompletionOutput, tokens_sent: int, chars_sent: int) -> dict:
        raise NotImplementedError

    def _wants_logprobs(self, completion: CompletionOutput) -> bool:
        return self.top_logprobs is not None and completion.logprobs is not None


class _CompletionShape(_Shape):
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def choice(self, index: int, completion: CompletionOutput) -> dict:
        return self.delta(index, completion, 0, 0)

    def delta(self, index: int, completion: CompletionOutput, tokens_sent: int, chars_sent: int) -> dict:
        logprobs = None
        if self._wants_logprobs(completion):
            logprobs = protocol.completion_logprobs(
                completion, tokens_sent, len(completion.token_ids), self.top_logprobs, chars_sent
            )
        return {"index": index, "text": completion.text[chars_sent:], "logprobs": logprobs,
                "finish_reason": completion.finish_reason}


class _ChatShape(_Shape):
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def opening(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def choice(self, index: int, completion: CompletionOutput) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": self._logprobs(completion, 0), "finish_reason": completion.finish_reason}

    def delta(self, index: int, completion: CompletionOutput, tokens_sent: int, chars_sent: int) -> dict:
        return {"index": index, "delta": {"content": completion.text[chars_sent:]},
                "logprobs": self._logprobs(completion, tokens_sent), "finish_reason": completion.finish_reason}

    def _logprobs(self, completion: CompletionOutput, start: int) -> dict | None:
        if not self._wants_logprobs(completion):
            return None
        return protocol.chat_logprobs(completion, start, len(completion.token_ids), self.top_logprobs)


# ------------------------------------------------------------------------------------------------ errors


def _add_error_handlers(app: FastAPI) -> None:
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
        message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return APIError(500, str(exc), "server_error").response()

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        """A bug of ours: still answer in OpenAI's shape (Starlette logs the traceback)."""
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()


class _ApiKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` on ``/v1`` routes, before the body is even parsed.

    A pure ASGI middleware (not ``@app.middleware``) so streaming responses still see client disconnects.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                error = APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                                 "authentication_error", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
