"""Where the time of a decode step goes, on a CUDA GPU: host phases of ``LLMEngine.step`` and GPU kernels.

Run from the repository root: ``python3 benchmarks/step_profile.py [--impl transformers] [--num-requests 256]
[--preset gemma2-2b]``. It wraps the engine's phases with host timers (no engine code changes) and runs a T1-like
workload of a preset's random weights (default Llama-3.2-1B). For decode-only steps with at least half the requests running it prints the mean
milliseconds per step of each host phase, then a ``torch.profiler`` summary of a few such steps: the GPU
kernels by total time, and the GPU's busy time per step. "fetch tokens" is the host waiting for the GPU
(the step's one sync); with the engine running a step ahead, the other phases overlap the GPU's work.

"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tfbackend import LLM  # noqa: E402
from tfbackend.bench.presets import random_checkpoint  # noqa: E402
from tfbackend.bench.workloads import ThroughputWorkload, greedy  # noqa: E402
from tfbackend.engine import model_runner  # noqa: E402

phase_seconds: dict[str, float] = defaultdict(float)


def timed(key: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phase_seconds[key] += time.perf_counter() - start
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", default="transformers")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="the driver's (rank 0's) host phases and GPU kernels; collectives include waiting")
    args = parser.parse_args()

    llm = LLM(str(random_checkpoint(args.preset)), model_impl=args.impl, max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size)
    engine, runner = llm.engine, llm.engine.runner
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    model_runner.flatten_step = timed("flatten_step", model_runner.flatten_step)
    if runner.cuda_graphs is not None:
        runner.cuda_graphs.run = timed("graph copy+replay", runner.cuda_graphs.run)
    if runner.send_step is not None:
        runner.send_step = timed("send step to ranks", runner.send_step)
    runner.model.compute_logits = timed("compute_logits", runner.model.compute_logits)
    runner.sampler.sample_on_device = timed("sampler (queue)", runner.sampler.sample_on_device)
    model_runner.PendingStep.fetch = timed("fetch tokens (GPU wait)", model_runner.PendingStep.fetch)
    engine._process = timed("process tokens (incl. fetch)", engine._process)
    engine.step = timed("step (all)", engine.step)

    workload = ThroughputWorkload(args.num_requests, 64, 512, args.output_len, seed=0)
    for i, prompt in enumerate(workload.prompts(engine.hf_config.vocab_size)):
        engine.add_request(str(i), prompt, greedy(args.output_len), stream=False)
    decode_steps, totals = 0, defaultdict(float)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    profiler = torch.profiler.profile(activities=activities)
    profiling, profiled = False, 0
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        steady = (not engine.scheduler.waiting and len(running) >= (args.num_requests + 1) // 2
                  and all(s.num_tokens - s.num_computed_tokens == 1 for s in running))
        before = dict(phase_seconds)
        if steady and decode_steps == 10 and not profiled:
            profiler.start()
            profiling = True
        engine.step()
        if steady:
            decode_steps += 1
            for key, seconds in phase_seconds.items():
                totals[key] += seconds - before.get(key, 0.0)
        if profiling:
            profiled += 1
            if profiled == args.profile_steps or not engine.has_unfinished_requests():
                torch.cuda.synchronize()
                profiler.stop()
                profiling = False
    step_ms = totals["step (all)"] / decode_steps * 1e3
    print(f"{args.preset} {args.impl} tp={args.tensor_parallel_size}, {args.num_requests} requests: {decode_steps} decode-only steps, {step_ms:.3f} ms/step "
          f"({args.num_requests / step_ms * 1e3:,.0f} tok/s)")
    for key, seconds in totals.items():
        print(f"  {key:28s} {seconds / decode_steps * 1e3:8.3f} ms/step")
    events = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in events)
    print(f"  GPU: {len(events) / profiled:.0f} kernels/copies per step, busy {busy_us / profiled / 1e3:.3f} ms/step")
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    llm.engine.shutdown()  # other ranks, if any, stop too


if __name__ == "__main__":
    main()
