"""OpenAI wire format: request bodies (pydantic) and the JSON shapes of responses and stream chunks.

Field names and defaults follow OpenAI's API, plus vLLM's sampling extras (``top_k``, ``min_p``, ...).
Range checks live in SamplingParams, not here, so the server and the Python API reject the same values
with the same messages. Unknown fields are ignored, as OpenAI clients send fields we do not implement.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, field_validator

from tfbackend.outputs import CompletionOutput, Logprob
from tfbackend.sampling_params import SamplingParams

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs



class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by both endpoints."""

    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ValueError for out-of-range values (the server answers 400)."""
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}")
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_error_for_prompt(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """Replace pydantic's one error per union member ("prompt.str: ...") with one readable message."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of token id lists")

    def prompts(self) -> list[str | list[int]]:
        """One engine prompt per entry: a string, or a list of token ids."""
        prompt = self.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not prompts:
            raise ValueError("prompt must not be empty")
        return prompts

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def to_template(self) -> dict[str, str]:
        """The dict chat templates expect; ``developer`` is OpenAI's newer name for ``system``."""
        content = self.content
        text = "".join(part.text for part in content) if isinstance(content, list) else content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


# ------------------------------------------------------------------------------------------- responses


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_text(token_id: int, logprob: Logprob) -> str:
    """The engine decodes each token when the model has a tokenizer; without one, the id stands in."""
    return logprob.decoded_token if logprob.decoded_token is not None else str(token_id)


def _top(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(((tid, lp) for tid, lp in entries.items() if lp.rank <= k), key=lambda item: item[1].rank)[:k]


def completion_logprobs(
    completion: CompletionOutput, start: int, end: int, k: int, text_offset: int
) -> dict:
    """Legacy completions shape for tokens ``[start, end)``: parallel lists of tokens and their logprobs."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entries in zip(completion.token_ids[start:end], completion.logprobs[start:end], strict=True):
        text = _token_text(token_id, entries[token_id])
        tokens.append(text)
        token_logprobs.append(entries[token_id].logprob)
        top_logprobs.append({_token_text(tid, lp): lp.logprob for tid, lp in _top(entries, k)})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(completion: CompletionOutput, start: int, end: int, k: int) -> dict:
    """Chat shape for tokens ``[start, end)``: one entry per token with its top alternatives."""

    def entry(token_id: int, logprob: Logprob) -> dict:
        text = _token_text(token_id, logprob)
        return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode())}

    content = []
    for token_id, entries in zip(completion.token_ids[start:end], completion.logprobs[start:end], strict=True):
        item = entry(token_id, entries[token_id])
        item["top_logprobs"] = [entry(tid, lp) for tid, lp in _top(entries, k)]
        content.append(item)
    return {"content": content}
