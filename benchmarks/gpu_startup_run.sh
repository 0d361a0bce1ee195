#!/usr/bin/env bash
# Issue 11 in one device call on one GPU (~8 min on an H200): startup with empty and warm compile caches for
#   1. llama-3.2-1b, native and fallback (benchmarks/startup_check.sh: phases, first TTFT per batch size,
#      compilations after ready);
#   2. gemma2-2b and olmoe-1b-7b, fallback (`bench throughput --cold`: ready cold / warm, cold T1 / warm T1).
# Python gets the bytecode cache an installed environment has first (benchmarks/bytecode_cache.sh: the lent
# machines run without one). Each part has its own time limit; the tables come last.
#
#   bash benchmarks/gpu_startup_run.sh
set -o pipefail
OUT=${OUT:-/tmp/gpu_startup}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
source benchmarks/bytecode_cache.sh

OUT="$OUT" timeout "${STARTUP_SECONDS:-280}" bash benchmarks/startup_check.sh > "$OUT/startup_check.txt" 2>&1 \
  || echo "startup_check FAILED or timed out"
for preset in gemma2-2b olmoe-1b-7b; do  # each with its own (empty) compile cache
  TFBACKEND_CACHE="/tmp/tfbackend-cache-$preset" timeout "${COLD_SECONDS:-150}" \
    python3 -m tfbackend.entrypoints.cli bench throughput --random-weights "$preset" --impl transformers \
    --max-model-len 1024 --cold --output "$OUT/cold-$preset.json" > "$OUT/cold-$preset.log" 2>&1 \
    || echo "cold $preset FAILED or timed out"
done

echo "=================== startup phases of the fallback's cold and warm starts (gemma2-2b, olmoe-1b-7b)"
for preset in gemma2-2b olmoe-1b-7b; do
  echo "--- $preset"; grep -E "startup: (resolve|load|compile|warm|total)|compiled ahead|ahead failed" \
    "$OUT/cold-$preset.log" | sed -E 's/.*(startup|warmup): //'
done
sed -n '/=== startup check/,$p' "$OUT/startup_check.txt"
for preset in gemma2-2b olmoe-1b-7b; do sed -n '/^throughput on/,$p' "$OUT/cold-$preset.log"; done
