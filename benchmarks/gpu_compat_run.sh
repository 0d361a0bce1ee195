#!/usr/bin/env bash
# Issue 9's device runs: the compat tier (models outside transformers' attention interface) against HF generate
# and HF continuous batching, T1 (256 requests U(64,512) -> 256 tokens) and T2, on random bf16 weights of a
# BLOOM-560M shape and of a Mamba2-370M shape. Logs and JSON go to $OUT; the tables come last, then compat's
# ratio to each HF peer (~5 min on an H100).
#
#   bash benchmarks/gpu_compat_run.sh
set -o pipefail
OUT=${OUT:-/tmp/gpu_compat}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
CKPT=${CKPT:-/tmp/compat-checkpoints}
BENCH="python3 -m tfbackend.entrypoints.cli bench"

python3 benchmarks/random_hf_checkpoint.py bloom "$CKPT/bloom-560m" hidden_size=1024 n_layer=24 n_head=16 \
  vocab_size=250880 || exit 1
python3 benchmarks/random_hf_checkpoint.py mamba2 "$CKPT/mamba2-370m" hidden_size=1024 num_hidden_layers=48 \
  num_heads=32 head_dim=64 expand=2 state_size=128 n_groups=1 vocab_size=50288 || exit 1

for model in bloom-560m mamba2-370m; do
  $BENCH throughput --model "$CKPT/$model" --impl compat --max-model-len 2048 --peers hf-generate,hf-cb \
    --output "$OUT/t1-$model.json" > "$OUT/t1-$model.log" 2>&1 || { echo "T1 $model FAILED"; tail -20 "$OUT/t1-$model.log"; }
  $BENCH latency --model "$CKPT/$model" --impl compat --max-model-len 2048 --peers hf-generate --batch-size 1,8,32 \
    --output "$OUT/t2-$model.json" > "$OUT/t2-$model.log" 2>&1 || { echo "T2 $model FAILED"; tail -20 "$OUT/t2-$model.log"; }
done

echo "=================== compat tables"
for f in "$OUT"/t1-*.log "$OUT"/t2-*.log; do [ -f "$f" ] && sed -n '/ on .*(torch\./,$p' "$f"; done

echo "=================== compat vs HF (target: T1 >= 5x hf-generate and >= hf-cb where it runs)"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for model in ("bloom-560m", "mamba2-370m"):
    def rows(kind):
        path = out / f"{kind}-{model}.json"
        return json.loads(path.read_text())["results"] if path.exists() else []
    t1 = {row["system"]: row for row in rows("t1")}
    compat = next((row for name, row in t1.items() if name.startswith("tfbackend")), None)
    if compat is None:
        print(f"{model}: T1 compat did not run")
        continue
    line = f"{model} T1: compat {compat['output_tok_s']:,.0f} out tok/s"
    for peer in ("hf-generate", "hf-cb"):
        if peer in t1:
            line += f"; {peer} {t1[peer]['output_tok_s']:,.0f} (compat {compat['output_tok_s'] / t1[peer]['output_tok_s']:.2f}x)"
        else:
            line += f"; {peer} did not run"
    print(line)
    t2 = rows("t2")
    for system in dict.fromkeys(row["system"] for row in t2):
        steps = " / ".join(f"B={row['batch_size']} {row['ms_per_token']:.1f}" for row in t2 if row["system"] == system)
        print(f"{model} T2 ms/token, {system}: {steps}")
PY
