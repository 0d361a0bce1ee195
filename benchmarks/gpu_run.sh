#!/usr/bin/env bash
# The device runs: versions, the engine's GPU correctness check, a step profile, and T1 and T2 on
# random Llama-3.2-1B weights against the HF peers. Logs, JSON and plots go to $OUT; the tables come last.
#
#   STAGES=t1 bash benchmarks/gpu_run.sh       # stages: check (~2.5 min), profile (~3.5), t1 (~4.5), t2 (~3.5)
#   STAGES=t1json bash benchmarks/gpu_run.sh   # T1 without and with a JSON schema on every request (not in the default)
#   bash benchmarks/gpu_run.sh                 # every stage: more than one 10-minute device call holds
#   bash benchmarks/gpu_run.sh smoke           # small sizes: does everything run
set -o pipefail
MODE=${1:-full}
STAGES=${STAGES:-check profile t1 t2}
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TFBACKEND_CACHE=/tmp/tfbackend-cache
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TORCH_LOGS=recompiles
has() { [[ " $STAGES " == *" $1 "* ]]; }

python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "| transformers", transformers.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name())'
python3 -c 'import matplotlib; print("matplotlib", matplotlib.__version__)' || echo "matplotlib missing"
python3 -c 'import xgrammar; print("xgrammar", xgrammar.__version__)' || echo "xgrammar missing (structured outputs)"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv,noheader

IMPLS=native,transformers
python3 -c 'import tfbackend.native.llama' 2>/dev/null || IMPLS=transformers
BENCH="python3 -m tfbackend.entrypoints.cli bench"
if [ "$MODE" = smoke ]; then
  T1_ARGS="--num-requests 256 --output-len 64 --hf-generate-requests 32"
  T2_ARGS="--batch-size 1,32 --output-len 64 --num-iters 1"
  CHECK_ARGS="--output-len 32"
else
  T1_ARGS=""
  T2_ARGS="--batch-size 1,8,32"
  CHECK_ARGS=""
fi
quiet() { grep -v -E "^INFO|Loading weights|^W[0-9]{4} "; }

has check && python3 benchmarks/gpu_engine_check.py --impls $IMPLS $CHECK_ARGS 2>&1 | tee "$OUT/check.log" | quiet
has profile && for impl in ${IMPLS//,/ }; do for n in 256 1; do
  python3 benchmarks/step_profile.py --impl $impl --num-requests $n --output-len 64 >> "$OUT/profile.log" 2>&1
done; done
has t1 && { $BENCH throughput --random-weights llama-3.2-1b --impl $IMPLS --peers hf-generate,hf-cb $T1_ARGS \
  --output "$OUT/t1.json" --plot "$OUT/t1.png" > "$OUT/t1.log" 2>&1 || { echo "T1 FAILED"; tail -30 "$OUT/t1.log"; }; }
has t2 && { $BENCH latency --random-weights llama-3.2-1b --impl $IMPLS --peers hf-generate,hf-cb $T2_ARGS \
  --output "$OUT/t2.json" --plot "$OUT/t2.png" > "$OUT/t2.log" 2>&1 || { echo "T2 FAILED"; tail -30 "$OUT/t2.log"; }; }
# The random weights have no tokenizer; the grammar needs one: the default model's (49,152 ids, within the vocab).
has t1json && { TOK=$(python3 -c 'from tfbackend.model_source import resolve_model; print(resolve_model(None))') && \
  $BENCH throughput --random-weights llama-3.2-1b --impl $IMPLS --tokenizer "$TOK" \
  --json-schema benchmarks/structured_output_schema.json $T1_ARGS --output "$OUT/t1json.json" > "$OUT/t1json.log" 2>&1 \
  || { echo "T1JSON FAILED"; tail -30 "$OUT/t1json.log"; }; }

echo "=================== summary"
[ -f "$OUT/check.log" ] && grep -E "IDENTICAL|differs|graphs vs|float32 check" "$OUT/check.log"
[ -f "$OUT/profile.log" ] && grep -E "decode-only|ms/step" "$OUT/profile.log"
for f in "$OUT"/t1.log "$OUT"/t2.log; do [ -f "$f" ] && grep -E "captured|torch.compile failed" "$f" | head -2; done
for f in "$OUT"/t1.log "$OUT"/t2.log "$OUT"/t1json.log; do [ -f "$f" ] && sed -n '/ on .*(torch\./,$p' "$f"; done
