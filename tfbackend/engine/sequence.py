"""A sequence being generated: its tokens, its KV blocks and its progress through the model."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tfbackend.outputs import SampleLogprobs
from tfbackend.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tfbackend.structured_output import SequenceGrammar


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion of a request (a request with ``n > 1`` owns ``n`` sequences).

    ``token_ids`` holds prompt and generated tokens. ``num_computed_tokens`` of them have their K/V in
    the cache; the scheduler feeds the rest, a chunk at a time. After preemption by recompute,
    ``num_computed_tokens`` drops to 0 and the generated tokens are prefilled again with the prompt.
    """

    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled
    num_preemptions: int = 0  # times preempted and sent back to be recomputed
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks of block_table already registered in the prefix cache
    generator: torch.Generator | None = None  # per-sequence RNG when the request has a seed
    grammar: SequenceGrammar | None = None  # where the output stands in its structured-output grammar
    output_text: str = ""
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    # Incremental detokenizer state: token offsets into token_ids.
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
