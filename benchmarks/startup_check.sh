#!/usr/bin/env bash
# Issue 11 on one GPU: startup with empty and warm compile caches, cold vs warm T1, the first TTFT of each batch
# size against the steady one, and compilations after ready, for llama-3.2-1b native and fallback (~5 min).
#
#   bash benchmarks/startup_check.sh                    # both implementations
#   IMPLS=native bash benchmarks/startup_check.sh       # one
set -o pipefail
OUT=${OUT:-/tmp/startup_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TFBACKEND_CACHE=${TFBACKEND_CACHE:-/tmp/tfbackend-cache}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TORCH_LOGS=recompiles
source benchmarks/bytecode_cache.sh  # as an installed environment has it; see there
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "| transformers", transformers.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name())'
python3 benchmarks/startup_check.py --impls "${IMPLS:-native,transformers}" > "$OUT/startup_check.log" 2>&1
status=$?
grep -E "startup: |compiled after ready, in a step|Recompiling|torch.compile failed|compiled forward|ahead of time|load-time checks|loaded by transformers" \
  "$OUT/startup_check.log" | head -60
sed -n '/=== startup check/,$p' "$OUT/startup_check.log"
[ $status -eq 0 ] || { echo "startup_check FAILED ($status)"; tail -40 "$OUT/startup_check.log"; }
exit $status
