"""The two workloads, and running them on tfbackend.

T1 (throughput): ``num_requests`` prompts of random token ids with lengths uniform in ``[input_min,
input_max]``, each generating exactly ``output_len`` tokens (EOS ignored), all submitted at once. T2
(latency): ``batch_size`` prompts of ``input_len`` tokens decoded together; time to first token and time per
decode step. Every run decodes greedily, as the HF peers do. Prompts are seeded; warm-up runs use other
prompts than measured ones, so the prefix cache never turns a measured prefill into a cache hit.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from tfbackend.llm import LLM
from tfbackend.sampling_params import SamplingParams, StructuredOutputsParams


@dataclass
class ThroughputWorkload:
    num_requests: int
    input_min: int
    input_max: int
    output_len: int
    seed: int

    def prompts(self, vocab_size: int, seed_offset: int = 0) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + seed_offset)
        lengths = rng.integers(self.input_min, self.input_max + 1, self.num_requests)
        return [rng.integers(0, vocab_size, n).tolist() for n in lengths]


@dataclass
class LatencyWorkload:
    batch_sizes: list[int]
    input_len: int
    output_len: int
    num_iters: int
    seed: int

    def prompts(self, batch_size: int, vocab_size: int, seed_offset: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, batch_size, seed_offset])
        return rng.integers(0, vocab_size, (batch_size, self.input_len)).tolist()


@dataclass
class ThroughputResult:
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s


@dataclass
class LatencyResult:
    batch_size: int
    ttft_s: float | None  # None where a peer cannot report it
    step_s: float  # one decode step: every sequence of the batch gains one token


def greedy(output_len: int, structured: StructuredOutputsParams | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, structured_outputs=structured)


def run_throughput(llm: LLM, workload: ThroughputWorkload, vocab_size: int,
                   structured: StructuredOutputsParams | None = None, warmup: bool = True) -> ThroughputResult:
    """``structured``: a grammar every request's output must follow (T1 with structured outputs); a grammar
    may end an output before ``output_len`` tokens, so only then are fewer tokens accepted. ``warmup=False``
    times the workload as the first one after startup (``bench --cold``)."""
    # Warm-up: as many prompts drawn the same way (other seed), a few tokens each, so every kind of step (long
    # prefill chunks, mixed steps, decode at every batch size) has run once before timing (and the grammar is
    # compiled).
    if warmup:
        llm.generate([{"prompt_token_ids": p} for p in workload.prompts(vocab_size, seed_offset=1)],
                     greedy(4, structured))
    prompts = workload.prompts(vocab_size)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(workload.output_len, structured),
                           use_tqdm=True)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if structured is None and produced != workload.num_requests * workload.output_len:
        raise RuntimeError(f"expected {workload.num_requests * workload.output_len} output tokens, got {produced}")
    return ThroughputResult(elapsed, len(prompts), sum(map(len, prompts)), produced)


def run_latency(llm: LLM, workload: LatencyWorkload, vocab_size: int) -> list[LatencyResult]:
    """Per batch size: one short warm-up, then the median of ``num_iters`` measured runs."""
    results = []
    for batch_size in tqdm(workload.batch_sizes, desc="latency", unit="batch size"):
        warmup = workload.prompts(batch_size, vocab_size, seed_offset=workload.num_iters)
        llm.generate([{"prompt_token_ids": p} for p in warmup], greedy(8))
        ttfts, steps = [], []
        for i in range(workload.num_iters):
            prompts = workload.prompts(batch_size, vocab_size, i)
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(workload.output_len))
            end = time.monotonic()
            first = [o.metrics["first_token_time"] for o in outputs]
            ttfts.append(statistics.mean(t - o.metrics["arrival_time"] for t, o in zip(first, outputs)))
            steps.append((end - max(first)) / (workload.output_len - 1))
        results.append(LatencyResult(batch_size, statistics.median(ttfts), statistics.median(steps)))
    return results
