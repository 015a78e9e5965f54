#!/usr/bin/env bash
# Stage 1 (SD-RPN): pseudo labels from the model's own attention, then train the region proposal branch.
# One GPU by default (the recipe's ENV block: NPROC_PER_NODE=1, global batch 128); more: multi_gpu.sh.
# Writes $OUT/labels/shard-*.jsonl and $OUT/train/last-checkpoint (the branch checkpoint stages 2-3 read).
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}    # hub id or local dir
RECIPE=${RECIPE:-qwen2_5_vl_7b}                # recipes/$RECIPE/stage1_sdrpn.yaml (`qzoom recipes` lists them)
DATA=${DATA:-data/stage1.jsonl}                # ms-swift jsonl: messages + one local image per row
OUT=${OUT:-runs/stage1/qwen2_5_vl_7b}
LABEL_ARGS=${LABEL_ARGS:---mode textual --batch-size 8}   # qzoom pseudo-labels --help
SFT_ARGS=${SFT_ARGS:-}                         # extra swift sft flags (later flags override the recipe)

# 1. labels (resumable: rerun the same command after a crash)
qzoom pseudo-labels --model "$MODEL" --dataset "$DATA" --out "$OUT/labels" $LABEL_ARGS

# 2. the RPN branch: layers [0, B) frozen + the branch; saves qzoom_branch.safetensors + qzoom_config.json
swift sft "$(qzoom recipes "$RECIPE/stage1_sdrpn.yaml")" \
    --external_plugins "$(qzoom plugin-path)" \
    --model "$MODEL" \
    --dataset "$OUT"/labels/shard-*.jsonl \
    --output_dir "$OUT/train" \
    $SFT_ARGS

echo "stage-1 checkpoint: $OUT/train/last-checkpoint"
