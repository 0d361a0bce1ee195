"""Host cost of grammar-constrained decoding per token: xgrammar against llguidance (how the library was chosen).

For a nested JSON schema and a document that follows it, each library computes the next-token mask and then
accepts the document's next token, once per token, on the default model's tokenizer (49,152 ids). Prints the
one-off setup costs and the per-token median / p90 / max. A library that is not installed is skipped
(``pip install xgrammar llguidance``).

    python benchmarks/grammar_mask_overhead.py [TOKENIZER_DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
        "kind": {"enum": ["a", "b", "c"]},
    },
    "required": ["name", "age", "tags", "address", "kind"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace, the first programmer of the analytical engine", "age": 36,
            "email": "ada@example.com", "tags": ["math", "poetry", "engines"],
            "address": {"city": "London", "zip": "12345"}, "kind": "b"}
REPEATS = 5


def per_token_seconds(new_matcher: Callable, fill: Callable, accept: Callable, tokens: list[int]) -> list[float]:
    times = []
    for _ in range(REPEATS):
        matcher = new_matcher()
        for token in tokens:
            start = time.perf_counter()
            fill(matcher)
            if not accept(matcher, token):
                raise RuntimeError(f"token {token} refused")
            times.append(time.perf_counter() - start)
    return times


def measure_xgrammar(tokenizer, vocab_size: int, tokens: list[int]) -> tuple[dict, list[float]]:
    import xgrammar

    start = time.perf_counter()
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
    ready = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)
    setup = {"tokenizer table": ready - start, "compile": time.perf_counter() - ready}
    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
    return setup, per_token_seconds(lambda: xgrammar.GrammarMatcher(compiled),
                                    lambda m: m.fill_next_token_bitmask(bitmask, 0),
                                    lambda m, t: m.accept_token(t), tokens)


def measure_llguidance(tokenizer, vocab_size: int, tokens: list[int]) -> tuple[dict, list[float]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    ready = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": True})
    llguidance.LLMatcher(ll_tokenizer, grammar)
    setup = {"tokenizer table": ready - start, "compile": time.perf_counter() - ready}
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    return setup, per_token_seconds(lambda: llguidance.LLMatcher(ll_tokenizer, grammar),
                                    lambda m: llguidance.torch.fill_next_token_bitmask(m, bitmask, 0),
                                    lambda m, t: m.consume_token(t), tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", nargs="?", default=None, help="tokenizer folder (default: the default model)")
    args = parser.parse_args()
    if args.tokenizer is None:
        from tfbackend.model_source import resolve_model

        args.tokenizer = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab_size = len(tokenizer)
    tokens = tokenizer(json.dumps(DOCUMENT), add_special_tokens=False)["input_ids"]
    torch.set_num_threads(1)
    print(f"{len(tokens)} tokens x {REPEATS}, vocabulary {vocab_size}")
    for name, measure in (("xgrammar", measure_xgrammar), ("llguidance", measure_llguidance)):
        if importlib.util.find_spec(name) is None:
            print(f"{name}: not installed")
            continue
        setup, times = measure(tokenizer, vocab_size, tokens)
        times.sort()
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in setup.items())
              + f"; per token: median {statistics.median(times) * 1e6:.0f} us, "
              f"p90 {times[int(0.9 * len(times))] * 1e6:.0f} us, max {times[-1] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
