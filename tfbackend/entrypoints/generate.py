"""``tfbackend generate MODEL --prompt ...``: offline generation from the command line."""

from __future__ import annotations

import argparse
import json

from tfbackend.entrypoints.engine_args import add_engine_args, engine_config_from_args
from tfbackend.llm import LLM
from tfbackend.model_source import resolve_model
from tfbackend.sampling_params import SamplingParams


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate completions for prompts")
    parser.add_argument("model", nargs="?", default=None, help="HF folder, .gguf file or Hub id (default: embedded)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    llm = LLM(config=engine_config_from_args(args, resolve_model(args.model)))
    tokenizer = llm.get_tokenizer()
    prompts = args.prompt
    if args.chat:
        if tokenizer is None or tokenizer.chat_template is None:
            raise SystemExit("--chat needs a tokenizer with a chat template")
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
    params = SamplingParams(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
    )
    for prompt, output in zip(args.prompt, llm.generate(prompts, params)):
        for completion in output.outputs:
            if args.json:
                print(json.dumps({
                    "prompt": prompt,
                    "text": completion.text,
                    "token_ids": completion.token_ids,
                    "finish_reason": completion.finish_reason,
                }))
            else:
                print(f"--- {prompt!r} [{completion.finish_reason}]\n{completion.text}")
    return 0
