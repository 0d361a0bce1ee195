"""Compiling before ready: one run of every step shape class serving will meet, at startup.

A kernel compiles the first time it meets a new specialization, and a step that meets one stalls for it (a
Triton attention variant takes a second or more; the first request of a new size then waits that long). The
specializations depend on a few features of a step, never on its exact sizes: the compiled forward is dynamic
in the token count; the attention kernel's variant depends on its tile size (a power-of-two tier of the
longest query times the GQA group), on whether every query fits one tile, and on whether keys are split
across programs (few programs for the GPU, long contexts); the MoE kernels' tiles on tokens per expert; the
sampler's path on the sampling features in use. Per-step integers are not specialized (the kernels say so).

So the warm-up runs, for every query length of a ladder (powers of two and one past them, which lands in each
tier whatever the group size): the query alone from position 0 (a short context: no split), the same query
after a long context (the fewest programs: split-KV when any step of this tier would split), and as many such
queries as the step budget holds (the most programs: no split); then decode-only steps, alone after a long
context and a full batch. A lone sequence samples with every sampling feature, the sequences of a batch
greedily (the sampler compiles nothing, so one use of each path suffices, and a batch's penalty counts would
take memory the profile run did not measure).

Every sequence's block table points at block 0 of the real KV cache: the writes are garbage that no request
reads (a sequence writes its own keys before attending to them), as in the memory profile run.

On a GPU a cold start's warm-up spends most of its time compiling Triton kernels, one after the other as the
steps meet them. ``compile_ahead`` first runs the steps' forward passes with Triton launches that only queue
their compilation on a thread pool (``kernels.launch.compiling_ahead``; no sampling: the logits are garbage
then), so the steps proper find every kernel compiled.
"""

from __future__ import annotations

import logging
import time

import torch

from tfbackend.engine.model_runner import ModelRunner, flatten_step
from tfbackend.engine.scheduler import ScheduledBatch
from tfbackend.engine.sequence import Sequence
from tfbackend.kernels.launch import compile_threads, compiling_ahead
from tfbackend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# A sequence's shape in a warm-up step: (query tokens this step, tokens already in its context).
SequenceShape = tuple[int, int]

# Every sampler path at once: penalties, logit bias, temperature, top-k, top-p, min-p, a seed, logprobs.
_ALL_SAMPLING_FEATURES = SamplingParams(
    temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.1, presence_penalty=0.1,
    frequency_penalty=0.1, logit_bias={0: 1.0}, seed=0, logprobs=2, max_tokens=1,
)
_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)
# The context before the "long context" shapes: long enough to split keys across the most partitions.
_LONG_CONTEXT = 4096


def query_length_ladder(max_query_len: int) -> list[int]:
    """2, 3, 4, 5, 8, 9, ... up to ``max_query_len``, which is included."""
    lengths = {max_query_len}
    power = 2
    while power <= max_query_len:
        lengths.update(length for length in (power, power + 1) if length <= max_query_len)
        power *= 2
    return sorted(lengths)


def warmup_shapes(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> list[list[SequenceShape]]:
    """The warm-up steps, each a list of sequence shapes (see the module docstring)."""
    steps: list[list[SequenceShape]] = []
    max_query = min(max_num_batched_tokens, max_model_len)
    for query in query_length_ladder(max_query):
        steps.append([(query, 0)])
        long_context = min(_LONG_CONTEXT, max_model_len - query)
        if long_context > 0:
            steps.append([(query, long_context)])
        count = min(max_num_seqs, max_num_batched_tokens // query)
        if count > 1:
            steps.append([(query, 0)] * count)
    if max_model_len > 1:
        steps.append([(1, min(_LONG_CONTEXT, max_model_len - 1))])
    steps.append([(1, 0)] * min(max_num_seqs, max_num_batched_tokens))
    return steps


def first_steps(max_num_seqs: int) -> list[list[SequenceShape]]:
    """A short prefill alone (every sampling feature) and a decode of two sequences: what an eager engine runs
    before ready so that its first request does not pay the process's first-step costs."""
    return [[(2, 0)], [(1, 0)] * min(2, max_num_seqs)]


def run_warmup(runner: ModelRunner, shapes: list[list[SequenceShape]], block_size: int,
               compile_ahead: bool = False) -> None:
    """Run every step of ``shapes`` through ``runner`` (eagerly: it must have no CUDA graphs); with
    ``compile_ahead``, after a first pass that compiles their Triton kernels on several threads."""
    if compile_ahead:
        _compile_ahead(runner, shapes, block_size)
    for step in shapes:
        runner.execute(_batch(step, block_size, runner.device))
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)


def _compile_ahead(runner: ModelRunner, shapes: list[list[SequenceShape]], block_size: int) -> None:
    """The steps' forward passes, with every Triton launch only compiling (see the module docstring). A failure
    here costs only the head start: the steps proper compile whatever is missing, one by one."""
    started, threads = time.perf_counter(), compile_threads()
    try:
        with compiling_ahead(threads):
            for step in shapes:
                runner.run_model(flatten_step(_batch(step, block_size, runner.device), block_size))
    except Exception as error:  # noqa: BLE001 - the warm-up proper still compiles everything it meets
        logger.warning("compiling the warm-up's Triton kernels ahead failed (%s: %s); they compile one by one",
                       type(error).__name__, error)
        return
    logger.info("warm-up: Triton kernels compiled ahead on %d threads in %.2f s", threads,
                time.perf_counter() - started)


def _batch(step: list[SequenceShape], block_size: int, device: torch.device) -> ScheduledBatch:
    """A warm-up step's batch: a lone sequence samples with every sampling feature, a batch's greedily."""
    params = _ALL_SAMPLING_FEATURES if len(step) == 1 else _GREEDY
    seqs = [_sequence(i, query, context, params, block_size, device) for i, (query, context) in enumerate(step)]
    return ScheduledBatch(seqs, [query for query, _ in step])


def _sequence(
    index: int, query: int, context: int, params: SamplingParams, block_size: int, device: torch.device
) -> Sequence:
    length = context + query
    seq = Sequence(index, "warmup", 0, [0] * length, length, params, num_computed_tokens=context)
    seq.block_table = [0] * -(-length // block_size)
    if params.seed is not None:
        seq.generator = torch.Generator(device=device).manual_seed(params.seed)
    return seq
