#!/usr/bin/env bash
# Multi-GPU runs of issue 10 (tensor parallelism): correctness on the GPUs, then T1 and T2 of random-weight Llama
# shapes with TP against one GPU. Logs and JSON go to $OUT; the tables come last. Each stage fits one 10-minute
# device call; run them one by one:
#
#   2 GPUs (nvidia-h100-x2 or nvidia-h200-x2):
#                    STAGES=check      bash benchmarks/gpu_parallel_run.sh   # float32 exactness, TP=2 / PP=2
#                    STAGES=t1-8b-tp1  bash benchmarks/gpu_parallel_run.sh   # T1 (+ T2 B=1,32), llama-3.1-8b, one GPU
#                    STAGES=t1-8b-tp2  bash benchmarks/gpu_parallel_run.sh   # the same with TP=2
#                    STAGES=t2-8b-tp1, then STAGES=t2-8b-tp2                 # T2 (B=1,8,32), one GPU, then TP=2
#   4 GPUs (nvidia-h100-x4 or nvidia-h200-x4):
#                    STAGES=check      bash benchmarks/gpu_parallel_run.sh   # adds TP=4 (replicated KV) and TP x PP
#                    STAGES=weights-70b bash benchmarks/gpu_parallel_run.sh  # writes the 141 GB checkpoint once
#                    STAGES="t1-70b-native t1-70b-transformers t2-70b-native t2-70b-transformers" (one per call)
#
# Each implementation runs in its own bench process: torch sets up a group's peer memory (the engine's small
# all-reduces) once per process, so a second engine in a process would all-reduce through NCCL only. The check
# stage builds several engines in one process: its first layout runs with peer memory, the others through NCCL.
#
# Acceptance (issue 10): on x2, T1 output tok/s with TP=2 >= 1.7x TP=1 and T2 ms/token with TP=2 below TP=1, native
# and fallback; on x4, llama-3.1-70b serves with TP=4 (it cannot on one GPU): record T1, T2 and "of floor" (the
# floor counts all 4 GPUs' bandwidth and FLOP rate).
set -o pipefail
STAGES=${STAGES:-check}
OUT=${OUT:-/tmp/gpu_parallel}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TFBACKEND_CACHE=${TFBACKEND_CACHE:-/tmp/tfbackend-cache}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
has() { [[ " $STAGES " == *" $1 "* ]]; }
BENCH="python3 -m tfbackend.entrypoints.cli bench"
quiet() { grep -v -E "^INFO|Loading weights|^W[0-9]{4} "; }

python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "nccl", torch.cuda.nccl.version(), "| transformers", transformers.__version__, "| triton", triton.__version__,
  "|", torch.cuda.device_count(), "x", torch.cuda.get_device_name())'
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader
nvidia-smi topo -m | head -8

has check && python3 benchmarks/gpu_parallel_check.py 2>&1 | tee "$OUT/check.log" | quiet

bench() {  # bench NAME SCENARIO ARGS...: one tfbackend bench run, its table kept in $OUT/NAME.log
  local name=$1; shift
  $BENCH "$@" --output "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || { echo "$name FAILED"; tail -30 "$OUT/$name.log"; }
}
# One implementation per process: torch sets up a group's peer memory (the small all-reduces) once per process.
for tp in 1 2; do
  for impl in native transformers; do
    has t1-8b-tp$tp && bench "t1-8b-tp$tp-$impl" throughput --random-weights llama-3.1-8b --impl $impl -tp $tp \
      --max-model-len 1024 --latency-batch-size 1,32
    has t2-8b-tp$tp && bench "t2-8b-tp$tp-$impl" latency --random-weights llama-3.1-8b --impl $impl -tp $tp \
      --max-model-len 1024 --batch-size 1,8,32
  done
done
has weights-70b && python3 -c 'from tfbackend.bench.presets import random_checkpoint; print(random_checkpoint("llama-3.1-70b"))'
for impl in native transformers; do
  has t1-70b-$impl && bench "t1-70b-$impl" throughput --random-weights llama-3.1-70b --impl $impl -tp 4 \
    --max-model-len 1024 --latency-batch-size 1,32
  has t2-70b-$impl && bench "t2-70b-$impl" latency --random-weights llama-3.1-70b --impl $impl -tp 4 \
    --max-model-len 1024 --batch-size 1,8,32
done

echo "=================== summary"
[ -f "$OUT/check.log" ] && grep -E "IDENTICAL|differs|leading tokens|parallel check" "$OUT/check.log"
for f in "$OUT"/t*.log; do [ -f "$f" ] && { echo "--- $(basename "$f")"; grep -E "KV cache of rank 0|captured" "$f" | head -2
  sed -n '/ on .*(torch\./,$p' "$f"; }; done
