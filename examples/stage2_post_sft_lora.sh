#!/usr/bin/env bash
# Stage 2 with LoRA: Post-SFT through a LoRA adapter on the LLM (cheaper than full tuning), then merge it into
# a full model with `swift export --merge_lora true`. The branches stay out of both steps (QZOOM_ATTACH=0), so
# the merged model is a plain base model: stage 3 and inference attach the branches to it.
# Reads the rows stage2_post_sft.sh mined; writes $OUT/train_lora/last-checkpoint and $OUT/merged.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
RECIPE=${RECIPE:-qwen2_5_vl_7b}
DATA=${DATA:-runs/stage2/qwen2_5_vl_7b/mined/post_sft.jsonl}   # written by stage2_post_sft.sh (qzoom mine-hard)
OUT=${OUT:-runs/stage2/qwen2_5_vl_7b}
LORA_ARGS=${LORA_ARGS:---learning_rate 1e-4 --lora_rank 8 --lora_alpha 32}
SFT_ARGS=${SFT_ARGS:-}
export QZOOM_ATTACH=0                          # train and merge the LLM only

swift sft "$(qzoom recipes "$RECIPE/stage2_post_sft.yaml")" \
    --external_plugins "$(qzoom plugin-path)" \
    --model "$MODEL" \
    --dataset "$DATA" \
    --tuner_type lora \
    --target_modules all-linear \
    --output_dir "$OUT/train_lora" \
    $LORA_ARGS $SFT_ARGS

# merge: base weights + LoRA -> one model directory (args.json in the checkpoint names the base model)
swift export \
    --adapters "$OUT/train_lora/last-checkpoint" \
    --merge_lora true \
    --output_dir "$OUT/merged" \
    --exist_ok true

echo "merged Post-SFT model: $OUT/merged"
