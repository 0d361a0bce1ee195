"""Compiling a request's structured-output constraint into a grammar for the model's tokenizer (xgrammar).

xgrammar was chosen over llguidance by measurement (``benchmarks/grammar_mask_overhead.py``, SmolLM2's
49,152-token vocabulary, a nested JSON schema): computing a mask and accepting a token took a median of 7 us
(p90 24 us) with xgrammar against 35 us (p90 136 us) with llguidance; compiling a schema costs xgrammar ~40 ms
once, after which its cache answers. Both install from PyPI as binary wheels.

Compilation may run on any thread (the server compiles off its event loop before queueing a request, so a
bad schema is a 400 and a new one does not stall the engine thread); the engine's later call hits the cache.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from tfbackend.sampling_params import StructuredOutputsParams
from tfbackend.structured_output.grammar import SequenceGrammar

CACHE_LIMIT_BYTES = 256 * 2**20  # compiled grammars kept for reuse; a flood of distinct schemas stays bounded
MAX_WHITESPACE_RUN = 16  # JSON may be pretty-printed, but a model cannot loop on whitespace forever

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest is the message for the user.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarCompiler:
    """Compiles ``StructuredOutputsParams`` for one tokenizer and creates per-sequence matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
        """``vocab_size``: the model's (logits width), which may exceed the tokenizer's."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler = None
        self._lock = threading.Lock()  # the first compile builds the tokenizer's token table (~0.3 s)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar; ValueError (for the user) if the constraint is invalid or unsupported."""
        compiler = self._xgrammar_compiler()
        try:
            return self._compile(compiler, params)
        except (RuntimeError, ValueError, TypeError) as exc:  # how xgrammar reports bad schemas, regexes, grammars
            lines = str(exc).strip().splitlines()
            message = _LOG_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
            raise ValueError(f"invalid structured output {params.kind}: {message}") from exc

    def matcher(self, params: StructuredOutputsParams) -> SequenceGrammar:
        """A fresh matcher at the start of the grammar (compiling it, or taking it from the cache)."""
        import xgrammar

        return SequenceGrammar(xgrammar.GrammarMatcher(self.compile(params)))

    def _compile(self, compiler: Any, params: StructuredOutputsParams) -> Any:
        any_whitespace = not params.disable_any_whitespace
        whitespace = {"any_whitespace": any_whitespace, "max_whitespace_cnt": MAX_WHITESPACE_RUN if any_whitespace
                      else None}
        if params.json is not None:
            _check_json_schema(params.json)
            return compiler.compile_json_schema(params.json, strict_mode=True, **whitespace)
        if params.json_object:
            return compiler.compile_json_schema('{"type": "object"}', strict_mode=False, **whitespace)
        if params.regex is not None:
            return compiler.compile_regex(params.regex)
        if params.choice is not None:
            # JSON string literals are valid EBNF literals (same escapes), so any choice text is safe here.
            return compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in params.choice)
            )
        return compiler.compile_grammar(params.grammar)

    def _xgrammar_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer; this model has none")
                try:
                    import xgrammar
                except ImportError as exc:
                    raise ValueError("structured outputs need the xgrammar package: pip install xgrammar") from exc
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
                )
                self._compiler = xgrammar.GrammarCompiler(info, cache_limit_bytes=CACHE_LIMIT_BYTES)
            return self._compiler


def _check_json_schema(schema: str) -> None:
    """A schema must be a JSON object (or true); xgrammar's own messages for other values are cryptic."""
    try:
        value = json.loads(schema)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON schema must be a JSON object, got {type(value).__name__}")
