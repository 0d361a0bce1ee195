"""OpenAI's response shapes: choices and stream deltas of both endpoints, logprobs, usage, server-sent events.

The chat and legacy completions APIs differ only in how a choice and its deltas are spelled; each has a
``Choices`` class here. Streaming keeps a ``ChoiceProgress`` per choice: what was already sent, so each
chunk carries only what is new.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tfbackend.outputs import CompletionOutput, Logprob
from tfbackend.server.tools import ToolCallStream, ToolReader


@dataclass
class ChoiceProgress:
    """What one streamed choice has sent so far."""

    tokens: int = 0
    chars: int = 0
    opened: bool = False
    tool_stream: ToolCallStream | None = None
    finished: bool = False  # the chunk with the finish reason went out


class Choices:
    """How one endpoint spells choices; see the two subclasses."""

    id_prefix: str
    object: str
    chunk_object: str

    def __init__(self, top_logprobs: int | None) -> None:
        self.top_logprobs = top_logprobs  # None: no logprobs requested

    def opening(self, index: int) -> dict | None:
        """A chunk to send for each choice before any text, if the API has one."""
        return None

    def choice(self, index: int, prompt_index: int, completion: CompletionOutput) -> dict:
        raise NotImplementedError

    def delta(self, index: int, prompt_index: int, completion: CompletionOutput, progress: ChoiceProgress
              ) -> dict | None:
        """The next chunk's choice for ``completion`` (cumulative output so far); None if nothing is new."""
        raise NotImplementedError

    def _wants_logprobs(self, completion: CompletionOutput) -> bool:
        return self.top_logprobs is not None and completion.logprobs is not None


class CompletionChoices(Choices):
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, top_logprobs: int | None, echo: list[str] | None) -> None:
        """``echo``: per prompt, its text to put before the completion (``echo: true``)."""
        super().__init__(top_logprobs)
        self.echo = echo

    def choice(self, index: int, prompt_index: int, completion: CompletionOutput) -> dict:
        return self.delta(index, prompt_index, completion, ChoiceProgress())

    def delta(self, index: int, prompt_index: int, completion: CompletionOutput, progress: ChoiceProgress
              ) -> dict | None:
        text = completion.text[progress.chars:]
        if not progress.opened and self.echo is not None:
            text = self.echo[prompt_index] + text
        if not text and not completion.finished:
            return None  # nothing new to show (e.g. the detokenizer holds back a partial character)
        logprobs = None
        if self._wants_logprobs(completion):
            logprobs = completion_logprobs(completion, progress.tokens, len(completion.token_ids), self.top_logprobs,
                                           progress.chars)
        progress.tokens, progress.chars, progress.opened = len(completion.token_ids), len(completion.text), True
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason}


class ChatChoices(Choices):
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, top_logprobs: int | None, tools: ToolReader | None) -> None:
        """``tools``: reads tool calls out of the output (None: the output is all content)."""
        super().__init__(top_logprobs)
        self.tools = tools

    def opening(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def choice(self, index: int, prompt_index: int, completion: CompletionOutput) -> dict:
        message: dict = {"role": "assistant", "content": completion.text}
        finish_reason = completion.finish_reason
        if self.tools is not None:
            parsed = self.tools.parse(completion.text, final=True)
            if parsed.calls:
                message["content"] = parsed.content or None
                message["tool_calls"] = [
                    {"id": self.tools.new_call_id(), "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}
                    for call in parsed.calls
                ]
                finish_reason = self.tools.finish_reason(finish_reason)
        return {"index": index, "message": message, "logprobs": self._logprobs(completion, 0),
                "finish_reason": finish_reason, "stop_reason": completion.stop_reason}

    def delta(self, index: int, prompt_index: int, completion: CompletionOutput, progress: ChoiceProgress
              ) -> dict | None:
        finish_reason = completion.finish_reason
        if self.tools is None:
            text = completion.text[progress.chars:]
            delta: dict = {"content": text} if text else {}
        else:
            if progress.tool_stream is None:
                progress.tool_stream = ToolCallStream(self.tools)
            delta = progress.tool_stream.delta(completion.text, completion.finished)
            if completion.finished and progress.tool_stream.num_calls:
                finish_reason = self.tools.finish_reason(finish_reason)
        if not delta and not completion.finished:
            return None  # nothing to show yet; these tokens' logprobs go out with the next delta
        logprobs = self._logprobs(completion, progress.tokens)
        progress.tokens, progress.chars = len(completion.token_ids), len(completion.text)
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": completion.stop_reason}

    def _logprobs(self, completion: CompletionOutput, start: int) -> dict | None:
        if not self._wants_logprobs(completion):
            return None
        return chat_logprobs(completion, start, len(completion.token_ids), self.top_logprobs)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


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


def cumulative_logprob(completion: CompletionOutput) -> float:
    """The sum of the sampled tokens' logprobs (the completion must have been generated with logprobs)."""
    return sum(entries[token].logprob for token, entries in zip(completion.token_ids, completion.logprobs))

