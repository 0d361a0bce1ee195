"""Tensor-parallel engines on GPUs start, decode and shut down, one after another in one process.

    python3 benchmarks/tp_decode_probe.py [TP] [PRESET] [IMPL,...]   # default: 2 tiny-llama native,transformers

Per implementation: ms per decode step at batch 1, 8 and 64, then how long ``shutdown`` took (it used to hang:
leaving NCCL groups waits for CUDA graphs that captured collectives to be freed). Every process (the driver
and, since ranks import this module as their main, each rank) dumps its Python stacks and exits after
``HANG_SECONDS``, so a deadlock shows where each rank waits.
"""

import faulthandler
import sys
import time

HANG_SECONDS = 150
faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)


def main() -> None:
    from tfbackend import LLM, SamplingParams
    from tfbackend.bench.presets import random_checkpoint

    tp = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    model = str(random_checkpoint(sys.argv[2] if len(sys.argv) > 2 else "tiny-llama"))
    for impl in (sys.argv[3] if len(sys.argv) > 3 else "native,transformers").split(","):
        start = time.perf_counter()
        llm = LLM(model, model_impl=impl, tensor_parallel_size=tp, max_model_len=1024)
        print(f"RESULT {impl} tp={tp}: ready in {time.perf_counter() - start:.1f} s", flush=True)
        for batch in (1, 1, 8, 64):
            params = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
            prompts = [{"prompt_token_ids": list(range(3, 35 + i))} for i in range(batch)]
            start = time.perf_counter()
            llm.generate(prompts, params)
            print(f"RESULT {impl} tp={tp} batch={batch}: {(time.perf_counter() - start) / 64 * 1000:.2f} ms/step",
                  flush=True)
        start = time.perf_counter()
        llm.engine.shutdown()
        del llm
        print(f"RESULT {impl} tp={tp}: shutdown in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
