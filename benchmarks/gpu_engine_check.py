"""Greedy tokens of the GPU serving path against the reference path, through the whole engine, on a CUDA GPU.

Run from the repository root: ``python3 benchmarks/gpu_engine_check.py [--impls native,transformers]``.

The GPU path is what ``tfbackend`` serves with by default: Triton attention, the model compiled, CUDA graphs
for decode steps. The reference is the PyTorch attention backend run eagerly, on the same weights. Two
checks per model implementation:

* float32, tiny Llama: every greedy token must be identical (exit status 1 otherwise);
* bf16, Llama-3.2-1B-shaped random weights: how many leading tokens agree per prompt. Random weights give
  nearly flat logits, so bf16 rounding differences may flip a near-tie; a flip early in every prompt would
  point at a bug, late or rare flips at rounding.

Both run a small token budget per step (chunked prefill, steps mixing prefill and decode, eager) and then
decode-only steps (graphs); the float32 check also compares with eager Triton (no graphs, no compilation).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tfbackend import LLM  # noqa: E402
from tfbackend.bench.presets import random_checkpoint  # noqa: E402
from tfbackend.bench.workloads import greedy  # noqa: E402

PROMPT_LENS = [5, 17, 64, 100, 129, 300, 31, 1]


def tokens(model_dir: Path, impl: str, dtype: str, prompts, output_len: int, **engine) -> list[list[int]]:
    llm = LLM(str(model_dir), model_impl=impl, dtype=dtype, device="cuda", kv_cache_memory=1 << 30,
              max_num_batched_tokens=256, max_model_len=1024, max_num_seqs=16, **engine)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(output_len))
    del llm
    gc.collect()  # the engine holds reference cycles; free its KV cache before the next one
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outputs]


def leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(label: str, model_dir: Path, impl: str, dtype: str, vocab: int, output_len: int, with_eager: bool) -> bool:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENS]
    gpu = tokens(model_dir, impl, dtype, prompts, output_len)
    ref = tokens(model_dir, impl, dtype, prompts, output_len, attention_backend="torch", enforce_eager=True)
    vs_ref = [leading_agreement(g, r) for g, r in zip(gpu, ref)]
    exact = all(n == output_len for n in vs_ref)
    print(f"{label} [{impl}]: leading tokens equal to the reference, per prompt (of {output_len}): {vs_ref}"
          f" -> {'IDENTICAL' if exact else 'differs'}")
    if with_eager:  # the same Triton kernels without graphs or compilation
        eager = tokens(model_dir, impl, dtype, prompts, output_len, enforce_eager=True)
        print(f"{label} [{impl}]: graphs vs eager Triton: {[leading_agreement(g, e) for g, e in zip(gpu, eager)]}")
    return exact


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impls", default="native,transformers")
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    ok = True
    tiny, big = random_checkpoint("tiny-llama"), random_checkpoint("llama-3.2-1b")
    for impl in args.impls.split(","):
        ok &= compare("float32 tiny-llama", tiny, impl, "float32", 512, args.output_len, with_eager=True)
        compare("bf16 llama-3.2-1b", big, impl, "bfloat16", 128256, args.output_len, with_eager=False)
    print("float32 check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
