#!/usr/bin/env bash
# One short device call (~6 min on one H100) that measures what changed in the fallback, quantization and compat
# work without the long sweeps of gpu_run.sh / gpu_compat_run.sh:
#   1. T2 of the llama-3.2-1b shape, native against the fallback (whose q/k/v and gate/up now run fused);
#   2. benchmarks/gpu_quant_check.py: the quantized GEMM paths (FP8 through torch._scaled_mm and Triton,
#      int4, GGUF) against bf16 F.linear, checked and timed;
#   3. compat T1 on a BLOOM-560M shape (padded prefill groups), without the HF peers (slow; see
#      gpu_compat_run.sh for them).
# Each part has its own time limit so one slow part cannot take the others' time. Tables come last.
#
#   bash benchmarks/gpu_quick_run.sh
set -o pipefail
OUT=${OUT:-/tmp/gpu_quick}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export TFBACKEND_CACHE=${TFBACKEND_CACHE:-/tmp/tfbackend-cache}
BENCH="python3 -m tfbackend.entrypoints.cli bench"
CKPT=${CKPT:-/tmp/compat-checkpoints}

timeout "${T2_SECONDS:-200}" $BENCH latency --random-weights llama-3.2-1b --impl native,transformers --batch-size 1,8 \
  --output "$OUT/t2-llama-1b.json" > "$OUT/t2-llama-1b.log" 2>&1 || echo "T2 llama-3.2-1b FAILED or timed out"
timeout "${QUANT_SECONDS:-100}" python3 benchmarks/gpu_quant_check.py > "$OUT/quant.log" 2>&1 \
  || echo "gpu_quant_check FAILED or timed out"
{ python3 benchmarks/random_hf_checkpoint.py bloom "$CKPT/bloom-560m" hidden_size=1024 n_layer=24 n_head=16 \
    vocab_size=250880 && timeout "${COMPAT_SECONDS:-90}" $BENCH throughput --model "$CKPT/bloom-560m" --impl compat \
    --max-model-len 2048 --output "$OUT/t1-compat-bloom-560m.json"; } > "$OUT/t1-compat-bloom-560m.log" 2>&1 \
  || echo "compat T1 bloom-560m FAILED or timed out"

echo "=================== fusion: fallback vs native T2"
grep -E "groups of projections fused|left unfused" "$OUT/t2-llama-1b.log" | head -3
sed -n '/ on .*(torch\./,$p' "$OUT/t2-llama-1b.log"
echo "=================== quantized GEMMs"
grep -v -E "^W[0-9]{4} |^INFO" "$OUT/quant.log" | tail -45
echo "=================== compat T1 bloom-560m"
grep -E "startup: total|padded|prefill" "$OUT/t1-compat-bloom-560m.log" | head -3
sed -n '/ on .*(torch\./,$p' "$OUT/t1-compat-bloom-560m.log"
