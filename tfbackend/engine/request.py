"""A request as the engine holds it, and the checks a request must pass before it is queued."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tfbackend.engine.sequence import Sequence
from tfbackend.sampling_params import SamplingParams
from tfbackend.structured_output import GrammarCompiler


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    stream: bool  # report progress every step, not only when finished
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


def validate_request(
    token_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int, has_tokenizer: bool,
    grammars: GrammarCompiler,
) -> None:
    """Raise ValueError, with a message meant for the user, if the request cannot run on this model.

    A structured-output constraint is compiled here (or found in the compiler's cache), so a bad schema is
    refused before any sequence is queued.
    """
    params.validate()
    if not token_ids:
        raise ValueError("the prompt is empty")
    if len(token_ids) >= max_model_len:
        raise ValueError(
            f"the prompt has {len(token_ids)} tokens, but this model's maximum context length is "
            f"{max_model_len} tokens (prompt and at least one generated token)"
        )
    if any(not 0 <= t < vocab_size for t in token_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
        raise ValueError(f"stop_token_ids must be in [0, {vocab_size})")
    if params.logprobs is not None and params.logprobs > vocab_size:
        raise ValueError(f"logprobs must be at most the vocabulary size {vocab_size}, got {params.logprobs}")
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer; this model has none")
    if params.logit_bias and any(not 0 <= t < vocab_size for t in params.logit_bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
    if params.structured_outputs is not None:
        grammars.compile(params.structured_outputs)
