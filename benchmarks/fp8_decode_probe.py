"""Which tiling of the FP8 decode GEMM streams Llama-3.1-8B's projections fastest at one token (issue 14, T2)?

    python3 benchmarks/fp8_decode_probe.py [--budget-s 240]

At batch-1 decode an FP8 linear only streams its weight, so its time against bf16's should approach the byte
ratio, 0.5x. Each layer's weights pass through L2 once per step in the engine (32 layers x 218 MB of FP8 weights
do not fit a 50 MB L2), so every timing here cycles through enough copies of the weight that none is still in L2
when it is read again: a CUDA graph of ``COPIES`` launches, one per copy, replayed; the time per launch is
the replay's over ``COPIES``. Timed per projection:

- bf16 ``F.linear`` (the baseline T2 is measured against) and what an FP8 layer runs for one token with its
  defaults (``Fp8Linear``: the decode GEMM tiled by ``tiles.decode_tiles``);
- the decode GEMM over its tilings: the ``tl.dot`` form (16 padded rows) and the GEMV form (one row on the CUDA
  cores), column tile width, K step, K splits; then warps and pipeline stages around the best few.

Each tiling's output is checked against the plain ``tl.dot`` form's before it is timed. Prints per projection the
best tilings and, last, a table: bf16 µs, the FP8 layer's µs, the best tiling's, their ratios to bf16, and the best
tiling as ``DecodeTiles`` fields (what ``tiles.decode_tiles`` should return for that shape).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from tfbackend.quantization.fp8 import ActivationScheme, quantize_weight  # noqa: E402
from tfbackend.quantization.fp8_linear import Fp8Format, Fp8Linear  # noqa: E402
from tfbackend.quantization.kernels.fp8_decode_gemm import decode_counters, fp8_decode_gemm_launch  # noqa: E402
from tfbackend.quantization.kernels.tiles import decode_tiles  # noqa: E402

DEVICE = torch.device("cuda")
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
L2_DEFEAT_BYTES = 400 << 20  # the copies one timing cycles through (H100: 50 MB of L2)
FIRST_PASS = [dict(gemv=gemv, block_n=bn, block_k=bk, splits=sp, num_warps=4, num_stages=4)
              for gemv, bn, bk, sp in itertools.product((False, True), (32, 64, 128), (256, 512), (1, 2, 4))]
WARPS_STAGES = [(4, 3), (4, 6), (8, 3), (8, 4), (8, 6)]


def time_per_call_us(calls: list) -> float:
    """GPU time per call of ``calls`` (each on its own copy of the weight), replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compile, allocate
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = 20
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop sweeping after this long")
    args = parser.parse_args()
    began = time.monotonic()
    torch.manual_seed(0)
    num_sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    print(f"{torch.cuda.get_device_name()} ({num_sms} SMs) | torch {torch.__version__} | triton {triton.__version__}")
    summary = []
    for name, (n, k) in SHAPES.items():
        dense = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        copies = max(2, L2_DEFEAT_BYTES // (n * k))  # FP8 bytes; bf16 copies are twice as large: fewer needed
        fp8_weights = [quantize_weight(dense + 0)[0] for _ in range(copies)]
        _, grid = quantize_weight(dense)
        bf16_weights = [dense.clone() for _ in range(max(2, copies // 2))]
        bf16_us = time_per_call_us([lambda w=w: F.linear(x, w) for w in bf16_weights])
        layers = []
        for _ in fp8_weights:  # as `--quantization fp8` builds them: this shape's defaults on this GPU
            layer = Fp8Linear(k, [n], ["w"], False, torch.bfloat16, DEVICE,
                              Fp8Format(ActivationScheme(), None, online=True))
            layer.checkpoint_sinks()["w.weight"](dense)
            layers.append(layer)
        layer_us = time_per_call_us([lambda layer=layer: layer.apply_gpu(x) for layer in layers])
        counters = [decode_counters(n, DEVICE) for _ in fp8_weights]

        def run(tiling, w, c):
            return fp8_decode_gemm_launch(x, w, grid.scale, grid.block_n, grid.block_k, None, c, **tiling)

        rule = dataclasses.asdict(decode_tiles(n, k, num_sms))  # what a layer of this shape takes
        expected = run(dict(block_n=64, splits=1), fp8_weights[0], counters[0]).float()  # the plain tl.dot form

        def measure(tiling) -> float | None:
            try:
                got = run(tiling, fp8_weights[0], counters[0]).float()
            except Exception as error:  # a tiling Triton cannot build (out of shared memory, registers)
                print(f"  {name:8} {tiling}: failed to build ({type(error).__name__})")
                return None
            error = ((got - expected).norm() / expected.norm()).item()
            if error > 1e-2:
                print(f"  {name:8} {tiling}: WRONG (relative error {error:.2e})")
                return None
            return time_per_call_us([lambda w=w, c=c: run(tiling, w, c) for w, c in zip(fp8_weights, counters)])

        rule_us = measure(rule)
        results = []
        for tiling in FIRST_PASS:
            if time.monotonic() - began > args.budget_s:
                break
            if -(-k // tiling["block_k"]) < 2 * tiling["splits"]:
                continue
            us = measure(tiling)
            if us is not None:
                results.append((us, tiling))
        results.sort(key=lambda r: r[0])
        for _, best in list(results[:2]):
            for warps, stages in WARPS_STAGES:
                if time.monotonic() - began > args.budget_s:
                    break
                tiling = dict(best, num_warps=warps, num_stages=stages)
                us = measure(tiling)
                if us is not None:
                    results.append((us, tiling))
        results.sort(key=lambda r: r[0])
        print(f"{name}: N={n} K={k}, {copies} copies; bf16 {bf16_us:.1f} us, FP8 layer {layer_us:.1f} us, "
              f"decode_tiles' tiling {rule_us:.1f} us {rule}")
        for us, tiling in results[:5]:
            print(f"  {us:7.1f} us  {us / bf16_us:5.2f}x  {tiling}")
        if results:
            summary.append((name, bf16_us, layer_us, rule_us, *results[0]))
    print(f"\n{'projection':10} {'bf16 us':>8} {'FP8 layer':>10} {'/bf16':>6} {'best us':>8} {'/bf16':>6}  best tiling")
    for name, bf16_us, layer_us, rule_us, us, tiling in summary:
        print(f"{name:10} {bf16_us:8.1f} {layer_us:10.1f} {layer_us / bf16_us:6.2f} {us:8.1f} {us / bf16_us:6.2f}  "
              f"{tiling}")
    total = [sum(row[i] for row in summary) for i in (1, 2, 4)]
    print(f"{'per layer':10} {total[0]:8.1f} {total[1]:10.1f} {total[1] / total[0]:6.2f} {total[2]:8.1f} "
          f"{total[2] / total[0]:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
