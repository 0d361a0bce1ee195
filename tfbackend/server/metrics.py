"""Prometheus metrics for ``GET /metrics``: ``tfbackend:`` names, and the same series under vLLM's ``vllm:`` names.

A vLLM Grafana dashboard or alert reads the ``vllm:`` series unchanged (``vllm:num_requests_running``,
``vllm:kv_cache_usage_perc``, ``vllm:time_to_first_token_seconds``, ...). The engine thread records everything
(it is the only place that sees every step's outputs); prometheus_client metrics are thread-safe, and a
private registry keeps two servers in one process (tests) from colliding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Mirrored:
    """One series recorded under two names: ours and vLLM's."""

    def __init__(self, children: list[Any]) -> None:
        self.children = children

    def labels(self, **labels: str) -> _Mirrored:
        return _Mirrored([child.labels(**labels) for child in self.children])

    def inc(self, amount: float = 1) -> None:
        for child in self.children:
            child.inc(amount)

    def set(self, value: float) -> None:
        for child in self.children:
            child.set(value)

    def observe(self, value: float) -> None:
        for child in self.children:
            child.observe(value)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        disable_created_metrics()  # process-wide; the *_created series only add noise to a scrape (vLLM does this too)
        self.registry = CollectorRegistry()
        self._labels = {"model_name": model_name}

        def make(kind: type, names: tuple[str, ...], doc: str, extra: tuple[str, ...] = (), **kwargs: Any
                 ) -> _Mirrored:
            metrics = _Mirrored([kind(name, doc, ["model_name", *extra], registry=self.registry, **kwargs)
                                 for name in names])
            return metrics if extra else metrics.labels(**self._labels)

        self._requests = make(Counter, ("tfbackend:requests",),
                              "Engine requests by outcome: finished, aborted, failed, rejected.", ("status",))
        self._finished = make(Counter, ("tfbackend:request_success", "vllm:request_success"),
                              "Finished completions by finish reason (stop, length).", ("finished_reason",))
        self._prompt_tokens = make(Counter, ("tfbackend:prompt_tokens", "vllm:prompt_tokens"),
                                   "Prompt tokens prefilled.")
        self._generation_tokens = make(Counter, ("tfbackend:generation_tokens", "vllm:generation_tokens"),
                                       "Tokens generated.")
        self._ttft = make(Histogram, ("tfbackend:time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
                          "Seconds from arrival to the first generated token.", buckets=_TTFT_BUCKETS)
        self._itl = make(Histogram, ("tfbackend:inter_token_latency_seconds", "vllm:inter_token_latency_seconds"),
                         "Seconds between a request's consecutive engine outputs.", buckets=_ITL_BUCKETS)
        self._e2e = make(Histogram, ("tfbackend:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"),
                         "Seconds from arrival to the end of a finished request.", buckets=_E2E_BUCKETS)
        self._request_prompt = make(Histogram, ("tfbackend:request_prompt_tokens", "vllm:request_prompt_tokens"),
                                    "Prompt tokens of each finished request.", buckets=_TOKEN_BUCKETS)
        self._request_generation = make(
            Histogram, ("tfbackend:request_generation_tokens", "vllm:request_generation_tokens"),
            "Generated tokens of each finished request.", buckets=_TOKEN_BUCKETS,
        )
        self._running = make(Gauge, ("tfbackend:num_requests_running", "vllm:num_requests_running"),
                             "Sequences in the running batch.")
        self._waiting = make(Gauge, ("tfbackend:num_requests_waiting", "vllm:num_requests_waiting"),
                             "Sequences queued for admission.")
        self._kv_used = make(Gauge, ("tfbackend:kv_cache_blocks_used",), "KV cache blocks held by requests.")
        self._kv_total = make(Gauge, ("tfbackend:kv_cache_blocks_total",), "KV cache blocks allocated at startup.")
        self._kv_usage = make(Gauge, ("vllm:kv_cache_usage_perc",), "KV-cache usage. 1 means 100 percent usage.")
        self._prefix_queries = make(Counter, ("tfbackend:prefix_cache_queries", "vllm:prefix_cache_queries"),
                                    "Tokens looked up in the prefix cache.")
        self._prefix_hits = make(Counter, ("tfbackend:prefix_cache_hits", "vllm:prefix_cache_hits"),
                                 "Tokens found in the prefix cache.")
        self._preemptions = make(Counter, ("tfbackend:num_preemptions", "vllm:num_preemptions"),
                                 "Sequences preempted for lack of KV blocks.")
        self._compilations = make(
            Gauge, ("tfbackend:compilations_after_ready",),
            "Compilations since the engine was ready, by kind (torch_compile, triton, cuda_graph); each stalled "
            "a step. Startup compiles everything serving needs, so this should stay 0.", ("kind",),
        )
        self._startup = make(Gauge, ("tfbackend:startup_seconds",), "Seconds each startup phase took, and the total.",
                             ("phase",))
        self._last_totals = (0, 0, 0)  # the engine's cumulative prefix queries, hits, preemptions already counted

    def request_done(self, status: str, count: int = 1) -> None:
        self._requests.labels(status=status, **self._labels).inc(count)

    def completion_finished(self, finish_reason: str) -> None:
        self._finished.labels(finished_reason=finish_reason, **self._labels).inc()

    def request_finished(self, seconds: float, prompt_tokens: int, generation_tokens: int) -> None:
        self._e2e.observe(seconds)
        self._request_prompt.observe(prompt_tokens)
        self._request_generation.observe(generation_tokens)

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
        self._kv_usage.set(stats.num_kv_blocks_used / stats.num_kv_blocks_total if stats.num_kv_blocks_total else 0.0)
        totals = (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions)
        for counter, now, before in zip((self._prefix_queries, self._prefix_hits, self._preemptions), totals,
                                        self._last_totals):
            if now > before:
                counter.inc(now - before)
        self._last_totals = totals
        compiled = stats.compilations_after_ready
        for kind, count in (("torch_compile", compiled.torch_compile_graphs), ("triton", compiled.triton_kernels),
                            ("cuda_graph", compiled.cuda_graphs)):
            self._compilations.labels(kind=kind, **self._labels).set(count)
        for phase, seconds in stats.startup_seconds.items():
            self._startup.labels(phase=phase, **self._labels).set(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
