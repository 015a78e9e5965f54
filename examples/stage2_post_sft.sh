#!/usr/bin/env bash
# Stage 2 (Post-SFT, optional): mine the questions the RoI input got wrong, then fully fine-tune the LLM on
# them, each rebuilt as the zoomed sequence inference decodes from (DeepSpeed ZeRO-2, one GPU by default).
# Reads the stage-1 checkpoint; writes $OUT/mined/post_sft.jsonl and $OUT/train/last-checkpoint (a full model
# directory: use it as --model for stage 3 and inference). LoRA instead: stage2_post_sft_lora.sh.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
RECIPE=${RECIPE:-qwen2_5_vl_7b}                # recipes/$RECIPE/stage2_post_sft.yaml
STAGE1_CKPT=${STAGE1_CKPT:-runs/stage1/qwen2_5_vl_7b/train/last-checkpoint}   # written by stage1_sdrpn.sh
POOL=${POOL:-data/stage2_pool.jsonl}           # questions with ground-truth answers
OUT=${OUT:-runs/stage2/qwen2_5_vl_7b}
MINE_ARGS=${MINE_ARGS:---judge-model Qwen/Qwen2.5-VL-7B-Instruct --batch-size 8}   # or --matcher vqa|anls|...
SFT_ARGS=${SFT_ARGS:-}

# 1. low-resolution vs RoI answers, judged; the regressions become training rows (resumable)
qzoom mine-hard --model "$MODEL" --checkpoint "$STAGE1_CKPT" --dataset "$POOL" --out "$OUT/mined" $MINE_ARGS

# 2. Post-SFT of the LLM (vision tower and projector frozen, no branches attached: QZOOM_ATTACH=0 in the recipe)
swift sft "$(qzoom recipes "$RECIPE/stage2_post_sft.yaml")" \
    --external_plugins "$(qzoom plugin-path)" \
    --model "$MODEL" \
    --dataset "$OUT/mined/post_sft.jsonl" \
    --output_dir "$OUT/train" \
    $SFT_ARGS

echo "Post-SFT model: $OUT/train/last-checkpoint"
