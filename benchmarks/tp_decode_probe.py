"""Diagnose tensor-parallel decode on GPUs: ms per token at small batches, with stacks dumped on a hang.

    python3 benchmarks/tp_decode_probe.py IMPL EAGER [TP]   # e.g. native 0 2

Every process (the driver and, since workers import this module as their main, each rank) dumps its Python
stacks and exits after HANG_SECONDS, so a deadlock shows where each rank waits.
"""

import faulthandler
import sys
import time

HANG_SECONDS = 100
faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)


def main() -> None:
    from tfbackend import LLM, SamplingParams
    from tfbackend.bench.presets import random_checkpoint

    impl, eager, tp = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]) if len(sys.argv) > 3 else 2
    llm = LLM(str(random_checkpoint(sys.argv[4] if len(sys.argv) > 4 else "tiny-llama")), model_impl=impl,
              tensor_parallel_size=tp, enforce_eager=eager, max_model_len=1024)
    for batch in (1, 1, 8, 64):
        params = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
        prompts = [{"prompt_token_ids": list(range(3, 35 + i))} for i in range(batch)]
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        print(f"RESULT impl={impl} eager={eager} tp={tp} batch={batch}: "
              f"{(time.perf_counter() - start) / 64 * 1000:.2f} ms/step", flush=True)


if __name__ == "__main__":
    main()
