"""Prometheus metrics for ``GET /metrics``, named after vLLM's with a ``tfbackend:`` prefix.

The engine thread records everything (it is the only place that sees every step's outputs); prometheus_client
metrics are thread-safe, and a private registry keeps two servers in one process (tests) from colliding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

if TYPE_CHECKING:
    from tfbackend.engine.llm_engine import EngineStats

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        disable_created_metrics()  # process-wide; the *_created series only add noise to a scrape (vLLM does this too)
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, ["model_name", *extra], registry=self.registry)

        self._requests = counter(
            "tfbackend:requests", "Engine requests by outcome: finished, aborted, failed, rejected.", ("status",)
        )
        self._finished = counter(
            "tfbackend:request_success", "Finished completions by finish reason (stop, length).", ("finished_reason",)
        )
        self._prompt_tokens = counter("tfbackend:prompt_tokens", "Prompt tokens prefilled.").labels(**labels)
        self._generation_tokens = counter("tfbackend:generation_tokens", "Tokens generated.").labels(**labels)
        self._ttft = Histogram(
            "tfbackend:time_to_first_token_seconds", "Seconds from arrival to the first generated token.",
            ["model_name"], buckets=_TTFT_BUCKETS, registry=self.registry,
        ).labels(**labels)
        self._itl = Histogram(
            "tfbackend:inter_token_latency_seconds", "Seconds between a request's consecutive engine outputs.",
            ["model_name"], buckets=_ITL_BUCKETS, registry=self.registry,
        ).labels(**labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["model_name"], registry=self.registry).labels(**labels)

        self._running = gauge("tfbackend:num_requests_running", "Requests in the running batch.")
        self._waiting = gauge("tfbackend:num_requests_waiting", "Requests queued for admission.")
        self._kv_used = gauge("tfbackend:kv_cache_blocks_used", "KV cache blocks held by requests.")
        self._kv_total = gauge("tfbackend:kv_cache_blocks_total", "KV cache blocks allocated at startup.")
        self._prefix_queries = gauge("tfbackend:prefix_cache_queries", "Tokens looked up in the prefix cache.")
        self._prefix_hits = gauge("tfbackend:prefix_cache_hits", "Tokens found in the prefix cache.")
        self._preemptions = gauge("tfbackend:num_preemptions", "Sequences preempted for lack of KV blocks.")
        self._labels = labels

    def request_done(self, status: str, count: int = 1) -> None:
        self._requests.labels(status=status, **self._labels).inc(count)

    def completion_finished(self, finish_reason: str) -> None:
        self._finished.labels(finished_reason=finish_reason, **self._labels).inc()

    def prompt_tokens(self, count: int) -> None:
        self._prompt_tokens.inc(count)

    def generation_tokens(self, count: int) -> None:
        self._generation_tokens.inc(count)

    def time_to_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token_latency(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def engine_stats(self, stats: EngineStats) -> None:
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._kv_used.set(stats.num_kv_blocks_used)
        self._kv_total.set(stats.num_kv_blocks_total)
        self._prefix_queries.set(stats.prefix_cache_queries)
        self._prefix_hits.set(stats.prefix_cache_hits)
        self._preemptions.set(stats.num_preemptions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
