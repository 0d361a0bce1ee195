"""Greedy runs of a multi-rank engine on CPU, for the parallelism tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tfbackend import LLM, SamplingParams
from tfbackend.kv_cache import KVCacheSpec

NEW_TOKENS = 12
PROMPT_LENGTHS = [5, 13, 30, 2]


def prompts_below(vocab: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def generate(
    model_dir: Path, prompts: list[list[int]], run_ahead: bool = False, **engine_options
) -> tuple[list[list[int]], list[KVCacheSpec]]:
    """Greedy tokens per prompt, and the KV cache layout of every rank (by rank).

    A batch of prompts in 4-token blocks with chunked prefill (24 tokens a step). ``run_ahead``: the engine
    queues each step before the previous one's tokens are known, as on a GPU; the other ranks then receive
    those tokens on the device group.
    """
    llm = LLM(str(model_dir), dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=24,
              max_model_len=128, **engine_options)
    try:
        llm.engine.run_ahead = run_ahead
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
        return [out.outputs[0].token_ids for out in outputs], llm.engine.worker.kv_specs
    finally:
        llm.engine.shutdown()
