"""End-to-end tests of ``tfbackend serve``: a real server process on CPU, driven by the official OpenAI client.

One server (the default model, ``smollm2_server`` in conftest.py) is shared by every tests/test_server*.py
module: startup loads the model, ~10 s. Greedy decoding (temperature 0) makes outputs comparable across
requests; prompts are picked so the greedy choice is confident, because batching changes float32 rounding.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.server_process import SERVER_API_KEY as API_KEY
from tests.server_process import SERVER_MAX_MODEL_LEN as MAX_MODEL_LEN
from tests.server_process import SERVER_MODEL as MODEL
from tests.server_process import Server
from tfbackend.outputs import CompletionOutput, RequestOutput
from tfbackend.sampling_params import SamplingParams
from tfbackend.server.async_engine import AsyncEngine, EngineError
from tfbackend.server.metrics import ServerMetrics

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(smollm2_server: Server) -> Server:
    return smollm2_server


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(server: Server):
    return AutoTokenizer.from_pretrained(server.model_dir)


def post(server: Server, path: str, body: dict | str | bytes, **kwargs) -> httpx.Response:
    """A raw POST (for bodies the OpenAI client would refuse to send)."""
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {**AUTH, "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=kwargs.pop("timeout", 60),
                      **kwargs)


def test_chat_answers_capital_of_france(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_models_lists_served_name(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]


def test_stream_equals_non_stream_and_usage_matches_tokenizer(client: openai.OpenAI, tokenizer) -> None:
    messages = [{"role": "user", "content": "Write a short story about a dragon who learns to bake."}]
    max_tokens = 12  # finishes with "length", so every counted token is text the tokenizer can re-encode
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True},
    ))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason == "length"

    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    completion_ids = tokenizer(streamed, add_special_tokens=False)["input_ids"]
    for usage in (usage_chunk.usage, full.usage):
        assert usage.prompt_tokens == len(prompt_ids)
        assert usage.completion_tokens == len(completion_ids) == max_tokens


def test_32_concurrent_requests(server: Server, client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4, 5,", "Monday, Tuesday, Wednesday,", "A, B, C, D, E,"]

    def complete(prompt: str) -> tuple[str, int]:
        response = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
        return response.choices[0].text, response.usage.completion_tokens

    alone = {prompt: complete(prompt) for prompt in prompts}
    with ThreadPoolExecutor(32) as pool:
        batched = list(pool.map(complete, [prompts[i % len(prompts)] for i in range(32)]))
    for i, result in enumerate(batched):
        assert result == alone[prompts[i % len(prompts)]]
    server.wait_idle()
    assert server.metric("tfbackend:num_requests_running") == 0


def test_completions_batch_of_prompts_with_n_and_logprobs(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL, prompt=["The capital of France is", "Hello"], n=2, max_tokens=3, logprobs=2, temperature=0
    )
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text  # greedy: both samples agree
    for choice in response.choices:
        logprobs = choice.logprobs
        assert "".join(logprobs.tokens) == choice.text
        assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
        assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert response.usage.completion_tokens == 12

    token_ids = [[504, 3575, 282], [19556]]
    by_ids = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=2, temperature=0)
    assert len(by_ids.choices) == 2 and by_ids.usage.prompt_tokens == 4


def test_chat_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy picks the most likely token
        assert bytes(entry.bytes).decode() == entry.token


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("completions", "{not json", 400),
        ("completions", '{"prompt": "hi", "max_tokens": "many"}', 400),
        ("completions", '{"prompt": "hi", "max_tokens": -5}', 400),
        ("completions", '{"prompt": "hi", "temperature": -1}', 400),
        ("completions", '{"prompt": ' + json.dumps("hello " * MAX_MODEL_LEN) + "}", 400),
        ("completions", '{"prompt": [99999999]}', 400),
        ("completions", '{"prompt": "hi", "model": "no-such-model"}', 404),
        ("chat/completions", '{"messages": [{"role": "wizard", "content": "hi"}]}', 400),
        ("completions", '{"prompt": ["hi", [1, 2]]}', 400),
        ("chat/completions", '{"messages": "hi"}', 400),
        # Found by trying the server as an attacker would; each once answered 200, 500 or never.
        ("completions", '{"prompt": "hi", "n": 100000}', 400),
        ("completions", '{"prompt": "hi", "n": 1000000000000}', 400),
        ("completions", '{"prompt": "hi", "max_tokens": ' + str(MAX_MODEL_LEN) + "}", 400),  # prompt + it > context
        ("completions", '{"prompt": "hi", "temperature": 1e9}', 400),
        ("completions", '{"prompt": "hi", "temperature": Infinity}', 400),
        ("completions", '{"prompt": "hi", "temperature": NaN}', 400),
        ("completions", '{"prompt": "hi", "seed": ' + str(2**70) + "}", 400),
        ("completions", '{"prompt": "\\ud800 lone surrogate"}', 400),
        ("chat/completions", '{"messages": [{"role": "user", "content": "hi \\udfff"}]}', 400),
        ("completions", '{"prompt": "hi", "suffix": "bye"}', 400),
        ("completions", '{"prompt": "hi", "n": 3, "best_of": 2}', 400),
        ("completions", '{"prompt": "hi", "best_of": 3, "stream": true}', 400),
        ("completions", '{"prompt": "hi", "echo": true, "logprobs": 1}', 400),
        ("completions", '{"prompt": "hi", "logit_bias": {"999999999": 5}}', 400),
        ("completions", '{"prompt": "hi", "logit_bias": {"hello": 5}}', 400),
        ("chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "audio": {"voice": "x"}}', 400),
        ("chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}', 400),
        ("chat/completions",
         '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', 400),
        ("chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}', 400),
    ],
)
def test_bad_requests_get_openai_errors(server: Server, path: str, body: str, status: int) -> None:
    response = post(server, f"/v1/{path}", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and set(error) == {"message", "type", "param", "code"}


def test_server_survives_bad_requests(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_mid_stream_frees_blocks(server: Server) -> None:
    aborted_before = server.metric("tfbackend:requests_total", status="aborted")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leaving the block closes the connection with the body unread
    assert events == 3
    server.wait_idle(timeout=30)
    assert server.metric("tfbackend:requests_total", status="aborted") >= aborted_before + 1


def test_api_key_required_except_on_open_routes(server: Server) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "hi"}).status_code == 401
    for open_route in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{server.url}{open_route}").status_code == 200


def test_error_messages_name_the_problem(server: Server, client: openai.OpenAI) -> None:
    surrogate = post(server, "/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800"}]}')
    assert "messages.0.content contains a lone UTF-16 surrogate" in surrogate.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens") as error:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=MAX_MODEL_LEN)
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="n must be between 1 and 128"):
        client.completions.create(model=MODEL, prompt="hi", n=10**12)
    with pytest.raises(openai.BadRequestError, match="image_url.*text-only"):
        client.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="not supported by this server: suffix"):
        client.completions.create(model=MODEL, prompt="hi", suffix="bye")


def test_openapi_documents_the_400_it_sends(server: Server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "400" in responses and "422" not in responses
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "429" in schema["paths"]["/v1/completions"]["post"]["responses"]


def test_huge_body_gets_413_before_it_is_read(server: Server) -> None:
    body = b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}'  # over the default 8 MiB limit
    response = post(server, "/v1/completions", body)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]

    def chunked():  # no Content-Length: the server counts what arrives
        yield b'{"prompt": "'
        for _ in range(9):
            yield b"a" * 2**20
        yield b'"}'

    response = httpx.post(f"{server.url}/v1/completions", content=chunked(), headers=AUTH, timeout=60)
    assert response.status_code == 413


def test_health_answers_while_a_large_body_is_tokenized(server: Server) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 40000  # 1.8 MB, about 400k tokens: seconds of work
    result = {}

    def send() -> None:
        started = time.monotonic()
        result["response"] = post(server, "/v1/completions", {"prompt": text, "max_tokens": 1}, timeout=120)
        result["seconds"] = time.monotonic() - started

    sender = threading.Thread(target=send)
    sender.start()
    latencies = []
    with httpx.Client() as health:
        while sender.is_alive():
            started = time.monotonic()
            assert health.get(f"{server.url}/health", timeout=10).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    assert result["response"].status_code == 400  # far beyond the context, found only by tokenizing it
    assert "400002 tokens" in result["response"].json()["error"]["message"]
    assert result["seconds"] > 0.5 and len(latencies) >= 5
    assert statistics.quantiles(latencies, n=10)[-1] < 0.1, latencies  # 90% within 100 ms on a shared CPU
    assert max(latencies) < 1.0, latencies  # and never the seconds the tokenization takes


def test_non_streamed_disconnect_aborts_and_frees_blocks(server: Server) -> None:
    aborted_before = server.metric("tfbackend:requests_total", status="aborted")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "n": 3}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        post(server, "/v1/completions", body, timeout=1.5)
    server.wait_idle(timeout=30)
    assert server.metric("tfbackend:requests_total", status="aborted") >= aborted_before + 1
    assert server.metric("tfbackend:requests_total", status="finished") >= 1  # the server carries on


def test_vllm_utility_routes(server: Server, client: openai.OpenAI, tokenizer) -> None:
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")

    tokens = post(server, "/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()
    assert tokens["tokens"] == tokenizer("Hello world")["input_ids"] and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == MAX_MODEL_LEN and len(tokens["token_strs"]) == tokens["count"]
    chat_tokens = post(server, "/tokenize", {"messages": QUESTION}).json()["tokens"]
    assert chat_tokens == tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)["input_ids"]
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    assert post(server, "/detokenize", {"tokens": [10**9]}).status_code == 400


def test_stop_reason_and_system_fingerprint(client: openai.OpenAI) -> None:
    by_string = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                          stop=[" 6"])
    choice = by_string.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == " 6"
    assert choice.text.strip() == "5,"
    by_eos = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=60)
    assert by_eos.choices[0].finish_reason == "stop" and by_eos.choices[0].model_extra["stop_reason"] is None
    assert by_string.system_fingerprint and by_string.system_fingerprint == by_eos.system_fingerprint
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, stream=True))
    assert {chunk.system_fingerprint for chunk in chunks} == {by_string.system_fingerprint}


def test_echo_puts_the_prompt_first(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "The capital of France is" + plain.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt=[504, 3575, 282], max_tokens=4, temperature=0,
                                         echo=True, stream=True)
    text = "".join(chunk.choices[0].text for chunk in streamed)
    assert text.startswith("The capital of")


def test_logit_bias_steers_sampling(client: openai.OpenAI, tokenizer) -> None:
    forced = tokenizer(" banana", add_special_tokens=False)["input_ids"][-1]
    response = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3,
                                         temperature=0, logit_bias={str(forced): 100}, logprobs=0)
    assert response.choices[0].text == " banana" * 3
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0)
    greedy = tokenizer(plain.choices[0].text, add_special_tokens=False)["input_ids"][0]
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1,
                                       temperature=0, logit_bias={str(greedy): -100})
    assert banned.choices[0].text != plain.choices[0].text


def test_best_of_returns_the_most_likely_completions(client: openai.OpenAI) -> None:
    common = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=11, logprobs=0)
    every = client.completions.create(n=4, **common)  # the same four candidates best_of=4 draws (same seeds)
    ranked = sorted((sum(c.logprobs.token_logprobs), c.text) for c in every.choices)
    best = client.completions.create(n=2, best_of=4, **common)
    assert [c.text for c in best.choices] == [text for _, text in ranked[::-1][:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == 4 * 6  # every candidate was generated


def test_vllm_metric_names_alongside_ours(server: Server) -> None:
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count"):
        server.metric(name)
    assert server.metric("vllm:generation_tokens_total") == server.metric("tfbackend:generation_tokens_total") > 0


class _FlakyEngine:
    """An engine whose first step raises, to check that a failure costs its requests, not the loop."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.fail_next_step = True

    def add_request(self, request_id: str, prompt: str, params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        self.pending.append(request_id)

    def abort_request(self, request_id: str) -> None:
        if request_id in self.pending:
            self.pending.remove(request_id)

    def step(self) -> list[RequestOutput]:
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        done, self.pending = self.pending, []
        return [RequestOutput(rid, None, [1], [CompletionOutput(0, "ok", [7], "stop")], True) for rid in done]

    def stats(self) -> SimpleNamespace:
        waiting = len(self.pending)
        return SimpleNamespace(num_running=0, num_waiting=waiting, num_kv_blocks_used=0, num_kv_blocks_total=1)


def test_engine_failure_fails_its_requests_but_not_the_loop() -> None:
    async def scenario() -> None:
        engine = AsyncEngine(_FlakyEngine(), ServerMetrics("fake"))
        engine.start()
        try:
            with pytest.raises(ValueError, match="empty"):
                await engine.generate(["a"], [""], SamplingParams())
            stream = await engine.generate(["b"], ["x"], SamplingParams())
            with pytest.raises(EngineError, match="boom"):
                [item async for item in stream]
            stream = await engine.generate(["c"], ["x"], SamplingParams())
            assert [output.outputs[0].text for _, output in [item async for item in stream]] == ["ok"]
            assert engine.is_alive
        finally:
            engine.shutdown()

    asyncio.run(scenario())
