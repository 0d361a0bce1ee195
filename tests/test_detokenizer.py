"""Incremental detokenization and stop strings, with the real SmolLM2 (byte-level BPE) tokenizer.

The engine feeds one token at a time: ``decode_new_tokens`` after each, and ``find_stop_string`` with the
number of characters it added. Multi-byte characters are split over several tokens by this tokenizer
(an emoji is three byte tokens), which is what makes both hard.
"""

from __future__ import annotations

import itertools

import pytest

from tfbackend.engine.detokenizer import Detokenizer, find_stop_string
from tfbackend.engine.sequence import Sequence
from tfbackend.sampling_params import SamplingParams

PROMPT = "<|im_start|>user\nWrite something.<|im_end|>\n<|im_start|>assistant\n"

TEXTS = [
    "Hello world, how are you today?",
    "Party 🎉 time! 🚀🚀 Rockets 👨‍👩‍👧 family",
    "naïve café résumé — Ångström, Zürich, São Paulo",
    "日本語のテキスト 中文字符 한국어",
    "  leading spaces,   runs   of spaces\n\nand\tnewlines  ",
    "mixed: ça va? 😀 ok. 100% ✓ ∑x² ≤ ∞",
    "don 't split . the , punctuation",
]

_ids = itertools.count()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def new_seq(tokenizer, params: SamplingParams, prompt: str = PROMPT) -> Sequence:
    prompt_ids = tokenizer.encode(prompt)
    return Sequence(next(_ids), "req", 0, list(prompt_ids), len(prompt_ids), params)


def stream(tokenizer, output_ids: list[int], params: SamplingParams, prompt: str = PROMPT):
    """Feed ``output_ids`` one at a time as the engine does; return (seq, chunks, stop, tokens fed)."""
    detok = Detokenizer(tokenizer)
    seq = new_seq(tokenizer, params, prompt)
    detok.start(seq)
    chunks = []
    for fed, token in enumerate(output_ids, start=1):
        seq.token_ids.append(token)
        new_text = detok.decode_new_tokens(seq)
        chunks.append(new_text)
        if params.stop and new_text:
            stop = find_stop_string(seq, len(new_text))
            if stop is not None:
                return seq, chunks, stop, fed
    return seq, chunks, None, len(output_ids)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_incremental_text_equals_full_decode(tokenizer, text: str) -> None:
    output_ids = tokenizer.encode(text)
    assert len(output_ids) > 5
    seq, chunks, _, _ = stream(tokenizer, output_ids, SamplingParams())
    full = tokenizer.decode(output_ids, skip_special_tokens=True)
    assert full == text  # the sample round-trips, so the reference is the text itself
    assert seq.output_text == "".join(chunks) == full
    # Each step emits only whole characters: never a replacement character, never text taken back.
    assert all("\ufffd" not in chunk for chunk in chunks)


def test_multibyte_characters_are_held_back_until_complete(tokenizer) -> None:
    output_ids = tokenizer.encode("Party 🎉!")
    pieces = [tokenizer.decode([t]) for t in output_ids]
    split = [i for i, piece in enumerate(pieces) if "\ufffd" in piece]
    assert len(split) >= 2  # the emoji really spans several tokens
    seq, chunks, _, _ = stream(tokenizer, output_ids, SamplingParams())
    assert all(chunks[i] == "" for i in split[:-1])  # nothing while the emoji is incomplete
    assert "🎉" in chunks[split[-1]]  # all of it once its last byte arrives
    assert seq.output_text == "Party 🎉!"


def test_special_tokens_are_skipped_in_the_middle_of_the_output(tokenizer) -> None:
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    output_ids = tokenizer.encode("one two") + [im_start] + tokenizer.encode(" three 🎉 four")
    seq, _, _, _ = stream(tokenizer, output_ids, SamplingParams())
    assert seq.output_text == tokenizer.decode(output_ids, skip_special_tokens=True) == "one two three 🎉 four"


def test_decoding_starts_with_prompt_context_so_leading_spaces_survive(tokenizer) -> None:
    output_ids = tokenizer.encode(" starts with a space")
    seq, _, _, _ = stream(tokenizer, output_ids, SamplingParams(), prompt="Hi")
    assert seq.output_text == " starts with a space"


class SentencePieceLike:
    """Decodes like SentencePiece: a word piece carries its leading space, dropped at the start of a decode."""

    pieces = {0: "Hello", 1: " world", 2: " again", 3: "!"}

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids)
        return text[1:] if text.startswith(" ") else text


def test_a_tokenizer_that_drops_a_leading_space_keeps_it_thanks_to_prompt_context() -> None:
    tokenizer = SentencePieceLike()
    seq = Sequence(next(_ids), "req", 0, [0], 1, SamplingParams())  # prompt "Hello"
    detok = Detokenizer(tokenizer)
    detok.start(seq)
    for token in [1, 2, 3]:
        seq.token_ids.append(token)
        detok.decode_new_tokens(seq)
    assert seq.output_text == " world again!"


def test_decoding_a_whole_output_at_the_end_keeps_the_leading_space() -> None:
    """Non-streaming requests decode once, when they finish: with the same prompt context."""
    tokenizer = SentencePieceLike()
    seq = Sequence(next(_ids), "req", 0, [0], 1, SamplingParams())
    detok = Detokenizer(tokenizer)
    detok.start(seq)
    seq.token_ids += [1, 2, 3]
    detok.decode_new_tokens(seq, final=True)
    assert seq.output_text == " world again!"


def test_final_decode_emits_a_trailing_incomplete_character(tokenizer) -> None:
    emoji_ids = tokenizer.encode(" 🎉")
    assert len(emoji_ids) > 1
    detok = Detokenizer(tokenizer)
    seq = new_seq(tokenizer, SamplingParams())
    detok.start(seq)
    seq.token_ids += tokenizer.encode(" ok")
    detok.decode_new_tokens(seq)
    seq.token_ids += emoji_ids[:-1]  # the output ends inside the emoji
    assert detok.decode_new_tokens(seq) == ""  # held back while more bytes may come
    assert seq.output_text == " ok"
    detok.decode_new_tokens(seq, final=True)
    assert seq.output_text.startswith(" ok") and seq.output_text.endswith("\ufffd")


# ---------------------------------------------------------------------------------------- stop strings


def expected_stop(tokenizer, output_ids: list[int], stop: str) -> tuple[int, int, str]:
    """(tokens fed when the stop string's last character first decodes, its index, the decoded text)."""
    for fed in range(1, len(output_ids) + 1):
        text = tokenizer.decode(output_ids[:fed], skip_special_tokens=True)
        if stop in text.replace("\ufffd", ""):
            return fed, text.index(stop), text
    raise AssertionError(f"{stop!r} never appears")


STOP_CASES = [
    # (text, stop string, how many tokens the stop string spans)
    ("The answer is forty-two. Done.", "forty-two", 3),  # ' forty', '-', 'two'
    ("The answer is forty-two. Done.", "rty-tw", 3),  # starts and ends inside tokens
    ("Say STOPPING now", "STOP", 2),  # ' ST', 'OP'
    ("Party 🎉 time!", "🎉", 3),  # one character, three byte tokens
    ("Party 🎉 time!", "y 🎉 t", 5),
    ("naïve café résumé", "ré", 2),  # ' r', 'é'
    ("The answer is forty-two. Done.", "Done", 1),
]


@pytest.mark.parametrize("include", [False, True], ids=["cut", "include"])
@pytest.mark.parametrize("text,stop,span", STOP_CASES, ids=[c[1] for c in STOP_CASES])
def test_stop_string_across_token_boundaries(tokenizer, text: str, stop: str, span: int, include: bool) -> None:
    output_ids = tokenizer.encode(text)
    when, index, decoded = expected_stop(tokenizer, output_ids, stop)
    params = SamplingParams(stop=["never-there", stop], include_stop_str_in_output=include)
    seq, _, found, fed = stream(tokenizer, output_ids, params)
    assert found == stop
    assert fed == when  # detected as soon as its last character arrives, not later
    assert seq.output_text == (text[: index + len(stop)] if include else text[:index])
    # The span claimed in the case table: the stop string's text was spread over that many tokens.
    first_token = next(i for i in range(len(output_ids)) if len(tokenizer.decode(output_ids[: i + 1])) > index)
    assert when - first_token == span


def test_stop_string_in_the_prompt_does_not_stop(tokenizer) -> None:
    output_ids = tokenizer.encode(" plain output")
    seq, _, found, _ = stream(tokenizer, output_ids, SamplingParams(stop=["STOP"]), prompt="STOP here")
    assert found is None and seq.output_text == " plain output"


def test_stop_string_at_the_very_start_leaves_empty_text(tokenizer) -> None:
    output_ids = tokenizer.encode("STOP and more")
    seq, _, found, fed = stream(tokenizer, output_ids, SamplingParams(stop=["STOP"]))
    assert found == "STOP" and seq.output_text == "" and fed < len(output_ids)
