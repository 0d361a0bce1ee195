"""Structured outputs: the output follows a grammar (JSON schema, regex, choice or EBNF).

A request's grammar is compiled once for the model's tokenizer (``compiler.py``, through xgrammar, cached);
each sequence then carries a matcher that knows which tokens may come next (``grammar.py``). Every step the
sampler gathers the matchers' next-token masks into one bitmask, uploads it once and applies it on the device
(``bitmask.py``); the output processor advances each matcher with the token it accepted.
"""

from tfbackend.structured_output.bitmask import apply_token_bitmask, fill_token_bitmask
from tfbackend.structured_output.compiler import GrammarCompiler
from tfbackend.structured_output.grammar import SequenceGrammar

__all__ = ["GrammarCompiler", "SequenceGrammar", "apply_token_bitmask", "fill_token_bitmask"]
