#!/usr/bin/env bash
# Train the demo model on a lent GPU machine (the `device` tool), two variants side by side,
# and leave each as a tar split into <=15 MiB parts under $OUT (the tool returns files of at
# most 16 MiB). Rejoin with `cat A.tar.part-* | tar x`. Usage: bash scripts/train_demo_model_gpu.sh
# (env: DATA_SEEDS, SEED, BUDGET_MIN, KILL_S, EXTRA_A / EXTRA_B appended to each variant's flags).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; WORK=/tmp/demo-train; mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for seed in ${DATA_SEEDS:-1 2 3 4}; do
  python3 scripts/make_demo_data.py --seed $seed --count 100000 --out "$WORK/d$seed.jsonl" &
done; wait
cat $(for seed in ${DATA_SEEDS:-1 2 3 4}; do echo "$WORK/d$seed.jsonl"; done) > "$WORK/data.jsonl"; wc -l "$WORK/data.jsonl"
common=(--data "$WORK/data.jsonl" --device cuda --precision bf16 --answer-weight 2
        --steps 1000000 --time-budget-min "${BUDGET_MIN:-6.5}" --checkpoint-every-min 1.5
        --max-conversations 0 --workers 6 --seed "${SEED:-1}" --hidden 384 --layers 8 --heads 6
        --kv-heads 2 --intermediate 1024)
timeout "${KILL_S:-520}" python3 scripts/train_demo_model.py "${common[@]}" --out "$WORK/A" \
  --batch-size 128 --lr 1.5e-3 ${EXTRA_A:-} > "$OUT/A.log" 2>&1 &
timeout "${KILL_S:-520}" python3 scripts/train_demo_model.py "${common[@]}" --out "$WORK/B" \
  --batch-size 256 --lr 2e-3 ${EXTRA_B:-} > "$OUT/B.log" 2>&1 &
wait
for v in A B; do
  tail -3 "$OUT/$v.log"
  [ -f "$WORK/$v/model.safetensors" ] && tar cf - -C "$WORK" "$v" | split -b 15M - "$OUT/$v.tar.part-"
done
ls -la "$OUT"
