"""End-to-end tests of ``tfbackend serve``: a real server process on CPU, driven by the official OpenAI client.

One server is shared by the module (startup loads the model, ~10 s). Greedy decoding (temperature 0) makes
outputs comparable across requests; prompts are picked so the greedy choice is confident, because batching
changes float32 rounding slightly.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tfbackend.outputs import CompletionOutput, RequestOutput
from tfbackend.sampling_params import SamplingParams
from tfbackend.server.async_engine import AsyncEngine, EngineError
from tfbackend.server.metrics import ServerMetrics

API_KEY = "test-key"
MODEL = "smollm2"
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 120
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Server:
    url: str
    model_dir: Path

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (summed over label sets not pinned by ``labels``)."""
        text = httpx.get(f"{self.url}/metrics").text
        total, found = 0.0, False
        for line in text.splitlines():
            match = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
            if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
                total, found = total + float(match.group(2)), True
        assert found or labels, f"{name} missing from /metrics"
        return total

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Poll /metrics until no KV block is held; the engine thread updates it right after each step."""
        deadline = time.monotonic() + timeout
        while self.metric("tfbackend:kv_cache_blocks_used") != 0:
            assert time.monotonic() < deadline, "KV blocks still in use"
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[Server]:
    port = _free_port()
    command = [
        sys.executable, "-m", "tfbackend.entrypoints.cli", "serve", str(smollm2_dir),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "128MiB",
        "--served-model-name", MODEL, "--api-key", API_KEY,
    ]
    # A file, not a pipe: nobody reads the pipe while tests run, and a full pipe would block the server.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"server did not come up (exit code {proc.poll()}):\n{log.read()[-4000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            yield Server(url, smollm2_dir)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(server: Server):
    return AutoTokenizer.from_pretrained(server.model_dir)


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
    ],
)
def test_bad_requests_get_openai_errors(server: Server, path: str, body: str, status: int) -> None:
    response = httpx.post(
        f"{server.url}/v1/{path}", content=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
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
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leaving the block closes the connection with the body unread
    assert events == 3
    server.wait_idle(timeout=30)
    assert server.metric("tfbackend:requests_total", status="aborted") >= aborted_before + 1


def test_api_key_required_on_v1_only(server: Server) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


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
