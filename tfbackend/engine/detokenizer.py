"""Incremental detokenization and stop strings.

Decoding only the tail of a sequence each step keeps the cost per token constant. The tail is decoded
from a few tokens back (``prefix_offset``) so that tokenizers which drop a leading space at the start of a
decode still produce the right spacing; text is emitted only once it no longer ends in an incomplete
UTF-8 character.
"""

from __future__ import annotations

from tfbackend.engine.sequence import Sequence

# How many prompt tokens of context the first decode of a sequence's output starts from.
INITIAL_CONTEXT_TOKENS = 5


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def start(self, seq: Sequence) -> None:
        seq.read_offset = seq.num_prompt_tokens
        seq.prefix_offset = max(seq.num_prompt_tokens - INITIAL_CONTEXT_TOKENS, 0)

    def decode_new_tokens(self, seq: Sequence, final: bool = False) -> str:
        """Append the text of newly generated tokens to ``seq.output_text``; return what was added.

        ``final``: the sequence has ended, so a trailing incomplete character is emitted as decoded.
        """
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids
        prefix_text = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
        full_text = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip)
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        new_text = full_text[len(prefix_text) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        seq.output_text += new_text
        return new_text


def find_stop_string(seq: Sequence, num_new_chars: int) -> str | None:
    """If a stop string now appears in the output, truncate the text there and return the string.

    Only the new characters and the ``len(stop) - 1`` before them are searched, so a stop string split
    across tokens is found the moment its last character arrives.
    """
    text = seq.output_text
    for stop in seq.params.stop:
        search_from = max(len(text) - num_new_chars - len(stop) + 1, 0)
        at = text.find(stop, search_from)
        if at != -1:
            end = at + len(stop) if seq.params.include_stop_str_in_output else at
            seq.output_text = text[:end]
            return stop
    return None
