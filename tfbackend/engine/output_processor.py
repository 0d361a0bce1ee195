"""From sampled tokens to request outputs: appending, detokenizing, stop conditions, logprobs.

The engine hands every finished step here. Each sampled token is placed at the end of its sequence (over
its run-ahead placeholder, when the engine runs a step ahead), advances the sequence's structured-output
grammar if it has one, then is checked against EOS and stop ids, the grammar's end, stop strings (on the
incrementally decoded text), ``max_tokens`` and the context length. Streaming requests
get an output every step they progress; the others when all their sequences have finished.
"""

from __future__ import annotations

import logging
import time

from tfbackend.engine.detokenizer import Detokenizer, find_stop_string
from tfbackend.engine.model_runner import PendingStep
from tfbackend.engine.request import Request
from tfbackend.engine.scheduler import Scheduler
from tfbackend.engine.sequence import Sequence
from tfbackend.outputs import CompletionOutput, Logprob, RequestOutput
from tfbackend.structured_output import GrammarCompiler

logger = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int, scheduler: Scheduler,
                 grammars: GrammarCompiler):
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.scheduler = scheduler
        self.ended_seq_ids: list[int] = []  # finished since the engine last collected them
        self.grammars = grammars

    def start(self, seq: Sequence) -> None:
        """Prepare a new sequence's detokenizer state and, for structured outputs, its grammar matcher."""
        if self.detokenizer is not None:
            self.detokenizer.start(seq)
        if seq.params.structured_outputs is not None:
            seq.grammar = self.grammars.matcher(seq.params.structured_outputs)

    def process(self, pending: PendingStep, requests: dict[str, Request], replaces_placeholder: bool
                ) -> list[RequestOutput]:
        """Take a launched step's tokens (waiting for the device) and apply them to its sequences.

        ``replaces_placeholder``: each sequence already ends with a placeholder for this token (run-ahead).
        Requests that finish are removed from ``requests``.
        """
        sampled = pending.fetch()
        now = time.monotonic()
        progressed: dict[str, Request] = {}
        for row, seq in enumerate(pending.seqs):
            if seq.is_finished:  # finished or aborted while its step ran ahead
                continue
            token = sampled.token_ids[row]
            if replaces_placeholder:
                seq.token_ids[-1] = token
            else:
                seq.token_ids.append(token)
            request = requests[seq.request_id]
            self._accept_token(request, seq, token, sampled.logprobs[row], now)
            progressed[seq.request_id] = request
        outputs = []
        for request in progressed.values():
            if request.finished:
                del requests[request.request_id]
            if request.stream or request.finished:
                outputs.append(self.make_output(request))
        return outputs

    def _accept_token(self, request: Request, seq: Sequence, token: int, logprobs, now: float) -> None:
        """Bookkeeping for a token just placed at the end of ``seq``: timing, logprobs, stop conditions."""
        if seq.first_token_time is None:
            seq.first_token_time = now
        if logprobs is not None:
            seq.logprobs.append(self._logprob_dict(token, logprobs))
        if seq.grammar is not None and not seq.grammar.accept(token):  # only if the mask left no token
            logger.error("request %s: token %d is outside its grammar; ending the sequence", seq.request_id, token)
            return self._finish(seq, "abort", None)
        params = seq.params
        if token in params.stop_token_ids:
            return self._finish(seq, "stop", token)
        if token in self.eos_token_ids and not params.ignore_eos:
            return self._finish(seq, "stop", None)  # as vLLM: stop_reason names stop ids and strings, not EOS
        if seq.grammar is not None and seq.grammar.is_terminated:  # the grammar is complete (it ends with EOS)
            return self._finish(seq, "stop", None)
        if self.detokenizer is not None and (request.stream or params.stop):
            new_text = self.detokenizer.decode_new_tokens(seq)
            if params.stop and new_text:
                stop = find_stop_string(seq, len(new_text))
                if stop is not None:
                    return self._finish(seq, "stop", stop)
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or (
            seq.num_tokens >= self.max_model_len
        ):
            return self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        self.ended_seq_ids.append(seq.seq_id)
        if self.detokenizer is not None and not isinstance(stop_reason, str):
            self.detokenizer.decode_new_tokens(seq, final=True)  # the text not yet decoded, with its context

    def _logprob_dict(self, token: int, logprobs) -> dict[int, Logprob]:
        chosen, rank, top_ids, top_values = logprobs
        decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else (lambda t: None)
        result = {t: Logprob(v, r + 1, decode(t)) for r, (t, v) in enumerate(zip(top_ids, top_values))}
        if token not in result:
            result[token] = Logprob(chosen, rank, decode(token))
        return result

    def make_output(self, request: Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.index,
                text=visible_text(seq),
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            )
            for seq in request.seqs
        ]
        first_token_times = [s.first_token_time for s in request.seqs if s.first_token_time is not None]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=request.finished,
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            metrics={"arrival_time": request.arrival_time, "first_token_time": min(first_token_times, default=0.0)},
        )


def visible_text(seq: Sequence) -> str:
    """While a sequence runs, hold back text that could be the start of a stop string.

    Streamed text must never include characters that a stop string found later would cut off.
    """
    if seq.is_finished or not seq.params.stop:
        return seq.output_text
    hold = max(len(stop) for stop in seq.params.stop) - 1
    return seq.output_text[: max(len(seq.output_text) - hold, 0)]
