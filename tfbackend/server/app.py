"""The FastAPI app: OpenAI-compatible routes over an AsyncEngine, plus vLLM's utility routes.

``/v1/completions`` and ``/v1/chat/completions`` (``generation.py``), ``/v1/models[/{id}]``, ``/tokenize`` and
``/detokenize``, and the open ones: ``/health``, ``/metrics``, ``/version``. Request bodies over the size limit
are refused before they are read, the API key is checked before a body is parsed, and every error is OpenAI's
error object (``errors.py``).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tfbackend.server import generation
from tfbackend.server.errors import APIError, add_error_handlers, document_errors
from tfbackend.server.metrics import CONTENT_TYPE
from tfbackend.server.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware
from tfbackend.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from tfbackend.server.state import ServerState

DEFAULT_MAX_BODY_BYTES = 8 * 2**20

# Error statuses per route, for the OpenAPI schema (500 is added to every route).
_GENERATION_ERRORS = (400, 401, 404, 413, 429, 503)
_ROUTE_ERRORS = {
    "/v1/completions": _GENERATION_ERRORS,
    "/v1/chat/completions": _GENERATION_ERRORS,
    "/v1/models": (401,),
    "/v1/models/{model_id}": (401, 404),
    "/tokenize": (400, 401, 404, 413),
    "/detokenize": (400, 401, 404, 413),
    "/health": (503,),
}


def build_app(state: ServerState, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
              ) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.shutdown()
        state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tfbackend", version=_version(), lifespan=lifespan)
    # Added last = runs first: the size limit, then the key, before FastAPI reads a body.
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(BodySizeLimitMiddleware, limit=max_body_bytes)
    add_error_handlers(app, state.retry_after_s)
    document_errors(app, _ROUTE_ERRORS)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine loop runs, 503 once it has stopped."""
        if not state.engine.is_alive:
            raise APIError(503, "the engine loop has stopped", "server_error", code="engine_unavailable",
                           headers={"Retry-After": str(state.retry_after_s)})
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(state, name) for name in state.served_model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        generation.check_model(state, model_id)
        return _model_card(state, model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generation.create_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generation.create_chat_completion(state, body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
        """vLLM's route: a prompt, or chat messages through the template, to token ids."""
        generation.check_model(state, body.model)
        if state.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        token_ids = await generation.run_off_loop(state, _tokenize, state, body)
        token_strs = state.tokenizer.convert_ids_to_tokens(token_ids) if body.return_token_strs else None
        return {"count": len(token_ids), "max_model_len": state.max_model_len, "tokens": token_ids,
                "token_strs": token_strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        generation.check_model(state, body.model)
        if state.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if any(not 0 <= token < state.vocab_size for token in body.tokens):
            raise APIError(400, f"token ids must be in [0, {state.vocab_size})", param="tokens")
        return {"prompt": await generation.run_off_loop(state, state.tokenizer.decode, body.tokens)}

    return app


def _tokenize(state: ServerState, body: TokenizeCompletionRequest | TokenizeChatRequest) -> list[int]:
    if isinstance(body, TokenizeCompletionRequest):
        text = body.prompt
    else:
        text = state.chat.render(body.messages, body.tools, body.add_generation_prompt, body.continue_final_message,
                                 body.chat_template_kwargs)
    return state.tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"]


def _model_card(state: ServerState, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "tfbackend",
            "root": state.model_path, "parent": None, "max_model_len": state.max_model_len}


def _version() -> str:
    try:
        return importlib.metadata.version("tfbackend")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
