"""Offline batched generation with vLLM's interface: ``LLM(model).generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC

from tqdm import tqdm

from tfbackend.config import EngineConfig
from tfbackend.engine.llm_engine import LLMEngine
from tfbackend.outputs import RequestOutput
from tfbackend.sampling_params import SamplingParams

PromptType = str | dict | list[int]


class LLM:
    """Loads a model (native port or Transformers fallback) and generates for batches of prompts.

    Keyword arguments are those of ``EngineConfig`` (``model_impl``, ``dtype``, ``device``,
    ``block_size``, ``max_model_len``, ``max_num_seqs``, ``max_num_batched_tokens``,
    ``enable_prefix_caching``, ``kv_cache_memory``, ``gpu_memory_utilization``, ``seed``,
    ``tensor_parallel_size``, ``pipeline_parallel_size``, ...).
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **kwargs):
        """``config``: a complete EngineConfig (as the CLI builds it) instead of ``model`` and keywords."""
        if config is not None and (model is not None or kwargs):
            raise ValueError("pass either config or model and engine keywords, not both")
        self.engine = LLMEngine(config or EngineConfig(model=model, **kwargs))
        self._request_ids = itertools.count()

    @property
    def model_impl(self) -> str:
        return self.engine.model_impl

    @property
    def model_impl_reason(self) -> str:
        return self.engine.model_impl_reason

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        A prompt is a string, a ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}`` dict, or (in a list
        of prompts) a list of token ids.
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompt_list)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompt_list):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompt_list)} prompts")

        order: dict[str, int] = {}
        for index, (prompt, params) in enumerate(zip(prompt_list, params_list)):
            request_id = str(next(self._request_ids))
            order[request_id] = index
            self.engine.add_request(request_id, _prompt_input(prompt), params, stream=False)

        results: list[RequestOutput | None] = [None] * len(prompt_list)
        with tqdm(total=len(prompt_list), desc="generating", disable=not use_tqdm) as progress:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[order[output.request_id]] = output
                        progress.update(1)
        return results  # type: ignore[return-value]


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompt_list = list(prompts)
    if prompt_list and all(isinstance(p, int) for p in prompt_list):
        raise ValueError("pass token ids as {'prompt_token_ids': [...]}, not a bare list of ints")
    return prompt_list


def _prompt_input(prompt: PromptType) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    raise ValueError(f"unsupported prompt type {type(prompt).__name__}")
