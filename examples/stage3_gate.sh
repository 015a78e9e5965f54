#!/usr/bin/env bash
# Stage 3 (gate): answers across a resolution trajectory -> consistency labels, train the gate (continuing from
# the stage-1 branches), then choose tau_gate on held-out trajectories (written into the checkpoint's config).
# Writes $OUT/labels/gate_train.jsonl, $OUT/heldout/ and $OUT/train/last-checkpoint (both branches + tau_gate):
# the checkpoint infer.sh, deploy.sh, eval.sh and export_onnx.sh read.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}    # after stage 2: runs/stage2/qwen2_5_vl_7b/train/last-checkpoint
RECIPE=${RECIPE:-qwen2_5_vl_7b}                # recipes/$RECIPE/stage3_gate.yaml
STAGE1_CKPT=${STAGE1_CKPT:-runs/stage1/qwen2_5_vl_7b/train/last-checkpoint}   # written by stage1_sdrpn.sh
DATA=${DATA:-data/stage3.jsonl}                # questions with ground-truth answers
HELDOUT=${HELDOUT:-data/stage3_heldout.jsonl}  # a held-out split of the same kind, for the threshold
OUT=${OUT:-runs/stage3/qwen2_5_vl_7b}
LABEL_ARGS=${LABEL_ARGS:---budgets 64,144,256,576,1024 --matcher vqa --batch-size 8}   # qzoom gate-labels --help
CALIBRATE_ARGS=${CALIBRATE_ARGS:---max-accuracy-drop 0.005}
SFT_ARGS=${SFT_ARGS:-}

# 1. labels: every question at every budget (resumable); OUT/labels/summary.json says what survived the filter
qzoom gate-labels --model "$MODEL" --dataset "$DATA" --out "$OUT/labels" $LABEL_ARGS
qzoom gate-labels --model "$MODEL" --dataset "$HELDOUT" --out "$OUT/heldout" $LABEL_ARGS

# 2. the gate branch, starting from the stage-1 checkpoint (its RPN is kept; both branches are saved)
swift sft "$(qzoom recipes "$RECIPE/stage3_gate.yaml")" \
    --external_plugins "$(qzoom plugin-path)" \
    --model "$MODEL" \
    --adapters "$STAGE1_CKPT" \
    --dataset "$OUT/labels/gate_train.jsonl" \
    --output_dir "$OUT/train" \
    $SFT_ARGS

# 3. tau_gate: skip the RoI as often as possible within the allowed accuracy drop
qzoom calibrate-gate --model "$MODEL" --checkpoint "$OUT/train/last-checkpoint" --trajectories "$OUT/heldout" \
    $CALIBRATE_ARGS

echo "Q-Zoom checkpoint: $OUT/train/last-checkpoint"
