"""The two generation routes, from a parsed request body to a JSON answer or a stream of server-sent events.

Each request is checked in order of cost: fields and limits first (400), then the queue (an early 429), then
the CPU work (template, tokenization, grammar compilation) on a worker thread, so the event loop keeps
answering ``/health`` and other clients meanwhile; then the engine's own checks (400, or the exact 429).
Non-streamed requests are watched for a client disconnect like streamed ones: either way the engine request
is aborted and its KV blocks freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tfbackend.outputs import RequestOutput
from tfbackend.sampling_params import MAX_N, SamplingParams, StructuredOutputsParams
from tfbackend.server.async_engine import EngineError, QueueFull, RequestStream
from tfbackend.server.errors import APIError, bad_request
from tfbackend.server.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields, error_body
from tfbackend.server.responses import (
    ChatChoices,
    ChoiceProgress,
    Choices,
    CompletionChoices,
    cumulative_logprob,
    sse,
    usage,
)
from tfbackend.server.state import ServerState
from tfbackend.server.tools import plan_tools

T = TypeVar("T")
CLIENT_CLOSED = 499  # what the access log shows for a request whose client left (nginx's convention)


@dataclass
class PreparedPrompt:
    token_ids: list[int] | None  # None for a prompt too long to run: only counted, never turned into a list
    num_tokens: int
    text: str | None  # for echo


def check_model(state: ServerState, model: str | None) -> str:
    if model is not None and model not in state.served_model_names:
        raise APIError(404, f"The model `{model}` does not exist. Served: {', '.join(state.served_model_names)}",
                       param="model", code="model_not_found")
    return model or state.served_model_names[0]


def reject_unsupported(body: _SamplingFields) -> None:
    unsupported = body.unsupported()
    if unsupported:
        names = ", ".join(sorted(unsupported))
        raise APIError(400, f"not supported by this server: {names}", param=sorted(unsupported)[0])


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    model = check_model(state, body.model)
    reject_unsupported(body)
    prompts = bad_request(body.prompts)
    best_of = body.best_of
    if best_of is not None and best_of != body.n:
        if not body.n <= best_of <= MAX_N:
            raise APIError(400, f"best_of must be between n ({body.n}) and {MAX_N}, got {best_of}", param="best_of")
        if body.stream:
            raise APIError(400, "best_of cannot be combined with stream", param="best_of")
    else:
        best_of = None
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported: it needs the prompt tokens' logprobs", param="echo")
    structured = bad_request(body.structured_output_params)
    max_tokens = body.max_tokens if body.max_tokens is not None else state.generation_defaults.get("max_tokens", 16)
    # best_of ranks completions by cumulative logprob, so those runs need the sampled tokens' logprobs.
    engine_logprobs = (body.logprobs or 0) if best_of is not None else body.logprobs
    params = bad_request(lambda: body.sampling_params(max_tokens, engine_logprobs, state.generation_defaults,
                                                      structured))
    if best_of is not None:
        params = dataclasses.replace(params, n=best_of)
    _check_capacity(state, len(prompts) * params.n)
    prepared = await run_off_loop(state, _tokenize_prompts, state, prompts, body.add_special_tokens, body.echo,
                                  params.max_tokens)
    _check_context(state, prepared, params.max_tokens)
    await _compile(state, structured)
    choices = CompletionChoices(body.logprobs, [p.text or "" for p in prepared] if body.echo else None)
    return await _respond(state, request, model, body, prepared, params, choices, keep=body.n)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    model = check_model(state, body.model)
    reject_unsupported(body)
    tools = bad_request(lambda: plan_tools(body, state.tool_parser, state.enable_auto_tool_choice))
    structured = bad_request(body.structured_output_params)
    if structured is not None and tools.grammar is not None:
        raise APIError(400, "a structured output format cannot be combined with tool_choice required or a named "
                       "function, which constrain the output themselves", param="tool_choice")
    structured = structured or tools.grammar
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        max_tokens = state.generation_defaults.get("max_tokens")
    params = bad_request(lambda: body.sampling_params(max_tokens, body.requested_logprobs,
                                                      state.generation_defaults, structured))
    if tools.keep_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)
    _check_capacity(state, params.n)
    prepared = await run_off_loop(state, _render_chat, state, body, params.max_tokens)
    _check_context(state, [prepared], params.max_tokens)
    await _compile(state, structured)
    choices = ChatChoices(body.requested_logprobs if body.logprobs else None, tools.reader)
    return await _respond(state, request, model, body, [prepared], params, choices, keep=body.n)


# ---------------------------------------------------------------------------------------------- checks


def _check_capacity(state: ServerState, num_seqs: int) -> None:
    """A request bigger than the whole queue can never run (400); one that does not fit now, later (429)."""
    bound = state.engine.max_queued_seqs
    if bound is not None and num_seqs > bound + state.engine.max_running_seqs:
        raise APIError(400, f"this request asks for {num_seqs} sequences (prompts x n), more than this server runs "
                       f"and queues ({state.engine.max_running_seqs} + {bound}: --max-num-seqs, "
                       "--max-queued-requests)", param="n")
    if state.engine.queue_is_full(num_seqs):
        state.engine.metrics.request_done("rejected")
        raise QueueFull(f"the server is at capacity ({bound} sequences waiting); retry later")


def _check_context(state: ServerState, prompts: list[PreparedPrompt], max_tokens: int | None) -> None:
    """As vLLM: the prompt plus ``max_tokens`` must fit the context (without max_tokens, the prompt must)."""
    for prompt in prompts:
        needed = prompt.num_tokens + (max_tokens or 1)
        if needed > state.max_model_len:
            asked = f" and {max_tokens} in the completion" if max_tokens is not None else ""
            raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, "
                           f"you requested {needed} tokens ({prompt.num_tokens} in the prompt{asked}). "
                           "Reduce the length of the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")


async def run_off_loop(state: ServerState, fn: Any, *args: Any) -> Any:
    """Run template rendering and tokenization on a worker thread; its ValueErrors are the client's (400)."""
    try:
        return await state.run_blocking(fn, *args)
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


async def _compile(state: ServerState, structured: StructuredOutputsParams | None) -> None:
    """Compile the grammar off the event loop (a bad one is a 400 here); the engine then finds it cached."""
    if structured is not None:
        await run_off_loop(state, state.grammars.compile, structured)


def _tokenize_prompts(state: ServerState, prompts: list[str | list[int]], add_special_tokens: bool,
                      echo: bool, max_tokens: int | None) -> list[PreparedPrompt]:
    tokenizer = state.tokenizer
    prepared = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("this model has no tokenizer: send the prompt as token ids")
            prepared.append(_encode(state, prompt, add_special_tokens, max_tokens))
        else:
            if echo and tokenizer is None:
                raise ValueError("echo of a token-id prompt needs a tokenizer; this model has none")
            if any(not 0 <= token < state.vocab_size for token in prompt):
                raise ValueError(f"prompt token ids must be in [0, {state.vocab_size})")
            prepared.append(PreparedPrompt(prompt, len(prompt), tokenizer.decode(prompt) if echo else None))
    return prepared


def _render_chat(state: ServerState, body: ChatCompletionRequest, max_tokens: int | None) -> PreparedPrompt:
    text = state.chat.render(body.messages, body.tools, body.add_generation_prompt, body.continue_final_message,
                             body.chat_template_kwargs)
    return _encode(state, text, body.add_special_tokens, max_tokens)


def _encode(state: ServerState, text: str, add_special_tokens: bool, max_tokens: int | None) -> PreparedPrompt:
    """Tokenize ``text``; a prompt that cannot fit the context is only counted.

    With a fast tokenizer the Rust encoding is counted before its ids become a Python list: building a list
    of millions of ints holds the GIL long enough to stall the event loop, and is useless for a prompt that
    will be refused anyway.
    """
    backend = getattr(state.tokenizer, "backend_tokenizer", None)
    if backend is None:
        token_ids = state.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return PreparedPrompt(token_ids, len(token_ids), text)
    # encode_batch, unlike encode, releases the GIL while it works.
    encoding = backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
    fits = len(encoding) + (max_tokens or 1) <= state.max_model_len
    return PreparedPrompt(encoding.ids if fits else None, len(encoding), text)


# --------------------------------------------------------------------------------------------- running


async def _respond(state: ServerState, request: Request, model: str, body: _SamplingFields,
                   prompts: list[PreparedPrompt], params: SamplingParams, choices: Choices, keep: int) -> Response:
    """Run the prompts and answer with one JSON body or, for ``stream: true``, server-sent events.

    ``keep``: completions returned per prompt; fewer than ``params.n`` when best_of ranks extra ones away.
    """
    request_id = f"{choices.id_prefix}-{uuid.uuid4().hex}"
    engine_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
    try:
        stream = await state.engine.generate(engine_ids, [p.token_ids for p in prompts], params)
    except ValueError as exc:  # the engine's own checks of the prompt and parameters
        raise APIError(400, str(exc)) from exc
    header = {"id": request_id, "object": choices.object, "created": int(time.time()), "model": model,
              "system_fingerprint": state.system_fingerprint}
    if body.stream:
        events = _events(stream, choices, header, params.n, len(prompts), body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    final = await _unless_disconnected(request, _collect(stream))
    if final is None:
        return Response(status_code=CLIENT_CLOSED)
    answers = []
    for prompt_index in sorted(final):
        completions = final[prompt_index].outputs
        if keep < len(completions):  # best_of: the most likely completions, best first
            completions = sorted(completions, key=cumulative_logprob, reverse=True)[:keep]
        answers += [choices.choice(prompt_index * keep + i, prompt_index, c) for i, c in enumerate(completions)]
    return JSONResponse({**header, "choices": answers, "usage": _usage(final)})


async def _collect(stream: RequestStream) -> dict[int, RequestOutput]:
    async with stream:
        return {index: output async for index, output in stream}


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None once the client has disconnected (``work`` is then cancelled, which aborts
    its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled itself (server shutdown): take the work down with it
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # the client is gone: nobody to tell
        await task
    return None


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the request body was already read, so only the disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(outputs: dict[int, RequestOutput]) -> dict:
    prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs.values())
    completion_tokens = sum(len(c.token_ids) for output in outputs.values() for c in output.outputs)
    return usage(prompt_tokens, completion_tokens)


async def _events(stream: RequestStream, choices: Choices, header: dict, n: int, num_prompts: int,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per choice delta, a usage chunk if asked, then ``[DONE]``.

    Leaving this generator early (the client disconnected and Starlette cancelled it) exits ``async with
    stream``, which aborts the engine requests.
    """
    chunk_header = {**header, "object": choices.chunk_object}
    if include_usage:
        chunk_header["usage"] = None  # as OpenAI: every chunk but the last has "usage": null
    progress = {index: ChoiceProgress() for index in range(num_prompts * n)}
    last: dict[int, RequestOutput] = {}
    async with stream:
        try:
            for index in progress:
                if (opening := choices.opening(index)) is not None:
                    yield sse({**chunk_header, "choices": [opening]})
            async for prompt_index, output in stream:
                last[prompt_index] = output
                for completion in output.outputs:
                    index = prompt_index * n + completion.index
                    if progress[index].finished:
                        continue
                    delta = choices.delta(index, prompt_index, completion, progress[index])
                    if delta is not None:
                        yield sse({**chunk_header, "choices": [delta]})
                        progress[index].finished = completion.finished
            if include_usage:
                yield sse({**chunk_header, "choices": [], "usage": _usage(last)})
        except EngineError as exc:
            yield sse(error_body(str(exc), "server_error", code="500"))
    yield "data: [DONE]\n\n"
