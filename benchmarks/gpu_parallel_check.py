"""Greedy tokens of tensor- and pipeline-parallel engines against one GPU, on 2 (or 4) CUDA GPUs.

Run from the repository root: ``python3 benchmarks/gpu_parallel_check.py [--impls native,transformers]``.

The reference is one GPU with the PyTorch attention backend, eager. Each layout runs the serving path
(Triton attention, the model compiled, CUDA graphs capturing the NCCL all-reduces of decode steps, run-ahead)
and, for tensor parallelism, also eagerly:

* float32, tiny Llama (4 query heads, 2 KV heads: at TP=4 each KV head is replicated on two GPUs): every greedy
  token must be identical to the reference (exit status 1 otherwise);
* bf16, Llama-3.1-8B-shaped random weights at TP=2: how many leading tokens agree with one GPU per prompt
  (the sums of the all-reduce round differently in bf16, so late flips of near-ties are expected).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tfbackend import LLM  # noqa: E402
from tfbackend.bench.presets import random_checkpoint  # noqa: E402
from tfbackend.bench.workloads import greedy  # noqa: E402

PROMPT_LENS = [5, 17, 64, 100, 129, 300, 31, 1]
# One engine (start, generate, stop) takes well under a minute; one still going after this is stuck.
LAYOUT_SECONDS = float(os.environ.get("LAYOUT_SECONDS", 180))


def watchdog(label: str, seconds: float) -> threading.Timer:
    """After ``seconds``, print this process's stacks and every rank's (SIGUSR1: rank workers dump theirs), then
    exit with status 3: a hung layout says where it waits instead of eating the device call."""

    def expire() -> None:
        print(f"=== {label}: not done after {seconds:.0f} s; the stacks of this process and its ranks follow",
              flush=True)
        faulthandler.dump_traceback(all_threads=True)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGUSR1)
        time.sleep(5)
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def tokens(model_dir: Path, impl: str, dtype: str, prompts, output_len: int, **engine) -> list[list[int]]:
    timer = watchdog(f"{impl} {dtype} {engine}", LAYOUT_SECONDS)
    try:
        return _tokens(model_dir, impl, dtype, prompts, output_len, **engine)
    finally:
        timer.cancel()


def _tokens(model_dir: Path, impl: str, dtype: str, prompts, output_len: int, **engine) -> list[list[int]]:
    llm = LLM(str(model_dir), model_impl=impl, dtype=dtype, device="cuda", kv_cache_memory=1 << 30,
              max_num_batched_tokens=256, max_model_len=1024, max_num_seqs=16, **engine)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(output_len))
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()  # the engine holds reference cycles; free its KV cache before the next one
        torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outputs]


def leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def layouts(num_gpus: int) -> list[tuple[str, dict]]:
    found = [
        ("TP=2", dict(tensor_parallel_size=2)),
        ("TP=2 eager", dict(tensor_parallel_size=2, enforce_eager=True)),
        ("PP=2", dict(pipeline_parallel_size=2)),
    ]
    if num_gpus >= 4:
        found += [("TP=4 (KV heads replicated)", dict(tensor_parallel_size=4)),
                  ("TP=2 x PP=2", dict(tensor_parallel_size=2, pipeline_parallel_size=2))]
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impls", default="native,transformers")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--skip-bf16", action="store_true", help="only the float32 exactness check")
    parser.add_argument("--layouts", help="comma-separated labels of the layouts to run, e.g. 'TP=2 x PP=2' "
                        "(default: all that the GPUs allow)")
    args = parser.parse_args()
    num_gpus = torch.cuda.device_count()
    print(f"{num_gpus} GPUs: {torch.cuda.get_device_name(0)}")
    rng = np.random.default_rng(0)
    ok = True
    chosen = layouts(num_gpus)
    if args.layouts:
        wanted = [label.strip() for label in args.layouts.split(",")]
        unknown = set(wanted) - {label for label, _ in chosen}
        if unknown:
            parser.error(f"unknown layouts {sorted(unknown)}; choose from {[label for label, _ in chosen]}")
        chosen = [(label, layout) for label, layout in chosen if label in wanted]
    tiny = random_checkpoint("tiny-llama")
    prompts = [rng.integers(0, 512, n).tolist() for n in PROMPT_LENS]
    for impl in args.impls.split(","):
        reference = tokens(tiny, impl, "float32", prompts, args.output_len, attention_backend="torch",
                           enforce_eager=True)
        for label, layout in chosen:
            agree = [leading_agreement(t, r) for t, r in zip(tokens(tiny, impl, "float32", prompts,
                                                                    args.output_len, **layout), reference)]
            exact = all(n == args.output_len for n in agree)
            ok &= exact
            print(f"float32 tiny-llama [{impl}] {label}: leading tokens equal to one GPU (of {args.output_len}): "
                  f"{agree} -> {'IDENTICAL' if exact else 'differs'}")
    if not args.skip_bf16:
        big = random_checkpoint("llama-3.1-8b")
        prompts = [rng.integers(0, 128256, n).tolist() for n in PROMPT_LENS]
        for impl in args.impls.split(","):
            one = tokens(big, impl, "bfloat16", prompts, args.output_len)
            two = tokens(big, impl, "bfloat16", prompts, args.output_len, tensor_parallel_size=2)
            print(f"bf16 llama-3.1-8b [{impl}] TP=2 vs one GPU, leading tokens equal: "
                  f"{[leading_agreement(a, b) for a, b in zip(two, one)]}")
    print("float32 parallel check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
