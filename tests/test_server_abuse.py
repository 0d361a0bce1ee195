"""The server under abuse: a schema fuzzer on every route, 4x overload, a full queue, SIGTERM mid-request.

A tiny random model with the default model's tokenizer runs these (milliseconds per step), with a small batch
and queue (``--max-num-seqs 2 --max-queued-requests 4``) so overload is cheap to reach.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.server_process import Server, serve
from tfbackend.outputs import RequestOutput
from tfbackend.server.app import build_app
from tfbackend.server.async_engine import AsyncEngine
from tfbackend.server.chat_template import ChatRenderer
from tfbackend.server.metrics import ServerMetrics
from tfbackend.server.state import ServerState
from tfbackend.tool_parsers import HermesToolParser

MAX_NUM_SEQS, MAX_QUEUED = 2, 4
FUZZ_EXAMPLES = 8  # per route and generation mode (valid and invalid bodies): bounded, and seeded


@pytest.fixture(scope="module")
def server(tiny_text_model: Path):
    flags = ["--max-model-len", "128", "--kv-cache-memory", "16MiB", "--drain-timeout", "0",
             "--max-num-seqs", str(MAX_NUM_SEQS),
             "--max-queued-requests", str(MAX_QUEUED), "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with serve(tiny_text_model, *flags) as server:
        yield server


def _operations(server: Server) -> list:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_fuzzing_every_route_finds_no_server_error(server: Server) -> None:
    statuses: collections.Counter = collections.Counter()
    operations = _operations(server)
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /v1/models/{model_id}",
        "POST /tokenize", "POST /detokenize", "GET /health", "GET /version", "GET /metrics"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case) -> None:
                response = case.call(base_url=server.url, timeout=60)
                statuses[response.status_code] += 1
                assert response.status_code < 500, (case.path, case.body, response.text[:500])

            try:
                call()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # a route without inputs has no invalid input
    assert statuses[200] > 0 and statuses[400] > 0  # the fuzzer reached both the engine and the checks
    server.wait_idle()
    assert "Traceback" not in server.log_text()


def test_overload_ends_in_answers_or_429_and_frees_every_block(server: Server) -> None:
    capacity = MAX_NUM_SEQS + MAX_QUEUED
    outcomes: collections.Counter = collections.Counter()

    def one(i: int) -> None:
        body = {"prompt": f"Request {i}:", "max_tokens": 48, "ignore_eos": True, "stream": i % 2 == 0}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        outcomes[response.status_code] += 1
        if response.status_code == 429:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["error"]["type"] == "rate_limit_error"

    with ThreadPoolExecutor(4 * capacity) as pool:  # 4x what the server runs and queues
        list(pool.map(one, range(4 * capacity)))
    assert set(outcomes) <= {200, 429, 503}, outcomes
    assert outcomes[200] >= capacity and outcomes[429] > 0, outcomes
    server.wait_idle()
    assert server.metric("tfbackend:num_requests_waiting") == 0


def test_queue_full_gets_429_then_recovers(server: Server) -> None:
    # Fill the batch and the queue with long requests, then one more asks: refused, with Retry-After.
    long = {"prompt": "Once", "max_tokens": 120, "ignore_eos": True, "n": 2}
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(httpx.post, f"{server.url}/v1/completions", json=long, timeout=120) for _ in range(3)]
        deadline = time.monotonic() + 30
        while server.metric("tfbackend:num_requests_waiting") < MAX_QUEUED:
            assert time.monotonic() < deadline, "the queue never filled"
            time.sleep(0.05)
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        too_big = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "n": MAX_NUM_SEQS + MAX_QUEUED + 1},
                             timeout=30)
        assert too_big.status_code == 400  # can never fit: not worth a retry
        assert [future.result().status_code for future in running] == [200, 200, 200]
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


class _DyingEngine:
    """An engine whose step raises a BaseException: the engine thread ends (no request may then hang)."""

    def add_request(self, request_id: str, prompt: list[int], params) -> None:
        pass

    def abort_request(self, request_id: str) -> None:
        pass

    def step(self) -> list[RequestOutput]:
        raise SystemExit("engine thread killed")

    def stats(self):
        raise RuntimeError("no stats")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread's end
def test_health_says_not_ready_once_the_engine_loop_is_dead() -> None:
    state = ServerState(engine=AsyncEngine(_DyingEngine(), ServerMetrics("fake")), served_model_names=["fake"],
                        model_path="fake", max_model_len=64, tokenizer=None, vocab_size=100,
                        chat=ChatRenderer(None, None, HermesToolParser()), grammars=None)
    with TestClient(build_app(state)) as client:
        assert client.get("/health").status_code == 200
        response = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
        assert response.status_code == 503  # the step killed the loop: the request fails at once, not never
        health = client.get("/health")
        assert health.status_code == 503 and health.headers["Retry-After"] == "1"
        assert client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}).status_code == 503


def test_sigterm_ends_requests_in_flight_without_a_traceback(server: Server) -> None:
    """Last in this module: it stops the module's server (which runs with ``--drain-timeout 0``).

    Two requests run and four wait when the signal comes: those still in flight are ended at once, a
    non-streamed one with a 503, a streamed one with an error event and ``[DONE]``; the server exits in seconds.
    """
    results: list[tuple[bool, int, str]] = []

    def ask(stream: bool) -> None:
        body = {"prompt": "Once", "max_tokens": 120, "ignore_eos": True, "stream": stream}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
            results.append((stream, response.status_code, lines[-1]))

    clients = [threading.Thread(target=ask, args=(i % 2 == 0,)) for i in range(MAX_NUM_SEQS + MAX_QUEUED)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 30
    while server.metric("tfbackend:num_requests_waiting") < MAX_QUEUED:
        assert time.monotonic() < deadline, "the queue never filled"
        time.sleep(0.02)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=15)
    elapsed = time.monotonic() - started
    for client in clients:
        client.join()
    log = server.log_text()
    assert elapsed < 5, elapsed
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert len(results) == len(clients)
    for stream, status, last_line in results:
        if stream:
            assert status == 200 and last_line == "data: [DONE]"  # every stream ends properly
        else:
            assert status in (200, 503)
    assert any(status == 503 for stream, status, _ in results if not stream)  # the waiting ones were ended
